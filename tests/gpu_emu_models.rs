//! Every zoo model on the GPU backend through the emulated driver: eval
//! logits and input gradient against the CPU reference (graph runner and the
//! fused eval path) and against PyTorch's float64 golden fixtures; one
//! batched search step and one training step against the CPU and the
//! fixtures; a whole (small) search run against the CPU's. Small batches;
//! `resnet50_imagenet` at one image.

mod common;

use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::device_model::DeviceModel;
use classwise::selftest::formula_params;
use classwise::selftest::{self, Check, ModelCase};
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
use common::*;

fn assert_all(what: &str, checks: &[Check]) {
    let t: String = checks
        .iter()
        .map(|c| {
            format!(
                "{} {} | {}: {:.3e} (limit ratio {:.3})\n",
                if c.pass { "ok  " } else { "FAIL" },
                c.group,
                c.name,
                c.max_err,
                c.ratio
            )
        })
        .collect();
    println!("{t}");
    assert!(
        !checks.is_empty() && checks.iter().all(|c| c.pass),
        "{what}:\n{t}"
    );
}

fn case(arch: &str, input: [usize; 3]) -> ModelCase {
    selftest::zoo_cases()
        .into_iter()
        .find(|c| c.arch == arch && c.input == input)
        .unwrap_or_else(|| panic!("no zoo case {arch} {input:?}"))
}

