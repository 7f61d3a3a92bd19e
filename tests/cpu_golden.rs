//! The CPU backend, driven by the graph runner on zoo models with formula
//! weights, reproduces PyTorch's float64 golden fixtures: logits, loss and
//! input gradient in eval mode; loss, input and parameter gradients and the
//! updated BN running statistics in train mode.

mod common;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::weights::FileTensor;
use classwise::zoo::{build, ModelSpec};
use common::{assert_close_abs, assert_close_rel, fixture, formula_params, labels};

fn spec_of(file: &classwise::weights::TensorFile) -> ModelSpec {
    let m = &file.metadata;
    let c: usize = m["in_channels"].parse().unwrap();
    let hw: usize = m["hw"].parse().unwrap();
    ModelSpec::new(&m["arch"], [c, hw, hw], m["num_classes"].parse().unwrap())
}

/// Mean cross-entropy loss and its gradient through the backend.
fn mean_ce(be: &CpuBackend, logits: &classwise::Tensor, y: &[usize]) -> (f32, classwise::Tensor) {
    let n = y.len();
    let (losses, dlogits) = be
        .softmax_cross_entropy(logits, y, &vec![1.0 / n as f32; n])
        .unwrap();
    (losses.iter().sum::<f32>() / n as f32, dlogits)
}

fn check_eval(name: &str, logit_tol: f32, grad_tol: f64) {
    let be = CpuBackend;
    let file = fixture(name);
    let graph = build(&spec_of(&file)).unwrap();
    let params = formula_params(&graph);
    let path = std::path::Path::new(name);
    let x = file.float("x", path).unwrap().clone();
    let y = labels(&file, "y");
    let trace = graph.forward_trace(&be, &params, x).unwrap();
    let want = file.float("logits", path).unwrap();
    assert_close_abs(name, trace.logits().data(), want.data(), logit_tol);
    let (loss, dlogits) = mean_ce(&be, trace.logits(), &y);
    let want_loss = file.float("loss", path).unwrap().data()[0];
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{name}: loss {loss} vs {want_loss}"
    );
    let grads = graph
        .backward(&be, &params, &trace, dlogits, false)
        .unwrap();
    let want_dx = file.float("dx", path).unwrap();
    assert_close_rel(name, grads.dx.data(), want_dx.data(), grad_tol);
}

#[test]
fn eval_smallcnn_matches_pytorch() {
    check_eval("forward_smallcnn_1x28.safetensors", 1e-4, 1e-3);
    check_eval("forward_smallcnn_3x32.safetensors", 1e-4, 1e-3);
}

#[test]
fn eval_resnets_match_pytorch() {
    check_eval("forward_resnet18_3x32.safetensors", 1e-3, 5e-3);
    check_eval("forward_resnet18_1x28.safetensors", 1e-3, 5e-3);
    check_eval("forward_preact_resnet18_3x32.safetensors", 1e-3, 5e-3);
    check_eval("forward_resnet50_3x32.safetensors", 1e-3, 5e-3);
}

#[test]
fn eval_vgg16_matches_pytorch() {
    check_eval("forward_vgg16_3x32.safetensors", 1e-3, 5e-3);
}

/// Train mode: loss, input gradient, every recorded parameter gradient and
/// the updated running statistics.
///
/// A gradient whose reference is zero up to float64 rounding (a conv bias
/// feeding a train-mode BN, which removes any per-channel shift) has no
/// meaningful relative error; it must instead be tiny in absolute terms.
fn check_train(name: &str, grad_tol: f64) {
    let be = CpuBackend;
    let file = fixture(name);
    let graph = build(&spec_of(&file)).unwrap();
    let mut params = formula_params(&graph);
    let path = std::path::Path::new(name);
    let x = file.float("x", path).unwrap().clone();
    let y = labels(&file, "y");
    let trace = graph.forward_train(&be, &mut params, x, 0.1).unwrap();
    let (loss, dlogits) = mean_ce(&be, trace.logits(), &y);
    let want_loss = file.float("loss", path).unwrap().data()[0];
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{name}: loss {loss} vs {want_loss}"
    );
    let grads = graph.backward(&be, &params, &trace, dlogits, true).unwrap();
    let want_dx = file.float("dx", path).unwrap();
    assert_close_rel("dx", grads.dx.data(), want_dx.data(), grad_tol);
    let mut checked = 0;
    for (key, t) in &file.tensors {
        let FileTensor::Float(want) = t else { continue };
        if let Some(pname) = key.strip_prefix("grad.") {
            let got = grads.params[graph.param_id(pname).unwrap()]
                .as_ref()
                .unwrap();
            if want.max_abs() < 1e-12 {
                assert!(
                    got.max_abs() < 1e-6,
                    "{key}: {} where PyTorch has 0",
                    got.max_abs()
                );
            } else {
                assert_close_rel(key, got.data(), want.data(), grad_tol);
            }
            checked += 1;
        } else if let Some(pname) = key.strip_prefix("after.") {
            let got = &params[graph.param_id(pname).unwrap()];
            assert_close_abs(key, got.data(), want.data(), 1e-5);
            checked += 1;
        }
    }
    assert!(checked > 0, "{name}: no gradients or statistics to check");
}

