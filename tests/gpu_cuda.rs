//! The equivalence suite and the fault paths on a real CUDA device. Every
//! test is ignored by default, so a machine without a GPU reports them as
//! `ignored`, never as a pass; `cargo test --test gpu_cuda -- --ignored` (or
//! the prepared script `scripts/gpu-check.sh` on a GPU machine) runs them,
//! and there a missing driver or device fails the test.

mod common;

use classwise::backend::gpu::cuda::CudaDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::selftest::{format_checks, run_suite, SuiteOptions};
use classwise::zoo::{build, ModelSpec};

/// The CUDA backend; a test asked to run without one fails, naming why.
fn cuda() -> GpuBackend<CudaDriver> {
    match CudaDriver::new(0) {
        Ok(d) => GpuBackend::new(d),
        Err(e) => panic!("no CUDA device here ({e}); these tests need one"),
    }
}

fn suite(ops_only: bool, batch: Option<usize>) {
    let gpu = cuda();
    let opts = SuiteOptions {
        ops_only,
        batch,
        ..SuiteOptions::default()
    };
    let checks = run_suite(&gpu, &opts, &mut |s| eprintln!("{s}"));
    let t = format_checks(&checks);
    println!("{t}");
    assert!(
        checks.iter().all(|c| c.pass),
        "CUDA differs from the CPU reference:\n{t}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn cuda_ops_match_cpu() {
    suite(true, None);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn cuda_models_match_cpu() {
    suite(false, None);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn cuda_models_match_cpu_at_batch_8() {
    suite(false, Some(8));
}

/// Asking for more memory than the device has is a clear error, not a
/// crash or a hang, and the device stays usable afterwards: first by
/// allocating 4 GiB tensors until the memory runs out, then (with all but
/// 8 GiB of them still held) by a forward pass at a batch that needs more,
/// and then by replaying a recorded step.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn cuda_out_of_memory_is_a_clear_error() {
    let gpu = cuda();
    let mut held = Vec::new();
    let err = loop {
        match gpu.zeros(&[1 << 30]) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
        assert!(held.len() < 1024, "4 TiB allocated without an error");
    };
    assert!(err.to_string().contains("out of device memory"), "{err}");
    held.truncate(held.len().saturating_sub(2));
    let graph = build(&ModelSpec::new("resnet50", [3, 32, 32], 10)).unwrap();
    let model = classwise::device_model::DeviceModel::upload(
        &gpu,
        &graph,
        &classwise::selftest::formula_params(&graph),
    )
    .unwrap();
    // About 12 MiB of kept activations per image: 2048 images need 24 GiB.
    let x = gpu.zeros(&graph.input_shape(2048)).unwrap();
    let err = model
        .pass(x, &[0; 2048], &[1.0 / 2048.0; 2048])
        .err()
        .expect("batch 2048 of resnet50 must not fit in 8 GiB");
    assert!(err.to_string().contains("out of device memory"), "{err}");
    drop(held);
    let y = gpu.upload(&classwise::Tensor::full(&[4], 1.5)).unwrap();
    assert_eq!(gpu.download(&y).unwrap().data(), &[1.5; 4]);
    // The freed gigabytes sit in the stream's memory pool, which only
    // allocations can reuse; a recorded step, whose instantiation and
    // launch allocate outside the pool, must still run (it once failed
    // here with CUDA_ERROR_OUT_OF_MEMORY at cuGraphLaunch).
    use classwise::backend::gpu::Driver;
    let mut acc = gpu.zeros(&[4]).unwrap();
    let drv = gpu.driver();
    drv.begin_capture().unwrap();
    gpu.add_assign(&mut acc, &y).unwrap();
    let step = drv.end_capture().unwrap();
    for _ in 0..2 {
        drv.launch_graph(step).unwrap();
    }
    assert_eq!(gpu.download(&acc).unwrap().data(), &[3.0; 4]);
}

/// A damaged entry of the kernel cache is rebuilt, not fatal.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn cuda_corrupted_kernel_cache_is_rebuilt() {
    drop(cuda());
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("CWP_CACHE_DIR", dir.path());
    let d = CudaDriver::new(0).unwrap();
    d.load_all().unwrap();
    drop(d);
    let mut n = 0;
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        b.truncate(b.len() - 7);
        std::fs::write(&p, b).unwrap();
        n += 1;
    }
    assert!(n > 0, "the cache was not written");
    let gpu = GpuBackend::new(CudaDriver::new(0).unwrap());
    gpu.driver().load_all().unwrap();
    let x = gpu.upload(&classwise::Tensor::full(&[2, 3], -1.0)).unwrap();
    assert_eq!(
        gpu.download(&gpu.relu(&x).unwrap()).unwrap().data(),
        &[0.0; 6]
    );
    std::env::remove_var("CWP_CACHE_DIR");
}

/// A search window on the device (first step op by op, second recorded as
/// a CUDA graph, third replayed) gives the bits of the plain one-step
/// function on the same device.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn cuda_search_window_gives_the_bits_of_one_step_at_a_time() {
    common::window::window_equals_step_by_step(&cuda());
}
