//! One update of class-wise pattern search, through the search's own step
//! function, reproduces PyTorch's float64 arithmetic (fixture
//! `search_step_smallcnn_1x28`): composite, logits, CE, mask gradient
//! (including the L1 term), and the signed, clamped step: on the reference
//! backend and with the Winograd forward of `--cpu-forward winograd`.

mod common;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::device_model::DeviceModel;
use classwise::search::optimize::{step, MaskConfig};
use classwise::selftest::{formula_params, model_tolerances};
use classwise::zoo::{build, ModelSpec};
use common::*;

#[test]
fn one_search_step_matches_pytorch() {
    check_step(CpuBackend::REFERENCE);
}

/// The Winograd step is a second computation, not the reference's bits
/// again, and it too meets every bound.

#[test]
fn one_search_step_with_the_winograd_forward_matches_pytorch() {
    let winograd = check_step(CpuBackend::REFERENCE.with_winograd_forward(true));
    let direct = check_step(CpuBackend::REFERENCE);
    assert_ne!(winograd, direct, "the Winograd forward was not taken");
}

/// Runs the step on `be`, checks it against the fixture and returns its
/// logits.
fn check_step(be: CpuBackend) -> Vec<f32> {
    let name = "search_step_smallcnn_1x28.safetensors";
    let f = fixture(name);
    let meta = |k: &str| -> f32 { f.metadata[k].parse().unwrap() };
    let lr: f64 = f.metadata["lr"].parse().unwrap();
    let target: usize = f.metadata["target"].parse().unwrap();
    let get = |k: &str| f.float(k, name.as_ref()).unwrap().clone();
    let cfg = MaskConfig {
        alpha: meta("alpha"),
        beta: meta("beta"),
        lr,
        batch: 4,
        ..MaskConfig::default()
    };

    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let p: Vec<_> = formula_params(&graph)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect();
    let canvas = get("canvas").reshape(&[1, 1, 28, 28]).unwrap();
    let others = get("others");
    let mask0 = get("mask0").reshape(&[1, 28, 28]).unwrap();

    // The composite the step feeds the model.
    let comp = be
        .composite(
            &be.upload(&canvas).unwrap(),
            &be.upload(&mask0).unwrap(),
            &be.upload(&others).unwrap(),
        )
        .unwrap();
    assert_close_abs(
        "composite",
        be.download(&comp).unwrap().data(),
        get("composite").data(),
        1e-6,
    );

    let dm = DeviceModel::new(&be, &graph, p).unwrap();
    let out = step(&dm, &canvas, &mask0, &others, &[target], &cfg, false).unwrap();
    let (ltol, gtol) = model_tolerances(false);
    assert_close_abs(
        "logits",
        out.logits.data(),
        get("logits").data(),
        ltol as f32,
    );
    assert_close_abs("ce", &out.ce, get("ce").data(), 1e-5);
    let l1 = mask0.data().iter().map(|&v| v as f64).sum::<f64>() / (28.0 * 28.0 / 2.0);
    let loss = cfg.alpha * out.ce[0] + cfg.beta * l1 as f32;
    assert_close_abs("loss", &[loss], get("loss").data(), 1e-5);
    let want_dmask = get("dmask");
    assert_close_rel("dmask", out.dmask.data(), want_dmask.data(), gtol);

    // The signed step is exact wherever the gradient's sign is unambiguous.
    let want = get("mask1");
    let floor = 1e-7 * want_dmask.max_abs();
    let differing = (0..want.len())
        .filter(|&i| want_dmask.data()[i].abs() >= floor && out.masks.data()[i] != want.data()[i])
        .count();
    assert_eq!(
        differing, 0,
        "mask1 differs at {differing} positions with a clear gradient sign"
    );
    let changed = (0..want.len())
        .filter(|&i| want.data()[i] != mask0.data()[i])
        .count();
    assert!(
        changed > 600,
        "the step moved only {changed} of 784 mask values"
    );
    out.logits.data().to_vec()
}
