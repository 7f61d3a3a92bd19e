//! Shared helpers of the integration tests: where the golden fixtures live
//! and how outputs are compared with them. The formula weights of
//! tests/fixtures/README.md come from the library
//! (`classwise::selftest::formula_params`), the one copy of that formula.
#![allow(dead_code)]

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
