//! One update of class-wise pattern search reproduces PyTorch's float64
//! arithmetic (fixture `search_step_smallcnn_1x28`): composite, logits, CE,
//! loss, mask gradient, and the signed step.

mod common;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
use common::*;

#[test]
fn one_search_step_matches_pytorch() {
    let name = "search_step_smallcnn_1x28.safetensors";
    let f = fixture(name);
    let meta = |k: &str| -> f32 { f.metadata[k].parse().unwrap() };
    let (alpha, beta, lr) = (meta("alpha"), meta("beta"), meta("lr"));
    let target: usize = f.metadata["target"].parse().unwrap();
    let get = |k: &str| f.float(k, name.as_ref()).unwrap().clone();

    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let be = CpuBackend::default();
    let p: Vec<_> = formula_params(&graph)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect();
    let canvas = get("canvas").reshape(&[1, 1, 28, 28]).unwrap();
    let others = get("others");
    let mask0 = get("mask0").reshape(&[1, 28, 28]).unwrap();
    let b = others.shape()[0];

    let (c, m, o) = (
        be.upload(&canvas).unwrap(),
        be.upload(&mask0).unwrap(),
        be.upload(&others).unwrap(),
    );
    let comp = be.composite(&c, &m, &o).unwrap();
    assert_close_abs(
        "composite",
        be.download(&comp).unwrap().data(),
        get("composite").data(),
        1e-6,
    );
    let trace = graph.forward_trace(&be, &p, comp).unwrap();
    let (losses, dlogits) = be
        .softmax_cross_entropy(trace.logits(), &vec![target; b], &vec![alpha / b as f32; b])
        .unwrap();
    assert_close_abs(
        "logits",
        be.download(trace.logits()).unwrap().data(),
        get("logits").data(),
        1e-4,
    );
    let ce = losses.iter().sum::<f32>() / b as f32;
    assert_close_abs("ce", &[ce], get("ce").data(), 1e-5);
    let l1 = mask0.data().iter().map(|&v| v as f64).sum::<f64>() / (28.0 * 28.0 / 2.0);
    let loss = alpha * ce + beta * l1 as f32;
    assert_close_abs("loss", &[loss], get("loss").data(), 1e-5);

    let grads = graph.backward(&be, &p, &trace, dlogits, false).unwrap();
    let dmask = be
        .mask_grad(&grads.dx, &c, &o, beta / (28.0 * 28.0 / 2.0))
        .unwrap();
    let dmask_host = be.download(&dmask).unwrap();
    let want_dmask = get("dmask");
    assert_close_rel("dmask", dmask_host.data(), want_dmask.data(), 1e-3);

    let mut m1 = m;
    be.sign_step_clamp(&mut m1, &dmask, lr).unwrap();
    let got: Tensor = be.download(&m1).unwrap();
    let want = get("mask1");
    // The signed step is exact wherever the gradient's sign is unambiguous.
    let floor = 1e-7 * want_dmask.max_abs();
    let mut differing = 0;
    for i in 0..want.len() {
        if want_dmask.data()[i].abs() >= floor && got.data()[i] != want.data()[i] {
            differing += 1;
        }
    }
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
}
