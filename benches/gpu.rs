//! Convolution kernels of the CUDA backend on the resnet50 (CIFAR) layer
//! shapes at batch 256: forward, backward-data and backward-filter, with
//! FLOP throughput (criterion reports it as elements/s = FLOP/s). Skips with
//! a message where no CUDA device exists. `cwp bench` prints the same
//! figures as TFLOP/s and shares of the mode's dense peak.

use std::hint::black_box;
use std::time::{Duration, Instant};

use classwise::backend::gpu::cuda::CudaDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::bench::conv_layers;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn convs(c: &mut Criterion) {
    let gpu = match CudaDriver::new(0) {
        Ok(d) => GpuBackend::new(d),
        Err(e) => {
            eprintln!("gpu bench skipped: no CUDA device ({e})");
            return;
        }
    };
    let batch = 256;
    let graph = build(&ModelSpec::new("resnet50", [3, 32, 32], 10)).unwrap();
    let mut g = c.benchmark_group("resnet50_conv_b256");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    for (xs, ws, p, _) in conv_layers(&graph, batch) {
        let x = gpu
            .upload(&Tensor::from_fn(&xs, |i| ((i * 31) % 97) as f32 / 97.0))
            .unwrap();
        let w = gpu
            .upload(&Tensor::from_fn(&ws, |i| ((i * 17) % 89) as f32 / 890.0))
            .unwrap();
        let y = gpu.conv2d(&x, &w, None, p).unwrap();
        let ys = y.shape().to_vec();
        let flops = 2 * (ys[0] * ys[2] * ys[3] * ys[1] * ws[1] * ws[2] * ws[3]) as u64;
        g.throughput(Throughput::Elements(flops));
        let id = format!(
            "{}x{}x{}x{}_s{}_on_{}x{}",
            ws[0], ws[1], ws[2], ws[3], p.stride, xs[2], xs[3]
        );
        let timed = |b: &mut criterion::Bencher, f: &dyn Fn()| {
            b.iter_custom(|iters| {
                gpu.synchronize().unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                gpu.synchronize().unwrap();
                t.elapsed()
            })
        };
        g.bench_function(BenchmarkId::new("fwd", &id), |b| {
            timed(b, &|| drop(black_box(gpu.conv2d(&x, &w, None, p).unwrap())))
        });
        g.bench_function(BenchmarkId::new("dgrad", &id), |b| {
            timed(b, &|| {
                drop(black_box(gpu.conv2d_backward_data(&y, &w, &xs, p).unwrap()))
            })
        });
        g.bench_function(BenchmarkId::new("wgrad", &id), |b| {
            timed(b, &|| {
                drop(black_box(
                    gpu.conv2d_backward_filter(&x, &y, &ws, p, false).unwrap(),
                ))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, convs);
criterion_main!(benches);
