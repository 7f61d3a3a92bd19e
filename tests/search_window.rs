//! The search step as a run makes it: a window of steps that stays on the
//! device. Its batches are gathered there by row index, its losses, masks
//! and finiteness counts wait there, and the host reads them once, when the
//! window ends. It must give the bits of the plain one-step function, on
//! the CPU and on the GPU backend (emulated), and copy nothing between host
//! and device while it steps.

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::device_model::DeviceModel;
use classwise::search::optimize::{step, MaskConfig};
use classwise::search::window::Window;
use classwise::selftest::formula_params;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;

const S: usize = 2;
const B: usize = 2;

fn cfg() -> MaskConfig {
    MaskConfig {
        batch: B,
        ..MaskConfig::default()
    }
}

fn graph() -> classwise::graph::Graph {
    build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap()
}

/// Eight images, and for each step the rows its two searches compose.
fn image_set() -> Tensor {
    Tensor::from_fn(&[8, 1, 28, 28], |i| ((i * 7919) % 1000) as f32 / 1000.0)
}

fn table(steps: usize) -> Vec<u32> {
    (0..steps * S * B)
        .map(|i| ((i * 3 + i / 4) % 8) as u32)
        .collect()
}

fn rows(t: &Tensor, idx: &[u32]) -> Tensor {
    let n = t.len() / t.shape()[0];
    let data = idx
        .iter()
        .flat_map(|&r| t.data()[r as usize * n..(r as usize + 1) * n].to_vec())
        .collect();
    let mut shape = t.shape().to_vec();
    shape[0] = idx.len();
    Tensor::new(&shape, data).unwrap()
}

/// Three steps of a window (search 0 learns its canvas, search 1 does not;
/// masks kept from step 1 on) against three calls of the plain step, whose
/// fixed canvas is put back after each call as a run does.
fn window_equals_step_by_step<Bk: Backend>(be: &Bk) {
    let g = graph();
    let model = DeviceModel::upload(be, &g, &formula_params(&g)).unwrap();
    let cfg = cfg();
    let steps = 3;
    let table = table(steps);
    let canvas0 = Tensor::from_fn(&[S, 1, 28, 28], |i| ((i * 31) % 97) as f32 / 97.0);
    let mask0 = Tensor::full(&[S, 28, 28], 0.5);
    let (targets, learn) = ([3usize, 7], [true, false]);
    let images = be.upload(&image_set()).unwrap();
    let mut win = Window::new(
        &model, &cfg, &images, &table, &targets, &learn, &canvas0, &mask0, 1,
    )
    .unwrap();
    while !win.is_full() {
        win.step().unwrap();
    }
    let got = win.finish().unwrap();
    assert_eq!(got.steps, steps);

    let (mut canvas, mut mask) = (canvas0.clone(), mask0.clone());
    let plane = 28 * 28;
    for i in 0..steps {
        let others = rows(&image_set(), &table[i * S * B..(i + 1) * S * B]);
        let out = step(&model, &canvas, &mask, &others, &targets, &cfg, true).unwrap();
        let ce: Vec<f32> = got.losses[i * S * B..(i + 1) * S * B]
            .chunks(B)
            .map(|l| (l.iter().map(|&v| v as f64).sum::<f64>() / B as f64) as f32)
            .collect();
        assert_eq!(ce, out.ce, "step {i}: each search's cross-entropy");
        assert_eq!(&got.nonfinite[2 * i..2 * i + 2], &[0.0, 0.0]);
        mask = out.masks;
        if i >= 1 {
            let at = (i - 1) * S * plane;
            assert_eq!(
                &got.snapshots[at..at + S * plane],
                mask.data(),
                "the masks kept after step {i}"
            );
        }
        let learned = out.canvases.unwrap();
        let n = canvas.len() / S;
        canvas.data_mut()[..n].copy_from_slice(&learned.data()[..n]);
    }
    assert_eq!(got.snapshots.len(), (steps - 1) * S * plane);
    assert_eq!(got.masks, mask.data(), "the final masks");
    let canvases = got
        .canvases
        .expect("a learning search brings its canvas back");
    assert_eq!(canvases, canvas.data(), "learned canvas 0, fixed canvas 1");
    assert_ne!(canvas.data(), canvas0.data(), "the learned canvas moved");
}

#[test]
fn a_window_gives_the_bits_of_one_step_at_a_time_on_the_cpu() {
    window_equals_step_by_step(&CpuBackend);
}

#[test]
fn a_window_gives_the_bits_of_one_step_at_a_time_on_the_gpu_backend() {
    window_equals_step_by_step(&GpuBackend::new(EmuDriver::new()));
}

#[test]
fn a_window_copies_nothing_between_host_and_device_until_it_ends() {
    let gpu = GpuBackend::new(EmuDriver::new());
    let g = graph();
    let model = DeviceModel::upload(&gpu, &g, &formula_params(&g)).unwrap();
    let cfg = cfg();
    let canvas = Tensor::full(&[S, 1, 28, 28], 0.25);
    let mask = Tensor::full(&[S, 28, 28], 0.5);
    let images = gpu.upload(&image_set()).unwrap();
    let mut reads = Vec::new();
    for steps in [2, 5] {
        let table = table(steps);
        let mut win = Window::new(
            &model,
            &cfg,
            &images,
            &table,
            &[1, 2],
            &[false, true],
            &canvas,
            &mask,
            0,
        )
        .unwrap();
        let before = gpu.driver().host_traffic();
        while !win.is_full() {
            win.step().unwrap();
        }
        assert_eq!(
            gpu.driver().host_traffic(),
            before,
            "{steps} steps copied or waited"
        );
        win.finish().unwrap();
        let after = gpu.driver().host_traffic();
        assert_eq!(after.uploads, before.uploads, "finishing uploads nothing");
        reads.push(after.downloads - before.downloads);
    }
    assert_eq!(
        reads[0], reads[1],
        "a window's read-back does not grow with its steps"
    );
    assert!(reads[0] <= 5, "{} reads at the end of a window", reads[0]);
}

#[test]
fn a_window_refuses_shapes_that_do_not_make_whole_steps() {
    let cpu = CpuBackend;
    let g = graph();
    let model = DeviceModel::upload(&cpu, &g, &formula_params(&g)).unwrap();
    let cfg = cfg();
    let images = image_set();
    let canvas = Tensor::full(&[S, 1, 28, 28], 0.25);
    let mask = Tensor::full(&[S, 28, 28], 0.5);
    let mut table = table(1);
    table.pop();
    let e = Window::new(
        &model,
        &cfg,
        &images,
        &table,
        &[1, 2],
        &[false; 2],
        &canvas,
        &mask,
        0,
    )
    .err()
    .expect("a partial step is refused")
    .to_string();
    assert!(e.contains("3 rows"), "{e}");
    let table = self::table(1);
    let mut win = Window::new(
        &model,
        &cfg,
        &images,
        &table,
        &[1, 2],
        &[false; 2],
        &canvas,
        &mask,
        0,
    )
    .unwrap();
    win.step().unwrap();
    assert!(win.step().is_err(), "a step past the window's end");
}
