//! The model half of the suite: every zoo model's forward pass and input
//! gradient, one batched search step and one training step, GPU against the
//! CPU reference under the fixtures README's tolerances.

use super::ops::Suite;
use super::{formula_input, formula_params, gemm_layers, model_tolerances_in, Check};
use crate::backend::cpu::CpuBackend;
use crate::backend::gpu::{Driver, GpuBackend};
use crate::backend::{Backend, SgdParams};
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::search::optimize::{step as search_step, MaskConfig};
use crate::tensor::{rel_l2, Tensor};
use crate::zoo::{build, ModelSpec};

/// One model of the model-level suite.
#[derive(Clone, Debug)]
pub struct ModelCase {
    /// Architecture.
    pub arch: &'static str,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Classes.
    pub classes: usize,
    /// Images per batch.
    pub batch: usize,
    /// A deep net (looser tolerances).
    pub deep: bool,
}

/// Every zoo model at small batches (`resnet50_imagenet` at one image).
pub fn zoo_cases() -> Vec<ModelCase> {
    let m = |arch, input, classes, batch, deep| ModelCase {
        arch,
        input,
        classes,
        batch,
        deep,
    };
    vec![
        m("smallcnn", [1, 28, 28], 10, 2, false),
        m("smallcnn", [3, 32, 32], 10, 2, false),
        m("resnet18", [3, 32, 32], 10, 2, true),
        m("resnet18", [1, 28, 28], 10, 2, true),
        m("resnet34", [3, 32, 32], 10, 2, true),
        m("resnet50", [3, 32, 32], 10, 2, true),
        m("preact_resnet18", [3, 32, 32], 10, 2, true),
        m("vgg16", [3, 32, 32], 10, 2, true),
        m("wrn28_10", [3, 32, 32], 10, 2, true),
        m("resnet50_imagenet", [3, 224, 224], 1000, 1, true),
    ]
}

/// Eval-mode logits and input gradient of the mean cross-entropy (labels
/// `(3n + 1) mod classes`) of `graph` on a backend.
pub fn logits_and_input_grad<B: Backend>(
    be: &B,
    graph: &Graph,
    params: &[Tensor],
    x: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let n = x.shape()[0];
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % graph.num_classes).collect();
    let p = params
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<Vec<_>>>()?;
    let trace = graph.forward_trace(be, &p, be.upload(x)?)?;
    let (_, dlogits) =
        be.softmax_cross_entropy(trace.logits(), &labels, &vec![1.0 / n as f32; n])?;
    let logits = be.download(trace.logits())?;
    let grads = graph.backward(be, &p, &trace, dlogits, false)?;
    Ok((logits, be.download(&grads.dx)?))
}

/// Max |a - b| / max(1, max|b|).
pub fn scaled_max_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    crate::tensor::max_abs_diff(a, b) as f64 / scale
}

