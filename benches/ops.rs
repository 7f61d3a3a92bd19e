//! The CPU reference's other op families (conv has benches/conv.rs) on a
//! resnet18 layer-2 shape at batch 32 ([32, 128, 16, 16]): batch norm, ReLU
//! and add, pooling, softmax cross-entropy, the search ops and the
//! optimiser steps. Throughput in bytes moved (these ops are memory-bound).

use std::hint::black_box;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::{Backend, PoolParams, SgdParams};
use classwise::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn t(shape: &[usize], salt: usize) -> Tensor {
    Tensor::from_fn(shape, |i| {
        (((i * 7919 + salt * 104729) % 1000) as f32 / 500.0) - 1.0
    })
}

fn ops(c: &mut Criterion) {
    let be = CpuBackend::REFERENCE;
    let shape = [32, 128, 16, 16];
    let n: u64 = shape.iter().product::<usize>() as u64;
    let x = be.upload(&t(&shape, 1)).unwrap();
    let dy = be.upload(&t(&shape, 2)).unwrap();
    let ch = |v: f32| be.upload(&Tensor::full(&[128], v)).unwrap();
    let (gamma, beta, mean, var) = (ch(1.1), ch(0.1), ch(0.05), ch(0.9));
    let mut g = c.benchmark_group("ops_cpu");
    g.sample_size(20);

    g.throughput(Throughput::Bytes(8 * n));
    g.bench_function("bn_eval", |b| {
        b.iter(|| {
            black_box(
                be.batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5)
                    .unwrap(),
            )
        })
    });
    g.bench_function("relu", |b| b.iter(|| black_box(be.relu(&x).unwrap())));
    g.throughput(Throughput::Bytes(12 * n));
    g.bench_function("relu_backward", |b| {
        b.iter(|| black_box(be.relu_backward(&dy, &x).unwrap()))
    });
    g.bench_function("add", |b| b.iter(|| black_box(be.add(&x, &dy).unwrap())));
    g.throughput(Throughput::Bytes(12 * n));
    g.bench_function("bn_train_forward", |b| {
        b.iter(|| {
            let (mut rm, mut rv) = (ch(0.0), ch(1.0));
            black_box(
                be.batch_norm_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5)
                    .unwrap(),
            )
        })
    });
    let (mut rm, mut rv) = (ch(0.0), ch(1.0));
    let (_, saved) = be
        .batch_norm_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5)
        .unwrap();
    g.throughput(Throughput::Bytes(16 * n));
    g.bench_function("bn_train_backward", |b| {
        b.iter(|| {
            black_box(
                be.batch_norm_train_backward(&dy, &x, &gamma, &saved)
                    .unwrap(),
            )
        })
    });

    let p = PoolParams::new(2, 2, 0);
    let dyp = be.upload(&t(&[32, 128, 8, 8], 3)).unwrap();
    g.throughput(Throughput::Bytes(5 * n));
    g.bench_function("max_pool_2x2", |b| {
        b.iter(|| black_box(be.max_pool2d(&x, p).unwrap()))
    });
    g.bench_function("max_pool_2x2_backward", |b| {
        b.iter(|| black_box(be.max_pool2d_backward(&x, &dyp, p).unwrap()))
    });
    g.throughput(Throughput::Bytes(4 * n));
    g.bench_function("global_avg_pool", |b| {
        b.iter(|| black_box(be.global_avg_pool(&x).unwrap()))
    });

    let logits = be.upload(&t(&[256, 1000], 4)).unwrap();
    let labels: Vec<usize> = (0..256).map(|i| (i * 37) % 1000).collect();
    let w = vec![1.0 / 256.0; 256];
    g.throughput(Throughput::Bytes(8 * 256 * 1000));
    g.bench_function("softmax_ce_256x1000", |b| {
        b.iter(|| black_box(be.softmax_cross_entropy(&logits, &labels, &w).unwrap()))
    });

    // The search ops: 40 searches of 4 images of 3x32x32.
    let canvas = be.upload(&t(&[40, 3, 32, 32], 5)).unwrap();
    let others = be.upload(&t(&[160, 3, 32, 32], 6)).unwrap();
    let mask = be.upload(&Tensor::full(&[40, 32, 32], 0.5)).unwrap();
    let dx = be.upload(&t(&[160, 3, 32, 32], 7)).unwrap();
    let m: u64 = 160 * 3 * 32 * 32;
    g.throughput(Throughput::Bytes(12 * m));
    g.bench_function("search_composite", |b| {
        b.iter(|| black_box(be.composite(&canvas, &mask, &others).unwrap()))
    });
    g.bench_function("search_mask_grad", |b| {
        b.iter(|| black_box(be.mask_grad(&dx, &canvas, &others, 0.002).unwrap()))
    });
    let dmask = be.mask_grad(&dx, &canvas, &others, 0.002).unwrap();
    g.throughput(Throughput::Bytes(12 * 40 * 32 * 32));
    g.bench_function("search_sign_step", |b| {
        b.iter(|| {
            let mut m = be.reshape(&mask, &[40, 32, 32]).unwrap();
            be.sign_step_clamp(&mut m, &dmask, 0.02).unwrap();
            black_box(m)
        })
    });

    // Optimiser steps on a 512x512x3x3 filter.
    let wshape = [512, 512, 3, 3];
    let wn: u64 = wshape.iter().product::<usize>() as u64;
    let grad = be.upload(&t(&wshape, 8)).unwrap();
    let mut param = be.upload(&t(&wshape, 9)).unwrap();
    let mut vel = be.zeros(&wshape).unwrap();
    let sgd = SgdParams {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    g.throughput(Throughput::Bytes(20 * wn));
    g.bench_function("sgd_step", |b| {
        b.iter(|| be.sgd_step(&mut param, &grad, &mut vel, sgd).unwrap())
    });
    let x0 = be.upload(&t(&[160, 3, 32, 32], 10)).unwrap();
    let mut xa = be.upload(&t(&[160, 3, 32, 32], 11)).unwrap();
    g.throughput(Throughput::Bytes(16 * m));
    g.bench_function("pgd_step", |b| {
        b.iter(|| be.pgd_step(&mut xa, &dx, &x0, 0.01, 0.03).unwrap())
    });
    g.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);
