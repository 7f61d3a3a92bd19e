//! Shared helpers of the integration tests: where the golden fixtures live
//! and how outputs are compared with them. The formula weights of
//! tests/fixtures/README.md come from the library
//! (`classwise::selftest::formula_params`), the one copy of that formula.
#![allow(dead_code)]

pub mod window;

use std::path::PathBuf;

use classwise::weights::{read_tensors, TensorFile};

/// The golden fixtures folder (`tests/fixtures` in the repo, or
/// `$CWP_FIXTURES`). The suite reads nothing outside the repo, so a fresh
/// clone alone passes it. Tests fail, not skip, when it is missing.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("CWP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    assert!(
        dir.join("README.md").exists(),
        "golden fixtures not found at {} (set CWP_FIXTURES)",
        dir.display()
    );
    dir
}

/// Reads one fixture file by its name.
pub fn fixture(name: &str) -> TensorFile {
    let path = fixtures_dir().join(name);
    read_tensors(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Labels of an integer tensor as class indices.
pub fn labels(file: &TensorFile, name: &str) -> Vec<usize> {
    let (_, v) = file.int(name, std::path::Path::new(name)).unwrap();
    v.iter().map(|&x| x as usize).collect()
}

/// Max |a - b| <= tol * max(1, max|b|), with a readable failure.
pub fn assert_close_abs(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = classwise::tensor::max_abs_diff(got, want);
    assert!(
        diff <= tol * scale,
        "{what}: max |diff| {diff:e} > {tol:e} * {scale}"
    );
}

/// Relative L2 error <= tol, with a readable failure.
pub fn assert_close_rel(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let e = classwise::tensor::rel_l2(got, want);
    assert!(e <= tol, "{what}: relative L2 error {e:e} > {tol:e}");
}

/// Relative L2 error of a tensor against the reference <= tol, shapes equal.
pub fn assert_tensor_rel(what: &str, got: &classwise::Tensor, want: &classwise::Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    assert_close_rel(what, got.data(), want.data(), tol);
}

/// `cwp forward` (the plain graph) of `model` on a PyTorch fixture's `x`
/// and `y`, its logits and input gradient held to the fixture's within
/// relative L2 tolerances; returns the output for further checks.
pub fn check_forward<B: classwise::backend::Backend>(
    be: &B,
    model: &classwise::weights::Model,
    f: &TensorFile,
    what: &str,
    logits_tol: f64,
    dx_tol: f64,
) -> classwise::forward::ForwardOutput {
    let p = std::path::Path::new(what);
    let x = f.float("x", p).unwrap();
    let out = classwise::forward::forward(be, model, x, &labels(f, "y")).unwrap();
    let what = format!("{what} on {}", be.name());
    assert_tensor_rel(
        &format!("{what}: logits"),
        &out.logits,
        f.float("logits", p).unwrap(),
        logits_tol,
    );
    assert_tensor_rel(
        &format!("{what}: dx"),
        &out.dx,
        f.float("dx", p).unwrap(),
        dx_tol,
    );
    out
}