/// Max-pool windows of the CPU forward pass whose two largest values are
/// within `rel` of each other (the top one positive), per image: where the
/// input gradient is a discontinuous function of the activations. Two
/// correct f32 implementations may route such a window's gradient to
/// different pixels (first maximum of slightly different values).
pub fn maxpool_near_ties(
    graph: &Graph,
    params: &[Tensor],
    x: &Tensor,
    rel: f32,
) -> Result<Vec<usize>> {
    let n = x.shape()[0];
    let mut ties = vec![0usize; n];
    let p = params
        .iter()
        .map(|t| CpuBackend::REFERENCE.upload(t))
        .collect::<Result<Vec<_>>>()?;
    for node in &graph.nodes {
        let crate::graph::Op::MaxPool(pp) = node.op else {
            continue;
        };
        let src = node.inputs[0];
        let mut g = graph.clone();
        g.nodes.truncate(src + 1);
        let a = if src == 0 {
            x.clone()
        } else {
            g.forward(&CpuBackend::REFERENCE, &p, x)?
        };
        let (c, h, w) = (a.shape()[1], a.shape()[2], a.shape()[3]);
        let (oh, ow) = (pp.out_len(h), pp.out_len(w));
        let win = |o: usize, len: usize| {
            let start = o * pp.stride;
            (
                start.saturating_sub(pp.pad),
                (start + pp.kernel).saturating_sub(pp.pad).min(len),
            )
        };
        for (img, t) in ties.iter_mut().enumerate() {
            for ch in 0..c {
                let plane = &a.data()[(img * c + ch) * h * w..][..h * w];
                for y in 0..oh {
                    let (h0, h1) = win(y, h);
                    for xx in 0..ow {
                        let (w0, w1) = win(xx, w);
                        let (mut top, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for ih in h0..h1 {
                            for &v in &plane[ih * w + w0..ih * w + w1] {
                                if v > top {
                                    second = top;
                                    top = v;
                                } else if v > second {
                                    second = v;
                                }
                            }
                        }
                        if top > 0.0 && top - second <= rel * top {
                            *t += 1;
                        }
                    }
                }
            }
        }
    }
    Ok(ties)
}

/// Relative L2 error of `got` against `want`, image by image (rows of the
/// first axis).
pub fn rel_l2_per_image(got: &Tensor, want: &Tensor) -> Vec<f64> {
    let n = want.shape()[0].max(1);
    let per = want.len() / n;
    (0..n)
        .map(|i| {
            rel_l2(
                &got.data()[i * per..(i + 1) * per],
                &want.data()[i * per..(i + 1) * per],
            )
        })
        .collect()
}

/// Records the input-gradient comparison of one path, image by image. An
/// image over the tolerance is excused only when the reference has a
/// max-pool near-tie in it (see [`maxpool_near_ties`]); returns how many
/// images were compared.
fn dx_check<D: Driver>(
    s: &mut Suite<'_, D>,
    path: &str,
    got: &Tensor,
    want: &Tensor,
    ties: &[usize],
    tol: f64,
) -> usize {
    let errs = rel_l2_per_image(got, want);
    let mut compared = 0;
    let mut worst = 0.0f64;
    let mut excused = Vec::new();
    for (i, &e) in errs.iter().enumerate() {
        if e > tol && ties[i] > 0 {
            excused.push(format!(
                "image {i}: {e:.1e}, {} near-tie window(s)",
                ties[i]
            ));
        } else {
            compared += 1;
            worst = worst.max(e);
        }
    }
    let note = if excused.is_empty() {
        String::new()
    } else {
        format!(" [excused at max-pool near-ties: {}]", excused.join("; "))
    };
    s.metric(format!("dx rel L2 per image ({path}){note}"), worst, tol);
    compared
}

/// Host outputs of [`check_model`]'s two GPU paths: `(logits, dx)` each.
pub struct ModelOutputs {
    /// Through the generic graph runner.
    pub runner: (Tensor, Tensor),
    /// Through the fused eval path.
    pub fused: (Tensor, Tensor),
}

/// Forward logits and input gradient of one model on `gpu` against the CPU,
/// through the generic graph runner and through the fused eval path.
pub fn check_model<D: Driver>(gpu: &GpuBackend<D>, case: &ModelCase) -> Result<Vec<Check>> {
    Ok(check_model_outputs(gpu, case)?.0)
}

/// [`check_model`], also returning both GPU paths' outputs (formula input,
/// labels `(3n + 1) mod classes`, mean cross-entropy).
pub fn check_model_outputs<D: Driver>(
    gpu: &GpuBackend<D>,
    case: &ModelCase,
) -> Result<(Vec<Check>, ModelOutputs)> {
    let graph = build(&ModelSpec::new(case.arch, case.input, case.classes))?;
    let params = formula_params(&graph);
    let x = formula_input(&graph.input_shape(case.batch));
    let (cl, cdx) = logits_and_input_grad(&CpuBackend::REFERENCE, &graph, &params, &x)?;
    let ties = maxpool_near_ties(&graph, &params, &x, 1e-5)?;
    let group = format!(
        "{} {}x{}x{} batch {}",
        case.arch, case.input[0], case.input[1], case.input[2], case.batch
    );
    let mut s = Suite::new(gpu, &group, 0);
    let (ltol, gtol) = model_tolerances_in(case.deep, gpu.precision(), gemm_layers(&graph));
    let (gl, gdx) = logits_and_input_grad(gpu, &graph, &params, &x)?;
    s.metric(
        "logits (graph runner)".into(),
        scaled_max_diff(gl.data(), cl.data()),
        ltol,
    );
    let mut compared = dx_check(&mut s, "graph runner", &gdx, &cdx, &ties, gtol);
    let n = case.batch;
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % case.classes).collect();
    let weights = vec![1.0 / n as f32; n];
    // The eval-mode fused graph (what the search runs) on the GPU, and on
    // the CPU against the CPU's plain graph.
    let fused = DeviceModel::upload(gpu, &graph, &params)?;
    let out = fused.pass(gpu.upload(&x)?, &labels, &weights)?;
    let (fl, fdx) = (out.logits, gpu.download(&out.dx)?);
    s.metric(
        "logits (fused: BN folded, ReLU fused)".into(),
        scaled_max_diff(fl.data(), cl.data()),
        ltol,
    );
    compared += dx_check(&mut s, "fused", &fdx, &cdx, &ties, gtol);
    s.metric(
        "logits (fused graph against graph runner, both on the GPU)".into(),
        scaled_max_diff(fl.data(), gl.data()),
        ltol,
    );
    dx_check(
        &mut s,
        "fused graph against graph runner, both on the GPU",
        &fdx,
        &gdx,
        &ties,
        gtol,
    );
    let cpu_fused = DeviceModel::upload(&CpuBackend::REFERENCE, &graph, &params)?;
    let out = cpu_fused.pass(CpuBackend::REFERENCE.upload(&x)?, &labels, &weights)?;
    s.metric(
        "logits (CPU fused graph against CPU graph)".into(),
        scaled_max_diff(out.logits.data(), cl.data()),
        ltol,
    );
    compared += dx_check(&mut s, "CPU fused graph", &out.dx, &cdx, &ties, gtol);
    s.property("at least one input gradient compared", compared > 0);
    Ok((
        s.out,
        ModelOutputs {
            runner: (gl, gdx),
            fused: (fl, fdx),
        },
    ))
}

