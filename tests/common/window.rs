//! A search window against the plain one-step function, shared by the
//! emulator's tests and the real-GPU ones.

use classwise::backend::Backend;
use classwise::device_model::DeviceModel;
use classwise::search::optimize::{step, MaskConfig};
use classwise::search::window::Window;
use classwise::selftest::formula_params;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;

pub const S: usize = 2;
pub const B: usize = 2;

pub fn cfg() -> MaskConfig {
    MaskConfig {
        batch: B,
        ..MaskConfig::default()
    }
}

pub fn graph() -> classwise::graph::Graph {
    build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap()
}

/// Eight images, and for each step the rows its two searches compose.
pub fn image_set() -> Tensor {
    Tensor::from_fn(&[8, 1, 28, 28], |i| ((i * 7919) % 1000) as f32 / 1000.0)
}

pub fn table(steps: usize) -> Vec<u32> {
    (0..steps * S * B)
        .map(|i| ((i * 3 + i / 4) % 8) as u32)
        .collect()
}

pub fn rows(t: &Tensor, idx: &[u32]) -> Tensor {
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
/// masks kept) against three calls of the plain step, whose fixed canvas is
/// put back after each call as a run does. On the GPU backend the window's
/// first step runs op by op, its second is recorded, its third replayed.
pub fn window_equals_step_by_step<Bk: Backend>(be: &Bk) {
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
        let at = i * S * plane;
        assert_eq!(
            &got.snapshots[at..at + S * plane],
            mask.data(),
            "the masks kept after step {i}"
        );
        let learned = out.canvases.unwrap();
        let n = canvas.len() / S;
        canvas.data_mut()[..n].copy_from_slice(&learned.data()[..n]);
    }
    assert_eq!(got.snapshots.len(), steps * S * plane);
    assert_eq!(got.masks, mask.data(), "the final masks");
    let canvases = got
        .canvases
        .expect("a learning search brings its canvas back");
    assert_eq!(canvases, canvas.data(), "learned canvas 0, fixed canvas 1");
    assert_ne!(canvas.data(), canvas0.data(), "the learned canvas moved");
}
