//! Forward + backward-to-input of zoo models on the CPU backend (weights
//! frozen, eval mode): images per second, the figure PyTorch's CPU path is
//! compared with (benches/peers/torch_cpu_bench.py), plus one search step,
//! one training step, and Neural Cleanse of all classes batched against one
//! class at a time.

use std::hint::black_box;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::graph::Graph;
use classwise::train::init_params;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The model's seed-0 initial parameters on the backend.
fn uploaded(be: &CpuBackend, graph: &Graph) -> Vec<Tensor> {
    init_params(graph, 0)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect()
}

/// A fixed batch of `batch` input images in [0, 1].
fn images(graph: &Graph, batch: usize) -> Tensor {
    Tensor::from_fn(&graph.input_shape(batch), |i| {
        ((i * 37) % 101) as f32 / 100.0
    })
}

fn fwd_bwd(c: &mut Criterion) {
    let be = CpuBackend::REFERENCE;
    let mut g = c.benchmark_group("fwd_bwd_input");
    g.sample_size(10);
    for (arch, input, batch) in [
        ("smallcnn", [1, 28, 28], 128),
        ("resnet18", [3, 32, 32], 32),
        ("preact_resnet18", [3, 32, 32], 32),
        ("resnet50", [3, 32, 32], 16),
    ] {
        let graph = build(&ModelSpec::new(arch, input, 10)).unwrap();
        let params = uploaded(&be, &graph);
        let x = images(&graph, batch);
        let y: Vec<usize> = (0..batch).map(|i| i % 10).collect();
        let w = vec![1.0 / batch as f32; batch];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("{arch}_b{batch}"), |b| {
            b.iter(|| {
                let trace = graph
                    .forward_trace(&be, &params, be.upload(&x).unwrap())
                    .unwrap();
                let (_, dl) = be.softmax_cross_entropy(trace.logits(), &y, &w).unwrap();
                let grads = graph.backward(&be, &params, &trace, dl, false).unwrap();
                black_box(grads.dx);
            })
        });
    }
    g.finish();
}

/// One step of the batched search (S searches of 4 images: composite,
/// forward, backward to the input, mask gradient, signed step), the unit the
/// authors' loop (benches/peers/authors_loop_bench.py) is timed in.
fn search_step(c: &mut Criterion) {
    use classwise::device_model::DeviceModel;
    use classwise::search::optimize::{step, MaskConfig};
    let be = CpuBackend::REFERENCE;
    let mut g = c.benchmark_group("search_step");
    g.sample_size(10);
    for (arch, input, searches) in [
        ("smallcnn", [1, 28, 28], 1),
        ("smallcnn", [1, 28, 28], 20),
        ("resnet18", [3, 32, 32], 1),
        ("resnet18", [3, 32, 32], 10),
    ] {
        let graph = build(&ModelSpec::new(arch, input, 10)).unwrap();
        let params = uploaded(&be, &graph);
        let dm = DeviceModel::new(&be, &graph, params).unwrap();
        let cfg = MaskConfig::default();
        let [ch, h, w] = input;
        let canvases = Tensor::from_fn(&[searches, ch, h, w], |i| ((i * 13) % 97) as f32 / 96.0);
        let masks = Tensor::full(&[searches, h, w], 0.5);
        let others = Tensor::from_fn(&[searches * cfg.batch, ch, h, w], |i| {
            ((i * 37) % 101) as f32 / 100.0
        });
        let targets: Vec<usize> = (0..searches).map(|s| s % 10).collect();
        // Throughput in search steps (one update of one search's mask).
        g.throughput(Throughput::Elements(searches as u64));
        g.bench_function(format!("{arch}_S{searches}"), |b| {
            b.iter(|| {
                black_box(step(&dm, &canvases, &masks, &others, &targets, &cfg, false).unwrap())
            })
        });
    }
    g.finish();
}

/// Neural Cleanse on the shipped BadNets smallcnn, 10 classes, 2 steps of
/// 2 mini-batches of 32: all classes in the same step against one class at
/// a time (the original's order). The same work and the same result; the
/// ratio of the two times is what batching buys (on a GPU mostly: a CPU is
/// already busy at batch 32).
fn cleanse(c: &mut Criterion) {
    use classwise::cleanse::{self, CleanseConfig};
    use classwise::data::{self, DataSpec, Split};
    use classwise::device_model::DeviceModel;
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let Ok(test) = data::load(&spec, Split::Test, Some([1, 28, 28])) else {
        eprintln!("cleanse bench skipped: Fashion-MNIST not installed");
        return;
    };
    let model = classwise::models::BACKDOORED.load().unwrap();
    let be = CpuBackend::REFERENCE;
    let dm = DeviceModel::upload(&be, &model.graph, &model.params).unwrap();
    let mut cfg = CleanseConfig::defaults(10);
    cfg.steps = 2;
    cfg.mini_batches = 2;
    let mut g = c.benchmark_group("cleanse_smallcnn_10_classes");
    g.sample_size(10);
    g.throughput(Throughput::Elements(
        (10 * cfg.steps * cfg.mini_batches * cfg.batch) as u64,
    ));
    for sequential in [false, true] {
        cfg.sequential = sequential;
        let name = if sequential {
            "one_class_at_a_time"
        } else {
            "batched"
        };
        g.bench_function(name, |b| {
            b.iter(|| black_box(cleanse::run(&dm, &test, &cfg, "bench", true).unwrap()))
        });
    }
    g.finish();
}

/// One SGD step of `cwp train` (train-mode forward, loss, backward with
/// parameter gradients, momentum update): `train::train_step` itself.
fn train_step(c: &mut Criterion) {
    use classwise::train::{train_step, TrainConfig};
    let be = CpuBackend::REFERENCE;
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    for (arch, input, batch) in [
        ("smallcnn", [1, 28, 28], 128),
        ("resnet18", [3, 32, 32], 32),
    ] {
        let spec = ModelSpec::new(arch, input, 10);
        let graph = build(&spec).unwrap();
        let cfg = TrainConfig::defaults(&spec);
        let mut params = uploaded(&be, &graph);
        let mut velocity: Vec<_> = graph
            .params
            .iter()
            .map(|p| be.zeros(&p.shape).unwrap())
            .collect();
        let x = images(&graph, batch);
        let y: Vec<usize> = (0..batch).map(|i| i % 10).collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("{arch}_b{batch}"), |b| {
            b.iter(|| {
                let xb = be.upload(&x).unwrap();
                black_box(
                    train_step(&be, &graph, &mut params, &mut velocity, xb, &y, 1e-3, &cfg)
                        .unwrap(),
                );
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fwd_bwd, search_step, train_step, cleanse);
criterion_main!(benches);