/// Positions where two signed steps differ although the reference
/// gradient's sign is unambiguous (|g| >= 1e-7 * max|g|).
pub fn mask_step_mismatches(got: &Tensor, want: &Tensor, want_grad: &Tensor) -> usize {
    let floor = 1e-7 * want_grad.max_abs();
    (0..want.len())
        .filter(|&i| want_grad.data()[i].abs() >= floor && got.data()[i] != want.data()[i])
        .count()
}

/// One batched search step (S = 3 searches of B = 4 images, three target
/// classes) of `case`'s model on `gpu` against the CPU: logits, mask
/// gradient and the stepped mask, through the search's own step: with the
/// GPU's fused runner (what the search uses) and with the generic graph
/// runner.
pub fn check_search_step<D: Driver>(gpu: &GpuBackend<D>, case: &ModelCase) -> Result<Vec<Check>> {
    let graph = build(&ModelSpec::new(case.arch, case.input, case.classes))?;
    let params = formula_params(&graph);
    let [c, h, w] = case.input;
    let (s, b) = (3usize, 4usize);
    let mut su = Suite::new(gpu, &format!("search step {} S={s} B={b}", case.arch), 7);
    let canvas = su.rand(&[s, c, h, w], 0.0, 1.0);
    let others = su.rand(&[s * b, c, h, w], 0.0, 1.0);
    let mask = Tensor::full(&[s, h, w], 0.5);
    let targets = [3usize, 0, 7].map(|t| t % case.classes);
    let cfg = MaskConfig {
        batch: b,
        ..MaskConfig::default()
    };
    // The reference: the CPU's plain graph.
    let cpu_params = params
        .iter()
        .map(|t| CpuBackend::REFERENCE.upload(t))
        .collect::<Result<Vec<_>>>()?;
    let cpu_model = DeviceModel::generic(&CpuBackend::REFERENCE, &graph, cpu_params);
    let want = search_step(&cpu_model, &canvas, &mask, &others, &targets, &cfg, false)?;
    // The search's own model (the fused graph), and the plain graph on the
    // same device.
    let native = DeviceModel::upload(gpu, &graph, &params)?;
    if !native.is_fused() {
        return Err(Error::Msg(
            "the search's model does not run the fused graph".into(),
        ));
    }
    let got = search_step(&native, &canvas, &mask, &others, &targets, &cfg, false)?;
    let generic = DeviceModel::generic(gpu, &graph, native.into_params());
    let got_g = search_step(&generic, &canvas, &mask, &others, &targets, &cfg, false)?;
    let (ltol, gtol) = model_tolerances_in(case.deep, gpu.precision(), gemm_layers(&graph));
    for (tag, g) in [
        ("search, fused graph", &got),
        ("generic graph runner", &got_g),
    ] {
        su.metric(
            format!("logits ({tag})"),
            scaled_max_diff(g.logits.data(), want.logits.data()),
            ltol,
        );
        su.metric(
            format!("dmask rel L2 ({tag})"),
            rel_l2(g.dmask.data(), want.dmask.data()),
            gtol,
        );
        let bad = mask_step_mismatches(&g.masks, &want.masks, &want.dmask);
        su.metric(format!("mask positions differing ({tag})"), bad as f64, 0.0);
    }
    Ok(su.out)
}

