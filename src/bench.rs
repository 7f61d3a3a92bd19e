//! `cwp bench`: throughput of the engine on one device.
//!
//! - **Forward + backward to the input** (eval mode, frozen weights: what the
//!   search runs) of zoo models at several batch sizes, in images per second.
//!   Through the graph runner on the eval-mode fused graph (BN folded, ReLU
//!   and residual adds fused), as the search runs.
//! - **Search steps per second**: the authors' step (composite, forward,
//!   weighted cross-entropy, backward to the input, mask gradient, signed
//!   step) for S searches of B = 4 images batched into one step, and S = 1
//!   (the authors' eager batch 4). Timed on the step a run makes, a
//!   [`crate::search::window::Window`] that gathers its batch on the device
//!   and reads its results back once per window.
//! - **Convolution kernels** (GPU): forward, backward-data and
//!   backward-filter on every distinct convolution of a model at a batch
//!   size, in TFLOP/s and as a share of the dense peak of the mode timed.
//!
//! Every figure is a median of timed repetitions after warm-up; GPU work is
//! synchronised before a clock is read.

use std::time::Instant;

use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::gpu::driver::Driver;
use crate::backend::gpu::GpuBackend;
use crate::backend::Device;
use crate::backend::{Backend, ConvParams, Precision};
use crate::error::{Error, Result};
use crate::graph::fuse::fuse;
use crate::graph::{Graph, Op};
use crate::selftest::{formula_input, formula_params};
use crate::tensor::Tensor;
use crate::zoo::{build, ModelSpec};

/// `(arch, input [C, H, W], sizes)` entries of a plan.
pub type Plan = Vec<(String, [usize; 3], Vec<usize>)>;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `(arch, input, batch sizes)` for forward + backward to the input.
    pub models: Plan,
    /// `(arch, input, searches S)` for batched search steps (B = 4 each).
    pub search: Plan,
    /// `(arch, input, batch sizes)` for training steps (train-mode BN, SGD).
    pub train: Plan,
    /// `(arch, input, batch)` whose convolutions are timed one by one.
    pub convs: Vec<(String, [usize; 3], usize)>,
    /// Seconds of timed repetitions per measurement (after warm-up).
    pub seconds: f64,
}

impl BenchConfig {
    /// The default plan for a device kind: large batches on a GPU, the
    /// peers' batch sizes on the CPU (see `benches/peers/README.md`).
    pub fn default_for(gpu: bool) -> BenchConfig {
        let s = |a: &str| a.to_string();
        if gpu {
            BenchConfig {
                models: vec![
                    (s("smallcnn"), [1, 28, 28], vec![4, 64, 256]),
                    (s("resnet18"), [3, 32, 32], vec![4, 64, 256]),
                    (s("resnet34"), [3, 32, 32], vec![4, 256]),
                    (s("resnet50"), [3, 32, 32], vec![4, 64, 256]),
                    (s("preact_resnet18"), [3, 32, 32], vec![4, 256]),
                    (s("vgg16"), [3, 32, 32], vec![4, 256]),
                    (s("wrn28_10"), [3, 32, 32], vec![4, 64]),
                    (s("resnet50_imagenet"), [3, 224, 224], vec![1, 32]),
                ],
                search: vec![
                    (s("smallcnn"), [1, 28, 28], vec![1, 40]),
                    (s("resnet18"), [3, 32, 32], vec![1, 40]),
                    (s("resnet50"), [3, 32, 32], vec![1, 40]),
                ],
                train: vec![
                    (s("smallcnn"), [1, 28, 28], vec![256]),
                    (s("resnet18"), [3, 32, 32], vec![256]),
                ],
                convs: vec![(s("resnet50"), [3, 32, 32], 256)],
                seconds: 0.5,
            }
        } else {
            BenchConfig {
                models: vec![
                    (s("smallcnn"), [1, 28, 28], vec![128]),
                    (s("resnet18"), [3, 32, 32], vec![32]),
                    (s("resnet50"), [3, 32, 32], vec![16]),
                ],
                search: vec![(s("smallcnn"), [1, 28, 28], vec![1, 10])],
                train: vec![(s("smallcnn"), [1, 28, 28], vec![128])],
                convs: vec![],
                seconds: 1.0,
            }
        }
    }
}