#[test]
fn train_smallcnn_matches_pytorch() {
    check_train("train_smallcnn_1x28.safetensors", 1e-3);
}

#[test]
fn train_preact_resnet18_matches_pytorch() {
    check_train("train_preact_resnet18_3x32.safetensors", 5e-3);
}

/// With formula weights, train-mode resnet18 at batch 4 amplifies rounding
/// by about 10^4 on the way back: PyTorch itself, in f32 on this machine, is
/// off its own float64 fixture by 4.2e-2 (dx) and up to 7.9e-2 (the
/// layer2.0.shortcut.1.weight gradient). The bound is therefore loose; the
/// eval and preact fixtures hold the tight ones.
#[test]
fn train_resnet18_matches_pytorch_within_f32_conditioning() {
    check_train("train_resnet18_3x32.safetensors", 0.1);
}

/// One step of the class-wise pattern search (composite, forward, CE,
/// backward to the input, mask gradient, signed step) matches PyTorch.
#[test]
fn search_step_matches_pytorch() {
    let be = CpuBackend;
    let name = "search_step_smallcnn_1x28.safetensors";
    let file = fixture(name);
    let path = std::path::Path::new(name);
    let get = |k: &str| file.float(k, path).unwrap().clone();
    let meta = |k: &str| file.metadata[k].parse::<f32>().unwrap();
    let (alpha, beta, lr) = (meta("alpha"), meta("beta"), meta("lr"));
    let target = meta("target") as usize;
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let params = formula_params(&graph);
    let canvas = get("canvas").reshape(&[1, 1, 28, 28]).unwrap();
    let others = get("others");
    let mask0 = get("mask0").reshape(&[1, 28, 28]).unwrap();
    let b = others.shape()[0];

    let composite = be.composite(&canvas, &mask0, &others).unwrap();
    assert_close_abs("composite", composite.data(), get("composite").data(), 1e-6);
    let trace = graph.forward_trace(&be, &params, composite).unwrap();
    assert_close_abs("logits", trace.logits().data(), get("logits").data(), 1e-4);
    let (ce, dlogits) = be
        .softmax_cross_entropy(trace.logits(), &vec![target; b], &vec![alpha / b as f32; b])
        .unwrap();
    let ce = ce.iter().sum::<f32>() / b as f32;
    let want_ce = get("ce").data()[0];
    assert!(
        (ce - want_ce).abs() <= 1e-5 * want_ce.max(1.0),
        "ce {ce} vs {want_ce}"
    );
    let dx = graph
        .backward(&be, &params, &trace, dlogits, false)
        .unwrap()
        .dx;
    let l1_grad = beta / (28.0 * 28.0 / 2.0);
    let dmask = be.mask_grad(&dx, &canvas, &others, l1_grad).unwrap();
    let want_dmask = get("dmask");
    assert_close_rel("dmask", dmask.data(), want_dmask.data(), 1e-3);

    // The fixture steps in float64 with lr = 0.02 exactly; the op takes an
    // f32 lr and steps in f32, so a value may land one f32 ulp away. What
    // must agree exactly is the direction of every step that matters.
    let mut mask1 = mask0.clone();
    be.sign_step_clamp(&mut mask1, &dmask, lr).unwrap();
    let tiny = 1e-7 * want_dmask.max_abs();
    let want_mask1 = get("mask1");
    for i in 0..mask1.len() {
        if want_dmask.data()[i].abs() < tiny {
            continue;
        }
        let (got, want, m0) = (mask1.data()[i], want_mask1.data()[i], mask0.data()[i]);
        assert!((got - want).abs() <= 1e-7, "mask1[{i}]: {got} vs {want}");
        assert_eq!(
            (got - m0).signum(),
            (want - m0).signum(),
            "mask1[{i}] moved the wrong way"
        );
    }
}
