//! Graphs with depthwise, grouped and dilated convolutions and ceil-mode /
//! exclude-pad pooling (the blocks of MobileNet, EfficientNet and DenseNet):
//! the builder's weight shapes and errors, and the eval forward and input
//! gradient of the GPU kernels (emulated) against the CPU reference.

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::{ConvParams, PoolParams};
use classwise::device_model::DeviceModel;
use classwise::graph::{Builder, Graph};
use classwise::selftest::{formula_input, formula_params, logits_and_input_grad, scaled_max_diff};

/// A small depthwise-separable network touching every new option.
fn separable_net() -> Graph {
    let mut b = Builder::new("separable", [3, 15, 15], 10);
    let x = b.input();
    let x = b
        .conv(x, "stem", 8, 3, ConvParams::new(2, 1), false)
        .unwrap();
    let x = b.bn(x, "stem_bn");
    let x = b.relu(x);
    let x = b
        .conv(x, "dw", 8, 3, ConvParams::new(1, 1).with_groups(8), false)
        .unwrap();
    let x = b.bn(x, "dw_bn");
    let x = b.relu(x);
    let x = b.conv(x, "pw", 12, 1, ConvParams::new(1, 0), true).unwrap();
    let x = b.relu(x);
    let p = ConvParams::new(1, 2).with_groups(4).with_dilation(2);
    let x = b.conv(x, "dil", 12, 3, p, true).unwrap();
    let x = b.relu(x);
    let x = b
        .max_pool_with(x, PoolParams::new(3, 2, 0).with_ceil_mode(true))
        .unwrap();
    let x = b
        .avg_pool_with(
            x,
            PoolParams::new(2, 2, 1)
                .with_ceil_mode(true)
                .with_count_include_pad(false),
        )
        .unwrap();
    let x = b.global_avg_pool(x);
    b.linear(x, "fc", 10, true);
    b.finish()
}

#[test]
fn grouped_conv_weights_hold_the_channels_of_one_group() {
    let g = separable_net();
    let shape = |name: &str| {
        g.params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .shape
            .clone()
    };
    assert_eq!(shape("dw.weight"), [8, 1, 3, 3]);
    assert_eq!(shape("dil.weight"), [12, 3, 3, 3]);
    // 15 -> stem 8 -> ceil max pool (8-3)/2 rounded up + 1 = 4 -> avg 2/2
    // pad 1 ceil: (4+2-2)/2 rounded up + 1 = 3, whose last window starts at
    // 4 - 1 = 3, inside the input.
    let pools: Vec<&[usize]> = g
        .nodes
        .iter()
        .filter(|n| {
            matches!(
                n.op,
                classwise::graph::Op::MaxPool(_) | classwise::graph::Op::AvgPool(_)
            )
        })
        .map(|n| n.shape.as_slice())
        .collect();
    assert_eq!(pools, [&[12, 4, 4][..], &[12, 3, 3][..]]);
}

#[test]
fn groups_that_do_not_divide_the_channels_are_refused_by_the_builder() {
    let mut b = Builder::new("bad", [6, 8, 8], 10);
    let x = b.input();
    let e = b
        .conv(x, "c", 8, 3, ConvParams::new(1, 1).with_groups(4), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4 groups must divide") && e.contains("`c`"),
        "{e}"
    );
    let e = b
        .conv(x, "c", 4, 3, ConvParams::new(1, 1).with_groups(3), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 output channels"), "{e}");
    let e = b
        .conv(x, "c", 6, 3, ConvParams::new(1, 0).with_dilation(4), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dilation 4") && e.contains("does not fit"),
        "{e}"
    );
}

#[test]
fn emulated_gpu_runs_a_separable_net_as_the_cpu_does() {
    let g = separable_net();
    let params = formula_params(&g);
    let x = formula_input(&g.input_shape(3));
    let (want_logits, want_dx) =
        logits_and_input_grad(&CpuBackend::REFERENCE, &g, &params, &x).unwrap();
    let gpu = GpuBackend::new(EmuDriver::new());
    let (logits, dx) = logits_and_input_grad(&gpu, &g, &params, &x).unwrap();
    let d = scaled_max_diff(logits.data(), want_logits.data());
    assert!(d < 1e-5, "graph runner logits: {d:e}");
    let d = scaled_max_diff(dx.data(), want_dx.data());
    assert!(d < 1e-4, "graph runner dx: {d:e}");

    // The fused eval graph folds the BNs into the grouped convolutions.
    let model = DeviceModel::upload(&gpu, &g, &params).unwrap();
    assert!(
        model.is_fused(),
        "the BNs after grouped convs were not folded"
    );
    let n = 3;
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % g.num_classes).collect();
    let (_, dx) = model.loss_and_input_grad(&x, &labels).unwrap();
    let logits = model.logits(&x).unwrap();
    let d = scaled_max_diff(logits.data(), want_logits.data());
    assert!(d < 1e-5, "fused logits: {d:e}");
    let d = scaled_max_diff(dx.data(), want_dx.data());
    assert!(d < 1e-4, "fused dx: {d:e}");
}