/// Forward + backward-to-input throughput of one model at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    /// Architecture.
    pub arch: String,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Images per batch.
    pub batch: usize,
    /// Median seconds per batch.
    pub seconds: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Forward + backward-data FLOP/s (2x the forward's multiply-adds x 2).
    pub tflops: f64,
}

/// Batched search steps of one model.
#[derive(Clone, Debug, Serialize)]
pub struct SearchRow {
    /// Architecture.
    pub arch: String,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Searches batched into one step.
    pub searches: usize,
    /// Images per search per step.
    pub batch: usize,
    /// Median seconds per step.
    pub seconds: f64,
    /// Steps per second (each advances `searches` searches by one step).
    pub steps_per_s: f64,
    /// Search-steps per second: `searches * steps_per_s`.
    pub search_steps_per_s: f64,
}

/// Training steps of one model at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct TrainRow {
    /// Architecture.
    pub arch: String,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Images per batch.
    pub batch: usize,
    /// Median seconds per step.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_s: f64,
}

/// One convolution, three kernels.
#[derive(Clone, Debug, Serialize)]
pub struct ConvRow {
    /// Model whose layer this is.
    pub arch: String,
    /// Input `[N, C, H, W]`.
    pub x: Vec<usize>,
    /// Filter `[O, C, KH, KW]`.
    pub w: Vec<usize>,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    /// How many layers of the model have this shape.
    pub count: usize,
    /// FLOPs of one kernel call (`2 * N*P*Q * O * C*KH*KW`).
    pub flops: f64,
    /// TFLOP/s of forward, backward-data, backward-filter.
    pub tflops: [f64; 3],
}

/// Everything `cwp bench` measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Device description.
    pub device: String,
    /// The backend's arithmetic (`cpu fp32 winograd-forward`, `cuda tf32`,
    /// ...), so that a figure says which path it timed.
    pub numerics: String,
    /// The dense peak of the arithmetic timed (the f32 units for `fp32`,
    /// the tensor cores in the other modes), TFLOP/s, if known: the
    /// percentages of the convolution table are shares of it.
    pub peak_tflops: Option<f64>,
    /// Forward + backward-to-input throughput.
    pub models: Vec<ModelRow>,
    /// Search steps.
    pub search: Vec<SearchRow>,
    /// Training steps.
    pub train: Vec<TrainRow>,
    /// Convolution kernels.
    pub convs: Vec<ConvRow>,
    /// FLOP-weighted TFLOP/s over all timed convolutions, per kernel
    /// (forward, backward-data, backward-filter) and over all three.
    pub conv_tflops_weighted: Option<[f64; 4]>,
}

/// The dense peak of `device` in precision `p`, TFLOP/s:
/// `CWP_PEAK_TFLOPS` when set, else that of a known part. H100/H200 SXM:
/// f32 units 132 SMs x 128 lanes x 2 x 1.98 GHz = 66.9; bf16 tensor cores
/// 790, as a product of 8192-square bf16 matrices measured on an H200
/// (the datasheet's 989 is not reached); tf32 half of that; tf32x3 a
/// third of tf32's, since it issues three products per term.
pub fn mode_peak(device: &str, p: Precision) -> Option<f64> {
    if let Some(v) = std::env::var("CWP_PEAK_TFLOPS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Some(v);
    }
    let hopper =
        device.contains("H200") || device.contains("H100 80GB HBM3") || device.contains("H100 SXM");
    hopper.then_some(match p {
        Precision::Fp32 => 66.9,
        Precision::Tf32x3 => 395.0 / 3.0,
        Precision::Tf32 => 395.0,
        Precision::Bf16 => 790.0,
    })
}

