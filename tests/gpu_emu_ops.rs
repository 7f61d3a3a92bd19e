//! Every op of the GPU backend, run through the emulated driver (the same
//! kernels, compiled for the CPU), against the CPU reference on random
//! shapes, odd ones included. The shapes, cases and per-op bounds (derived
//! from the arithmetic) live in `classwise::backend::gpu::selftest`, which
//! `cwp selftest --device cuda` runs on a real GPU.

use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::selftest::{check_ops, Check};
use classwise::backend::gpu::GpuBackend;

fn table(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "{} {:<60} max err {:>10.3e}  err/bound {:>8.3}\n",
                if c.pass { "ok  " } else { "FAIL" },
                c.name,
                c.max_err,
                c.ratio
            )
        })
        .collect()
}

fn family(name: &str) {
    let gpu = GpuBackend::new(EmuDriver::new());
    let checks = check_ops(&gpu, name, 0x5eed).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!checks.is_empty(), "{name}: no checks ran");
    let t = table(&checks);
    println!("{t}");
    assert!(
        checks.iter().all(|c| c.pass),
        "{name}: GPU (emu) differs from the CPU reference:\n{t}"
    );
}

#[test]
fn emu_ops_buffers() {
    family("buffers");
}

#[test]
fn emu_ops_elementwise() {
    family("elementwise");
}

#[test]
fn emu_ops_conv() {
    family("conv");
}

#[test]
fn emu_ops_linear() {
    family("linear");
}

#[test]
fn emu_ops_norm() {
    family("norm");
}

#[test]
fn emu_ops_pool() {
    family("pool");
}

#[test]
fn emu_ops_loss() {
    family("loss");
}

#[test]
fn emu_ops_mask() {
    family("mask");
}

#[test]
fn emu_ops_optim() {
    family("optim");
}

#[test]
fn emu_ops_errors() {
    family("errors");
}