/// GPU (emu) against the CPU (graph runner and fused path), then both paths
/// against the fixture `forward_*` (its first `case.batch` images: the
/// formula input and labels of the fixture). The fixture's dx is of the mean
/// over its own batch, so ours is rescaled by batch / fixture batch (a power
/// of two here, exact). An image may differ from the fixture beyond the
/// tolerance only where the CPU forward pass has a max-pool near-tie (where
/// f32 and f64 may route a window's gradient to different pixels), and at
/// least one (path, image) must match.
fn model(arch: &str, input: [usize; 3]) {
    let gpu = GpuBackend::new(EmuDriver::new());
    let c = case(arch, input);
    let (checks, out) =
        selftest::check_model_outputs(&gpu, &c).unwrap_or_else(|e| panic!("{arch}: {e}"));
    assert_all(arch, &checks);

    let name = format!("forward_{arch}_{}x{}.safetensors", input[0], input[1]);
    let f = fixture(&name);
    let (fl, fdx) = (
        f.float("logits", name.as_ref()).unwrap(),
        f.float("dx", name.as_ref()).unwrap(),
    );
    let nf = fl.shape()[0];
    let n = c.batch.min(nf);
    let (ltol, gtol) = selftest::model_tolerances(c.deep);
    let graph = build(&ModelSpec::new(arch, input, c.classes)).unwrap();
    let x = selftest::formula_input(&graph.input_shape(n));
    let ties = selftest::maxpool_near_ties(&graph, &formula_params(&graph), &x, 1e-5).unwrap();
    let mut matched = 0;
    for (path, (logits, dx)) in [("graph runner", &out.runner), ("fused", &out.fused)] {
        assert_close_abs(
            &format!("{name} logits (GPU emu, {path})"),
            logits.data(),
            fl.slice_rows(0, n).data(),
            ltol as f32,
        );
        let scale = n as f32 / nf as f32;
        let dx = Tensor::from_fn(dx.shape(), |i| dx.data()[i] * scale);
        for (i, e) in selftest::rel_l2_per_image(&dx, &fdx.slice_rows(0, n))
            .iter()
            .enumerate()
        {
            assert!(
                *e <= gtol || ties[i] > 0,
                "{name} dx of image {i} (GPU emu, {path}): relative L2 {e:e} > {gtol:e}"
            );
            matched += (*e <= gtol) as usize;
        }
    }
    assert!(matched > 0, "{name}: no image matched the fixture");
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

/// The golden search step, on the GPU through the search's own step and
/// model (which runs the fused path there).
#[test]
fn emu_search_step_matches_fixture_and_cpu() {
    let gpu = GpuBackend::new(EmuDriver::new());
    assert_all(
        "search step",
        &selftest::check_search_step(&gpu, &case("smallcnn", [1, 28, 28])).unwrap(),
    );

    let name = "search_step_smallcnn_1x28.safetensors";
    let f = fixture(name);
    let meta = |k: &str| -> f32 { f.metadata[k].parse().unwrap() };
    let target: usize = f.metadata["target"].parse().unwrap();
    let get = |k: &str| f.float(k, name.as_ref()).unwrap().clone();
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let model = DeviceModel::upload(&gpu, &graph, &formula_params(&graph)).unwrap();
    assert!(model.is_fused(), "the search on a GPU runs the fused path");
    let canvas = get("canvas").reshape(&[1, 1, 28, 28]).unwrap();
    let mask0 = get("mask0").reshape(&[1, 28, 28]).unwrap();
    let cfg = classwise::search::MaskConfig {
        batch: 4,
        alpha: meta("alpha"),
        beta: meta("beta"),
        lr: f.metadata["lr"].parse::<f64>().unwrap(),
        ..Default::default()
    };
    let step = classwise::search::optimize::step(
        &model,
        &canvas,
        &mask0,
        &get("others"),
        &[target],
        &cfg,
        false,
    )
    .unwrap();
    let (ltol, gtol) = selftest::model_tolerances(false);
    assert_close_abs(
        "logits",
        step.logits.data(),
        get("logits").data(),
        ltol as f32,
    );
    let want_dmask = get("dmask");
    assert_close_rel("dmask", step.dmask.data(), want_dmask.data(), gtol);
    let mask1 = get("mask1").reshape(&[1, 28, 28]).unwrap();
    assert_eq!(
        selftest::mask_step_mismatches(&step.masks, &mask1, &want_dmask),
        0,
        "mask1 differs"
    );
}

fn norm(t: &Tensor) -> f64 {
    t.data()
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt()
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
    let mut p: Vec<_> = formula_params(&graph)
        .iter()
        .map(|t| gpu.upload(t).unwrap())
        .collect();
    let x = f.float("x", name.as_ref()).unwrap();
    let y = labels(&f, "y");
    let n = y.len();
    let trace = graph
        .forward_train(&gpu, &mut p, gpu.upload(x).unwrap(), 0.1)
        .unwrap();
    let (_, dl) = gpu
        .softmax_cross_entropy(trace.logits(), &y, &vec![1.0 / n as f32; n])
        .unwrap();
    let grads = graph.backward(&gpu, &p, &trace, dl, true).unwrap();
    assert_close_rel(
        "dx",
        gpu.download(&grads.dx).unwrap().data(),
        f.float("dx", name.as_ref()).unwrap().data(),
        1e-3,
    );
    let mut checked = 0;
    for (key, _) in f.tensors.iter() {
        if let Some(param) = key.strip_prefix("grad.") {
            let id = graph.param_id(param).unwrap();
            let g: Tensor = gpu.download(grads.params[id].as_ref().unwrap()).unwrap();
            let want = f.float(key, name.as_ref()).unwrap();
            if norm(want) < 1e-12 {
                // A bias right before train-mode BN has an analytically zero
                // gradient; ours must be rounding noise against the layer's
                // weight gradient (the rule of the CPU's fixture test).
                let w = param.replace(".bias", ".weight");
                let wg: Tensor = gpu
                    .download(grads.params[graph.param_id(&w).unwrap()].as_ref().unwrap())
                    .unwrap();
                assert!(
                    norm(&g) <= 1e-5 * norm(&wg),
                    "{key}: {} should be ~0",
                    norm(&g)
                );
            } else {
                assert_close_rel(key, g.data(), want.data(), 1e-3);
            }
            checked += 1;
        } else if let Some(buffer) = key.strip_prefix("after.") {
            let id = graph.param_id(buffer).unwrap();
            assert_close_rel(
                key,
                gpu.download(&p[id]).unwrap().data(),
                f.float(key, name.as_ref()).unwrap().data(),
                1e-5,
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} gradients/buffers compared");
}

/// A whole search run (canvas choice, batched optimisation, patterns,
/// predictive power, verdict) on the emulated GPU, where the model runs
/// through the fused path, against the same run on the CPU, with the
/// shipped BadNets model. Float order differs between the paths, so a mask
/// value may differ where a gradient's sign is a near-tie; the patterns and
/// their figures must agree.
#[test]
fn emu_search_run_matches_the_cpu_run() {
    use classwise::backend::cpu::CpuBackend;
    use classwise::data::{self, DataSpec, Split};
    use classwise::search::{self, RunInputs, SearchConfig};
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let full = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    let test = full.subset(&(0..600).collect::<Vec<_>>());
    let model = classwise::models::BACKDOORED.load().unwrap();
    let mut cfg = SearchConfig::defaults(model.graph.input, 10);
    cfg.classes = vec![0, 1, 2];
    cfg.canvas = "solid:1".into();
    cfg.search_frac = 0.1;
    cfg.mask.epochs = 2;
    cfg.k_sweep = vec![5, 20, 100];
    cfg.sweep_per_class = Some(10);
    cfg.eval_per_class = Some(20);
    let inputs = RunInputs {
        model: &model,
        model_id: "badnets".into(),
        model_label: "badnets".into(),
        test: &test,
        train: None,
        command: "test".into(),
        quiet: true,
        checkpoint_every: None,
    };
    // One folder: the emulated GPU must not reuse the CPU's results.
    let out = tempfile::tempdir().unwrap();
    let cpu = search::run(&CpuBackend::REFERENCE, &inputs, &cfg, out.path()).unwrap();
    let gpu = GpuBackend::new(EmuDriver::new());
    let emu = search::run(&gpu, &inputs, &cfg, out.path()).unwrap();
    assert_eq!(emu.reused, 0, "the emulated GPU reused the CPU's masks");
    assert_ne!(cpu.numerics, emu.numerics);
    assert_eq!(cpu.searches.len(), 3);
    for (c, g) in cpu.searches.iter().zip(&emu.searches) {
        assert!(c.steps > 0 && c.steps == g.steps);
        let differ = c.mask.iter().zip(&g.mask).filter(|(a, b)| a != b).count();
        assert!(
            differ * 100 <= c.mask.len(),
            "class {}: {differ} of {} mask values differ",
            c.class,
            c.mask.len()
        );
        assert_eq!(c.positions[..10], g.positions[..10], "class {}", c.class);
        assert_eq!(c.min_k, g.min_k, "class {}", c.class);
        assert!(
            (c.power.overall - g.power.overall).abs() <= 0.02,
            "class {}: power {} vs {}",
            c.class,
            c.power.overall,
            g.power.overall
        );
    }
    assert_eq!(cpu.clean_accuracy, emu.clean_accuracy);
    assert_eq!(cpu.flagged, emu.flagged);

    // Shards run on different numerics are not merged into one report.
    let shards = tempfile::tempdir().unwrap();
    let shard = |i: &str| i.parse::<search::shard::Shard>().unwrap();
    search::run_shard(
        &CpuBackend::REFERENCE,
        &inputs,
        &cfg,
        shards.path(),
        shard("0/2"),
    )
    .unwrap();
    search::run_shard(&gpu, &inputs, &cfg, shards.path(), shard("1/2")).unwrap();
    let err = search::shard::merge(&[shards.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&cpu.numerics) && err.contains(&emu.numerics),
        "{err}"
    );
}