/// Median seconds of `f` over repetitions filling about `seconds`, after
/// two warm-up runs; `sync` waits for the device.
fn time(
    seconds: f64,
    mut f: impl FnMut() -> Result<()>,
    sync: &dyn Fn() -> Result<()>,
) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    sync()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < seconds && times.len() < 200) {
        let t = Instant::now();
        f()?;
        sync()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn labels(n: usize, classes: usize) -> Vec<usize> {
    (0..n).map(|i| (3 * i + 1) % classes).collect()
}

/// A zoo architecture at `input`, or an ONNX file (its graph and input
/// come from the file). Either is timed with the formula weights: speed
/// does not depend on their values, and the same graph times the same.
fn model_graph(arch: &str, input: [usize; 3]) -> Result<Graph> {
    if arch.ends_with(".onnx") {
        let opts = crate::weights::LoadOptions::default();
        return Ok(crate::weights::Model::load(std::path::Path::new(arch), &opts)?.graph);
    }
    let classes = if input[1] >= 224 { 1000 } else { 10 };
    build(&ModelSpec::new(arch, input, classes))
}

/// Runs the plan on a chosen device.
pub fn run(dev: &Device, cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    match dev {
        Device::Cpu(cpu) => bench_cpu(cpu, cfg, progress),
        Device::Cuda(gpu) => bench_gpu(gpu, cfg, progress),
        Device::Emu(gpu) => bench_gpu(gpu, cfg, progress),
    }
}

/// The eval-mode fused graph of `plain` and its parameters (the formula
/// weights, BN folded on `be`), as the search runs it.
fn fused_model<B: Backend>(be: &B, plain: &Graph) -> Result<(Graph, Vec<B::Buf>)> {
    let f = fuse(plain)?;
    let mut params = formula_params(plain)
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<Vec<_>>>()?;
    let folded = f.folded_params(be, &params)?;
    params.extend(folded);
    Ok((f.graph, params))
}

fn bench_cpu(
    cpu: &CpuBackend,
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let sync = || Ok(());
    let mut models = Vec::new();
    for (arch, input, batches) in &cfg.models {
        let plain = model_graph(arch, *input)?;
        let input = &plain.input;
        let (graph, params) = fused_model(cpu, &plain)?;
        for &n in batches {
            progress(&format!("{arch} batch {n}"));
            let x = formula_input(&graph.input_shape(n));
            let y = labels(n, graph.num_classes);
            let w = vec![1.0 / n as f32; n];
            let secs = time(
                cfg.seconds,
                || {
                    let t = graph.forward_trace(cpu, &params, x.clone())?;
                    let (_, dl) = cpu.softmax_cross_entropy(t.logits(), &y, &w)?;
                    graph.backward(cpu, &params, &t, dl, false).map(|_| ())
                },
                &sync,
            )?;
            models.push(model_row(arch, *input, n, secs, &graph));
        }
    }
    let search = search_rows(cpu, cfg, 1, &sync, progress)?;
    let train = train_rows(cpu, cfg, &sync, progress)?;
    let (convs, conv_tflops_weighted) = conv_rows(cpu, cfg, &sync, progress)?;
    Ok(BenchReport {
        device: cpu.name(),
        numerics: cpu.numerics(),
        peak_tflops: None,
        models,
        search,
        train,
        convs,
        conv_tflops_weighted,
    })
}

/// Training steps of the plan's models: the step `cwp train` runs
/// ([`crate::train::train_step`]: batch upload, train-mode forward, mean
/// cross-entropy, backward with parameter gradients, SGD with momentum and
/// weight decay), from the formula weights at a small learning rate.
fn train_rows<B: Backend>(
    be: &B,
    cfg: &BenchConfig,
    sync: &dyn Fn() -> Result<()>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TrainRow>> {
    let mut rows = Vec::new();
    for (arch, input, batches) in &cfg.train {
        let graph = model_graph(arch, *input)?;
        let classes = graph.num_classes;
        let tc = crate::train::TrainConfig::defaults(&ModelSpec::new(arch, graph.input, classes));
        for &n in batches {
            progress(&format!("{arch} training batch {n}"));
            let mut params = formula_params(&graph)
                .iter()
                .map(|t| be.upload(t))
                .collect::<Result<Vec<_>>>()?;
            let mut velocity = graph
                .params
                .iter()
                .map(|p| be.zeros(&p.shape))
                .collect::<Result<Vec<_>>>()?;
            let x = formula_input(&graph.input_shape(n));
            let y = labels(n, graph.num_classes);
            let secs = time(
                cfg.seconds,
                || {
                    let xb = be.upload(&x)?;
                    crate::train::train_step(
                        be,
                        &graph,
                        &mut params,
                        &mut velocity,
                        xb,
                        &y,
                        1e-3,
                        &tc,
                    )
                    .map(|_| ())
                },
                sync,
            )?;
            rows.push(TrainRow {
                arch: arch.clone(),
                input: graph.input,
                batch: n,
                seconds: secs,
                images_per_s: n as f64 / secs,
            });
        }
    }
    Ok(rows)
}

fn model_row(arch: &str, input: [usize; 3], n: usize, secs: f64, graph: &Graph) -> ModelRow {
    // Forward multiply-adds x 2 (flops_per_image), and about as many again
    // for the backward-data pass.
    let flops = 2.0 * graph.flops_per_image() as f64 * n as f64;
    ModelRow {
        arch: arch.to_string(),
        input,
        batch: n,
        seconds: secs,
        images_per_s: n as f64 / secs,
        tflops: flops / secs / 1e12,
    }
}

fn search_row(arch: &str, input: [usize; 3], s: usize, b: usize, secs: f64) -> SearchRow {
    SearchRow {
        arch: arch.to_string(),
        input,
        searches: s,
        batch: b,
        seconds: secs,
        steps_per_s: 1.0 / secs,
        search_steps_per_s: s as f64 / secs,
    }
}

/// Steps of one timed search window on a GPU: a run reads its results back
/// once per window, so the time per step includes that wait shared over a
/// window's steps, as in a run (whose windows are up to 64 steps long).
const GPU_WINDOW_STEPS: usize = 8;

/// Search steps of the plan's models, timed on the step a run makes
/// ([`crate::search::window::Window`]: batch gathered on the device,
/// composite, forward, cross-entropy, backward to the input, mask gradient,
/// signed step, results left on the device): windows of `steps` steps read
/// back at their end, the time divided by `steps`.
fn search_rows<B: Backend>(
    be: &B,
    cfg: &BenchConfig,
    steps: usize,
    sync: &dyn Fn() -> Result<()>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<SearchRow>> {
    let mut rows = Vec::new();
    for (arch, input, ss) in &cfg.search {
        let graph = model_graph(arch, *input)?;
        let input = graph.input;
        let model = crate::device_model::DeviceModel::upload(be, &graph, &formula_params(&graph))?;
        let mc = crate::search::MaskConfig {
            batch: 4,
            ..crate::search::MaskConfig::default()
        };
        for &s in ss {
            progress(&format!("{arch} search S={s}"));
            let (canvas, mask, others) = search_inputs(input, s, mc.batch);
            let images = be.upload(&others)?;
            let table: Vec<u32> = (0..steps).flat_map(|_| 0..(s * mc.batch) as u32).collect();
            let (targets, learn) = (vec![1usize; s], vec![false; s]);
            let secs = time(
                cfg.seconds,
                || {
                    let mut win = crate::search::window::Window::new(
                        &model, &mc, &images, &table, &targets, &learn, &canvas, &mask, steps,
                    )?;
                    while !win.is_full() {
                        win.step()?;
                    }
                    win.finish().map(|_| ())
                },
                sync,
            )?;
            rows.push(search_row(arch, input, s, mc.batch, secs / steps as f64));
        }
    }
    Ok(rows)
}

/// Canvases, a mask at 0.5 and other images for `s` searches of `b`.
fn search_inputs(input: [usize; 3], s: usize, b: usize) -> (Tensor, Tensor, Tensor) {
    let [c, h, w] = input;
    let canvas = formula_input(&[s, c, h, w]);
    let others = Tensor::from_fn(&[s * b, c, h, w], |i| ((i * 7919) % 1000) as f32 / 1000.0);
    (canvas, Tensor::full(&[s, h, w], 0.5), others)
}

fn bench_gpu<D: Driver>(
    gpu: &GpuBackend<D>,
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let sync = || gpu.synchronize();
    let mut models = Vec::new();
    for (arch, input, batches) in &cfg.models {
        let plain = model_graph(arch, *input)?;
        let input = &plain.input;
        let (graph, params) = fused_model(gpu, &plain)?;
        for &n in batches {
            progress(&format!("{arch} batch {n}"));
            let x = gpu.upload(&formula_input(&graph.input_shape(n)))?;
            let y = labels(n, graph.num_classes);
            let w = vec![1.0 / n as f32; n];
            let secs = time(
                cfg.seconds,
                || {
                    let t = graph.forward_trace(gpu, &params, gpu.reshape(&x, x.shape())?)?;
                    let (_, dl) = gpu.softmax_cross_entropy(t.logits(), &y, &w)?;
                    graph.backward(gpu, &params, &t, dl, false).map(|_| ())
                },
                &sync,
            )?;
            models.push(model_row(arch, *input, n, secs, &graph));
        }
    }
    let search = search_rows(gpu, cfg, GPU_WINDOW_STEPS, &sync, progress)?;
    let train = train_rows(gpu, cfg, &sync, progress)?;
    let (convs, weighted) = conv_rows(gpu, cfg, &sync, progress)?;
    let device = gpu.name();
    Ok(BenchReport {
        peak_tflops: mode_peak(&device, gpu.precision()),
        numerics: gpu.numerics(),
        device,
        models,
        search,
        train,
        convs,
        conv_tflops_weighted: weighted,
    })
}

/// Timed convolutions and their FLOP-weighted TFLOP/s per kernel and over
/// all three (`None` without convolutions).
type ConvFigures = (Vec<ConvRow>, Option<[f64; 4]>);

/// The plan's convolutions, each shape once ([`conv_layers`]), timed by
/// [`time_conv`].
fn conv_rows<B: Backend>(
    be: &B,
    cfg: &BenchConfig,
    sync: &dyn Fn() -> Result<()>,
    progress: &mut dyn FnMut(&str),
) -> Result<ConvFigures> {
    let mut convs = Vec::new();
    for (arch, input, n) in &cfg.convs {
        let graph = model_graph(arch, *input)?;
        for (x_shape, w_shape, p, count) in conv_layers(&graph, *n) {
            progress(&format!("{arch} conv {w_shape:?} on {x_shape:?}"));
            convs.push(time_conv(
                be,
                sync,
                arch,
                &x_shape,
                &w_shape,
                p,
                count,
                cfg.seconds,
            )?);
        }
    }
    let weighted = (!convs.is_empty()).then(|| {
        let mut t = [0.0f64; 3];
        let mut total = 0.0;
        for r in &convs {
            let f = r.flops * r.count as f64;
            total += f;
            for (tk, rk) in t.iter_mut().zip(r.tflops) {
                *tk += f / (rk * 1e12);
            }
        }
        [
            total / t[0] / 1e12,
            total / t[1] / 1e12,
            total / t[2] / 1e12,
            3.0 * total / (t[0] + t[1] + t[2]) / 1e12,
        ]
    });
    Ok((convs, weighted))
}

/// The distinct convolutions of a graph at batch `n`: `(x shape, w shape,
/// params, how many layers)`, in order of first appearance.
pub fn conv_layers(graph: &Graph, n: usize) -> Vec<(Vec<usize>, Vec<usize>, ConvParams, usize)> {
    let mut out: Vec<(Vec<usize>, Vec<usize>, ConvParams, usize)> = Vec::new();
    for node in &graph.nodes {
        if let Op::Conv { w, p, .. } = node.op {
            let src = &graph.nodes[node.inputs[0]].shape;
            let x: Vec<usize> = std::iter::once(n).chain(src.iter().copied()).collect();
            let ws = graph.params[w].shape.clone();
            match out.iter_mut().find(|e| e.0 == x && e.1 == ws && e.2 == p) {
                Some(e) => e.3 += 1,
                None => out.push((x, ws, p, 1)),
            }
        }
    }
    out
}

/// Times forward, backward-data and backward-filter of one convolution.
#[allow(clippy::too_many_arguments)]
pub fn time_conv<B: Backend>(
    be: &B,
    sync: &dyn Fn() -> Result<()>,
    arch: &str,
    x_shape: &[usize],
    w_shape: &[usize],
    p: ConvParams,
    count: usize,
    seconds: f64,
) -> Result<ConvRow> {
    let x = be.upload(&Tensor::from_fn(x_shape, |i| {
        ((i * 31) % 97) as f32 / 97.0 - 0.5
    }))?;
    let w = be.upload(&Tensor::from_fn(w_shape, |i| {
        ((i * 17) % 89) as f32 / 890.0 - 0.05
    }))?;
    let y = be.conv2d(&x, &w, None, p)?;
    let ys = be.shape(&y).to_vec();
    let flops = 2.0
        * (ys[0] * ys[2] * ys[3]) as f64
        * ys[1] as f64
        * (w_shape[1] * w_shape[2] * w_shape[3]) as f64;
    let t0 = time(seconds, || be.conv2d(&x, &w, None, p).map(|_| ()), sync)?;
    let t1 = time(
        seconds,
        || be.conv2d_backward_data(&y, &w, x_shape, p).map(|_| ()),
        sync,
    )?;
    let t2 = time(
        seconds,
        || {
            be.conv2d_backward_filter(&x, &y, w_shape, p, false)
                .map(|_| ())
        },
        sync,
    )?;
    Ok(ConvRow {
        arch: arch.to_string(),
        x: x_shape.to_vec(),
        w: w_shape.to_vec(),
        stride: p.stride,
        pad: p.pad,
        count,
        flops,
        tflops: [flops / t0 / 1e12, flops / t1 / 1e12, flops / t2 / 1e12],
    })
}

/// `CxHxW`.
fn shape(input: &[usize; 3]) -> String {
    format!("{}x{}x{}", input[0], input[1], input[2])
}

/// The report as a plain-text table.
pub fn format_report(r: &BenchReport) -> String {
    let mut s = format!("device: {} ({})\n", r.device, r.numerics);
    s += "\nforward + backward to the input\n";
    s += &format!(
        "{:<20} {:>12} {:>6} {:>12} {:>10}\n",
        "model", "input", "batch", "images/s", "TFLOP/s"
    );
    for m in &r.models {
        s += &format!(
            "{:<20} {:>12} {:>6} {:>12.1} {:>10.2}\n",
            m.arch,
            shape(&m.input),
            m.batch,
            m.images_per_s,
            m.tflops
        );
    }
    s += "\nsearch steps (B = 4 images per search)\n";
    s += &format!(
        "{:<20} {:>9} {:>10} {:>16}\n",
        "model", "searches", "steps/s", "search-steps/s"
    );
    for m in &r.search {
        s += &format!(
            "{:<20} {:>9} {:>10.1} {:>16.1}\n",
            m.arch, m.searches, m.steps_per_s, m.search_steps_per_s
        );
    }
    if !r.train.is_empty() {
        s += "\ntraining steps (train-mode BN, SGD with momentum)\n";
        s += &format!(
            "{:<20} {:>12} {:>6} {:>12}\n",
            "model", "input", "batch", "images/s"
        );
        for m in &r.train {
            s += &format!(
                "{:<20} {:>12} {:>6} {:>12.1}\n",
                m.arch,
                shape(&m.input),
                m.batch,
                m.images_per_s
            );
        }
    }
    if !r.convs.is_empty() {
        let pct = |t: f64| {
            r.peak_tflops
                .map_or(String::new(), |p| format!(" ({:.0}%)", 100.0 * t / p))
        };
        s += "\nconvolution kernels, TFLOP/s (share of the dense peak of the arithmetic timed)\n";
        // A CPU's figures are a fraction of a TFLOP/s: keep three digits.
        let tf = |t: f64| {
            let digits = if t < 1.0 { 3 } else { 1 };
            format!("{t:.digits$}{}", pct(t))
        };
        for c in &r.convs {
            s += &format!(
                "{:?} on {:?} s{} p{} x{}: fwd {} dgrad {} wgrad {}\n",
                c.w,
                c.x,
                c.stride,
                c.pad,
                c.count,
                tf(c.tflops[0]),
                tf(c.tflops[1]),
                tf(c.tflops[2]),
            );
        }
        if let Some(w) = r.conv_tflops_weighted {
            s += &format!(
                "FLOP-weighted: fwd {} dgrad {} wgrad {} all {}\n",
                tf(w[0]),
                tf(w[1]),
                tf(w[2]),
                tf(w[3]),
            );
        }
    }
    s
}

/// Parses `ARCH[:CxHxW]:B1,B2,..` lists (the `--models`, `--search`,
/// `--train` and `--convs` options); `none` is the empty plan.
pub fn parse_plan(spec: &str, option: &str) -> Result<Plan> {
    let mut out = Vec::new();
    // `none` leaves a section out, so one figure can be timed alone.
    if spec.trim() == "none" {
        return Ok(out);
    }
    for item in spec.split(';').filter(|s| !s.trim().is_empty()) {
        let parts: Vec<&str> = item.trim().split(':').collect();
        let bad = || Error::arg(option, format!("`{item}`: expected ARCH[:CxHxW]:N[,N..]"));
        let (arch, input, sizes) = match parts.as_slice() {
            [a, n] => (*a, ModelSpec::default_input(a), *n),
            [a, shape, n] => {
                let d: Vec<usize> = shape
                    .split('x')
                    .map(|v| v.parse())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| bad())?;
                let d: [usize; 3] = d.try_into().map_err(|_| bad())?;
                (*a, d, *n)
            }
            _ => return Err(bad()),
        };
        let sizes: Vec<usize> = sizes
            .split(',')
            .map(|v| v.parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        if sizes.is_empty() || sizes.contains(&0) {
            return Err(bad());
        }
        out.push((arch.to_string(), input, sizes));
    }
    Ok(out)
}
