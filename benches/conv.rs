//! Throughput of the CPU backend's convolutions on the layer shapes of a
//! CIFAR ResNet-18 at batch 32: forward, backward-data, backward-filter;
//! and the direct backward-data beside it where the default is Winograd
//! (`backward_data_direct`).
//! (Whole models are in `benches/models.rs`.)
//!
//! Run: `cargo bench --bench conv` (criterion reports elements/s; an
//! element is one floating-point operation, so it reads as FLOP/s).

use std::hint::black_box;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::{Backend, ConvParams};
use classwise::Tensor;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BATCH: usize = 32;

/// One convolution shape: channels in and out, input extent, kernel, stride.
struct Layer {
    name: &'static str,
    c: usize,
    o: usize,
    hw: usize,
    k: usize,
    stride: usize,
}

const fn layer(
    name: &'static str,
    c: usize,
    o: usize,
    hw: usize,
    k: usize,
    stride: usize,
) -> Layer {
    Layer {
        name,
        c,
        o,
        hw,
        k,
        stride,
    }
}

/// The distinct convolution shapes of ResNet-18 on 3x32x32 inputs.
const LAYERS: [Layer; 14] = [
    layer("32-32@28", 32, 32, 28, 3, 1),
    layer("32-64@14", 32, 64, 14, 3, 1),
    layer("64-64@14", 64, 64, 14, 3, 1),
    layer("3-64@32", 3, 64, 32, 3, 1),
    layer("64-64@32", 64, 64, 32, 3, 1),
    layer("64-128s2@32", 64, 128, 32, 3, 2),
    layer("128-128@16", 128, 128, 16, 3, 1),
    layer("128-256s2@16", 128, 256, 16, 3, 2),
    layer("256-256@8", 256, 256, 8, 3, 1),
    layer("256-512s2@8", 256, 512, 8, 3, 2),
    layer("512-512@4", 512, 512, 4, 3, 1),
    layer("1x1-64-128s2@32", 64, 128, 32, 1, 2),
    layer("1x1-128-256s2@16", 128, 256, 16, 1, 2),
    layer("1x1-256-512s2@8", 256, 512, 8, 1, 2),
];

/// Deterministic values in [-1, 1) without a random-number crate.
fn filled(shape: &[usize], seed: u32) -> Tensor {
    Tensor::from_fn(shape, |i| {
        let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
        (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    })
}

fn conv_layers(c: &mut Criterion) {
    let be = CpuBackend::REFERENCE;
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    for l in &LAYERS {
        let p = ConvParams::new(l.stride, l.k / 2);
        let out = p.out_len(l.hw, l.k);
        let flops = 2 * BATCH * l.o * out * out * l.c * l.k * l.k;
        let x = filled(&[BATCH, l.c, l.hw, l.hw], 1);
        let w = filled(&[l.o, l.c, l.k, l.k], 2);
        let dy = filled(&[BATCH, l.o, out, out], 3);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::new("forward", l.name), |b| {
            b.iter(|| be.conv2d(black_box(&x), black_box(&w), None, p).unwrap())
        });
        // Beside the default, the direct path (the reference the faster
        // paths are tested against): where backward-data takes Winograd, the
        // two figures give its gain.
        for (name, q) in [("backward_data", p), ("backward_data_direct", p.direct())] {
            group.bench_function(BenchmarkId::new(name, l.name), |b| {
                b.iter(|| {
                    be.conv2d_backward_data(black_box(&dy), black_box(&w), x.shape(), q)
                        .unwrap()
                })
            });
        }
        group.bench_function(BenchmarkId::new("backward_filter", l.name), |b| {
            b.iter(|| {
                be.conv2d_backward_filter(black_box(&x), black_box(&dy), w.shape(), p, false)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, conv_layers);
criterion_main!(benches);
