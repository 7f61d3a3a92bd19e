//! Every op of the GPU backend, run through the emulated driver (the same
//! kernels, compiled for the CPU), against the CPU reference on random
//! shapes, odd ones included. The shapes, cases and per-op bounds (derived
//! from the arithmetic) live in `classwise::selftest`, which
//! `cwp selftest --device cuda` runs on a real GPU.

use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::selftest::{check_ops, Check};

fn table(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "{} {:<60} max err {:>10.3e}  err/bound {:>8.3}\n",
                if c.pass { "ok  " } else { "FAIL" },
                c.name,
                c.max_err,
                c.ratio
            )
        })
        .collect()
}

fn family(name: &str) {
    let gpu = GpuBackend::new(EmuDriver::new());
    let checks = check_ops(&gpu, name, 0x5eed).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!checks.is_empty(), "{name}: no checks ran");
    let t = table(&checks);
    println!("{t}");
    assert!(
        checks.iter().all(|c| c.pass),
        "{name}: GPU (emu) differs from the CPU reference:\n{t}"
    );
}

#[test]
fn emu_ops_buffers() {
    family("buffers");
}

#[test]
fn emu_ops_elementwise() {
    family("elementwise");
}

#[test]
fn emu_ops_conv() {
    family("conv");
}

#[test]
fn emu_ops_linear() {
    family("linear");
}

#[test]
fn emu_ops_norm() {
    family("norm");
}

#[test]
fn emu_ops_pool() {
    family("pool");
}

#[test]
fn emu_ops_loss() {
    family("loss");
}

#[test]
fn emu_ops_mask() {
    family("mask");
}

#[test]
fn emu_ops_optim() {
    family("optim");
}

#[test]
fn emu_ops_errors() {
    family("errors");
}

#[test]
fn emu_ops_activation() {
    family("activation");
}

#[test]
fn emu_ops_mul() {
    family("mul");
}

#[test]
fn emu_ops_affine() {
    family("affine");
}

#[test]
fn emu_ops_concat() {
    family("concat");
}

#[test]
fn emu_ops_pad() {
    family("pad");
}

/// An allocation over the device's memory is a clear error naming the
/// tensor's shape, and the backend stays usable.
#[test]
fn emu_out_of_memory_is_a_clear_error() {
    use classwise::backend::Backend;
    use classwise::zoo::{build, ModelSpec};
    let gpu = GpuBackend::new(EmuDriver::with_memory_limit(64 << 20));
    let graph = build(&ModelSpec::new("resnet18", [3, 32, 32], 10)).unwrap();
    let params: Vec<_> = classwise::selftest::formula_params(&graph)
        .iter()
        .map(|t| gpu.upload(t).unwrap())
        .collect();
    let x = gpu.zeros(&graph.input_shape(64)).unwrap();
    let err = graph
        .forward(&gpu, &params, &x)
        .err()
        .expect("64 MiB cannot hold batch 64");
    let msg = err.to_string();
    assert!(
        msg.contains("out of device memory") && msg.contains("smaller batch"),
        "{msg}"
    );
    let small = gpu.zeros(&graph.input_shape(1)).unwrap();
    assert!(
        graph.forward(&gpu, &params, &small).is_ok(),
        "the backend still works"
    );
    // Over 2^31 elements: refused before any allocation.
    let huge = gpu
        .zeros(&[1 << 16, 1 << 16])
        .err()
        .expect("too many elements");
    assert!(huge.to_string().contains("2^31"), "{huge}");
}

/// Without a CUDA driver, `cuda` is an error that says so and `auto` falls
/// back to the CPU with a note (on a machine with CUDA, `auto` takes it).
#[test]
fn emu_device_selection_without_cuda() {
    use classwise::backend::{select_device, Device};
    let cuda = classwise::backend::gpu::cuda::ensure_libcuda().is_ok();
    match select_device("auto").unwrap() {
        (Device::Cpu(_), Some(note)) => {
            assert!(!cuda || note.contains("CUDA"), "{note}");
            assert!(note.contains("CPU"), "{note}");
        }
        (Device::Cuda(_), None) => assert!(cuda),
        _ => panic!("auto chose neither CUDA nor the CPU with a note"),
    }
    if !cuda {
        let e = select_device("cuda")
            .err()
            .expect("cuda without a driver")
            .to_string();
        assert!(e.contains("libcuda"), "{e}");
        let e = select_device("cuda:1")
            .err()
            .expect("cuda:1 without a driver")
            .to_string();
        assert!(e.contains("cuda:1"), "{e}");
    }
    assert!(select_device("cuda:x").is_err());
    assert!(select_device("tpu").is_err());
    assert!(matches!(select_device("emu").unwrap().0, Device::Emu(_)));
    assert!(matches!(select_device("cpu").unwrap().0, Device::Cpu(_)));
}