/// One training step (train-mode BN, all parameter gradients, SGD with
/// momentum) of `case`'s model on `gpu` against the CPU.
pub fn check_train_step<D: Driver>(gpu: &GpuBackend<D>, case: &ModelCase) -> Result<Vec<Check>> {
    let graph = build(&ModelSpec::new(case.arch, case.input, case.classes))?;
    let params = formula_params(&graph);
    let n = case.batch.max(2);
    let x = formula_input(&graph.input_shape(n));
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % case.classes).collect();
    let sgd = SgdParams {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    fn step<B: Backend>(
        be: &B,
        graph: &Graph,
        params: &[Tensor],
        x: &Tensor,
        labels: &[usize],
        sgd: SgdParams,
    ) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>, Tensor)> {
        let mut p = params
            .iter()
            .map(|t| be.upload(t))
            .collect::<Result<Vec<_>>>()?;
        let n = labels.len();
        let trace = graph.forward_train(be, &mut p, be.upload(x)?, 0.1)?;
        let (_, dl) = be.softmax_cross_entropy(trace.logits(), labels, &vec![1.0 / n as f32; n])?;
        let grads = graph.backward(be, &p, &trace, dl, true)?;
        let dx = be.download(&grads.dx)?;
        let mut host_grads = Vec::new();
        for (i, g) in grads.params.iter().enumerate() {
            host_grads.push(g.as_ref().map(|g| be.download(g)).transpose()?);
            if let Some(g) = g {
                let mut v = be.zeros(be.shape(g))?;
                let decay = if graph.params[i].kind.decays() {
                    sgd.weight_decay
                } else {
                    0.0
                };
                be.sgd_step(
                    &mut p[i],
                    g,
                    &mut v,
                    SgdParams {
                        weight_decay: decay,
                        ..sgd
                    },
                )?;
            }
        }
        let after = p
            .iter()
            .map(|b| be.download(b))
            .collect::<Result<Vec<_>>>()?;
        Ok((after, host_grads, dx))
    }
    let (cp, cg, cdx) = step(&CpuBackend::REFERENCE, &graph, &params, &x, &labels, sgd)?;
    let (gp, gg, gdx) = step(gpu, &graph, &params, &x, &labels, sgd)?;
    let mut su = Suite::new(gpu, &format!("train step {} batch {n}", case.arch), 0);
    let (_, gtol) = model_tolerances_in(case.deep, gpu.precision(), gemm_layers(&graph));
    su.metric("dx rel L2".into(), rel_l2(gdx.data(), cdx.data()), gtol);
    // Gradients that are analytically zero (a conv bias feeding train-mode
    // batch norm: the normalisation removes any constant) come out of both
    // implementations as rounding noise, where a relative error means
    // nothing; they are held to an absolute 1e-6 of the largest gradient.
    let norm = |t: &Tensor| {
        t.data()
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let big = cg.iter().flatten().map(norm).fold(0.0f64, f64::max);
    let (mut worst_g, mut worst_zero, mut worst_p, mut count) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for i in 0..params.len() {
        match (&gg[i], &cg[i]) {
            (Some(g), Some(c)) if norm(c) < 1e-6 * big => {
                let d: Vec<f32> = g.data().iter().zip(c.data()).map(|(a, b)| a - b).collect();
                worst_zero = worst_zero.max(norm(&Tensor::new(g.shape(), d)?) / (1e-6 * big));
            }
            (Some(g), Some(c)) => {
                worst_g = worst_g.max(rel_l2(g.data(), c.data()));
                count += 1;
            }
            (None, None) => {}
            _ => worst_g = f64::INFINITY,
        }
        worst_p = worst_p.max(rel_l2(gp[i].data(), cp[i].data()));
    }
    su.metric(
        format!("worst parameter gradient rel L2 ({count} tensors)"),
        worst_g,
        gtol,
    );
    su.metric(
        "analytically zero gradients: |diff| / (1e-6 max |grad|)".into(),
        worst_zero,
        1.0,
    );
    su.metric(
        "worst parameter/running statistic after the step, rel L2".into(),
        worst_p,
        gtol,
    );
    Ok(su.out)
}
