//! Every zoo model on the GPU backend through the emulated driver: eval
//! logits and input gradient against the CPU reference (graph runner and the
//! fused eval path) and against PyTorch's float64 golden fixtures; one
//! batched search step and one training step against the CPU and the
//! fixtures. Small batches; `resnet50_imagenet` at one image.

mod common;

use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::fused::FusedModel;
use classwise::backend::gpu::selftest::{self, Check, ModelCase};
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
use common::*;

fn assert_all(what: &str, checks: &[Check]) {
    let t: String = checks
        .iter()
        .map(|c| format!("{} {} | {}: {:.3e} (limit ratio {:.3})\n", if c.pass { "ok  " } else { "FAIL" }, c.group, c.name, c.max_err, c.ratio))
        .collect();
    println!("{t}");
    assert!(!checks.is_empty() && checks.iter().all(|c| c.pass), "{what}:\n{t}");
}

fn case(arch: &str, input: [usize; 3]) -> ModelCase {
    selftest::zoo_cases()
        .into_iter()
        .find(|c| c.arch == arch && c.input == input)
        .unwrap_or_else(|| panic!("no zoo case {arch} {input:?}"))
}

/// GPU (emu) against the CPU, then against the fixture `forward_*` (its
/// first `case.batch` images; the fixture's dx is of the mean over all of
/// its images, so each row's weight is 1/fixture batch).
fn model(arch: &str, input: [usize; 3]) {
    let gpu = GpuBackend::new(EmuDriver::new());
    let c = case(arch, input);
    assert_all(arch, &selftest::check_model(&gpu, &c).unwrap_or_else(|e| panic!("{arch}: {e}")));

    let name = format!("forward_{arch}_{}x{}.safetensors", input[0], input[1]);
    let f = fixture(&name);
    let fx = f.float("x", name.as_ref()).unwrap();
    let (fl, fdx) = (f.float("logits", name.as_ref()).unwrap(), f.float("dx", name.as_ref()).unwrap());
    let nf = fx.shape()[0];
    let n = c.batch.min(nf);
    let graph = build(&ModelSpec::new(arch, input, c.classes)).unwrap();
    let params = formula_params(&graph);
    let x = fx.slice_rows(0, n);
    let y: Vec<usize> = labels(&f, "y")[..n].to_vec();
    let fused = FusedModel::new(&gpu, &graph, &params).unwrap();
    let (logits, dx) = fused.logits_and_input_grad(&x, &y, &vec![1.0 / nf as f32; n]).unwrap();
    let (ltol, gtol) = selftest::model_tolerances(c.deep);
    assert_close_abs(&format!("{name} logits (GPU emu)"), logits.data(), fl.slice_rows(0, n).data(), ltol as f32);
    assert_close_rel(&format!("{name} dx (GPU emu)"), dx.data(), fdx.slice_rows(0, n).data(), gtol);
}

#[test]
fn emu_model_smallcnn_1x28() {
    model("smallcnn", [1, 28, 28]);
}

#[test]
fn emu_model_smallcnn_3x32() {
    model("smallcnn", [3, 32, 32]);
}

#[test]
fn emu_model_resnet18_3x32() {
    model("resnet18", [3, 32, 32]);
}

#[test]
fn emu_model_resnet18_1x28() {
    model("resnet18", [1, 28, 28]);
}

#[test]
fn emu_model_resnet34() {
    model("resnet34", [3, 32, 32]);
}

#[test]
fn emu_model_resnet50() {
    model("resnet50", [3, 32, 32]);
}

#[test]
fn emu_model_preact_resnet18() {
    model("preact_resnet18", [3, 32, 32]);
}

#[test]
fn emu_model_vgg16() {
    model("vgg16", [3, 32, 32]);
}

#[test]
fn emu_model_wrn28_10() {
    model("wrn28_10", [3, 32, 32]);
}

#[test]
fn emu_model_resnet50_imagenet() {
    model("resnet50_imagenet", [3, 224, 224]);
}

/// The golden search step, on the GPU through the fused path.
#[test]
fn emu_search_step_matches_fixture_and_cpu() {
    let gpu = GpuBackend::new(EmuDriver::new());
    assert_all("search step", &selftest::check_search_step(&gpu, &case("smallcnn", [1, 28, 28])).unwrap());

    let name = "search_step_smallcnn_1x28.safetensors";
    let f = fixture(name);
    let meta = |k: &str| -> f32 { f.metadata[k].parse().unwrap() };
    let target: usize = f.metadata["target"].parse().unwrap();
    let get = |k: &str| f.float(k, name.as_ref()).unwrap().clone();
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let fused = FusedModel::new(&gpu, &graph, &formula_params(&graph)).unwrap();
    let canvas = get("canvas").reshape(&[1, 1, 28, 28]).unwrap();
    let mask0 = get("mask0").reshape(&[1, 28, 28]).unwrap();
    let step = selftest::search_step_fused(
        &fused,
        &gpu,
        &canvas,
        &mask0,
        &get("others"),
        target,
        (meta("alpha"), meta("beta"), meta("lr")),
    )
    .unwrap();
    assert_close_abs("logits", step.logits.data(), get("logits").data(), 1e-4);
    let want_dmask = get("dmask");
    assert_close_rel("dmask", step.dmask.data(), want_dmask.data(), 1e-3);
    let mask1 = get("mask1").reshape(&[1, 28, 28]).unwrap();
    assert_eq!(selftest::mask_step_mismatches(&step.mask1, &mask1, &want_dmask), 0, "mask1 differs");
}

/// One training step against the CPU, and its gradients against the golden
/// train-mode fixture.
#[test]
fn emu_train_step_matches_fixture_and_cpu() {
    let gpu = GpuBackend::new(EmuDriver::new());
    let c = case("smallcnn", [1, 28, 28]);
    assert_all("train step", &selftest::check_train_step(&gpu, &c).unwrap());

    let name = "train_smallcnn_1x28.safetensors";
    let f = fixture(name);
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let mut p: Vec<_> = formula_params(&graph).iter().map(|t| gpu.upload(t).unwrap()).collect();
    let x = f.float("x", name.as_ref()).unwrap();
    let y = labels(&f, "y");
    let n = y.len();
    let trace = graph.forward_train(&gpu, &mut p, gpu.upload(x).unwrap(), 0.1).unwrap();
    let (_, dl) = gpu.softmax_cross_entropy(trace.logits(), &y, &vec![1.0 / n as f32; n]).unwrap();
    let grads = graph.backward(&gpu, &p, &trace, dl, true).unwrap();
    assert_close_rel("dx", gpu.download(&grads.dx).unwrap().data(), f.float("dx", name.as_ref()).unwrap().data(), 1e-3);
    let mut checked = 0;
    for (key, _) in f.tensors.iter() {
        if let Some(param) = key.strip_prefix("grad.") {
            let id = graph.param_id(param).unwrap();
            let g: Tensor = gpu.download(grads.params[id].as_ref().unwrap()).unwrap();
            assert_close_rel(key, g.data(), f.float(key, name.as_ref()).unwrap().data(), 1e-3);
            checked += 1;
        } else if let Some(buffer) = key.strip_prefix("after.") {
            let id = graph.param_id(buffer).unwrap();
            assert_close_rel(key, gpu.download(&p[id]).unwrap().data(), f.float(key, name.as_ref()).unwrap().data(), 1e-5);
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} gradients/buffers compared");
}
