//! Shared helpers of the integration tests: where the golden fixtures live
//! and the formula weights of ../shared/fixtures/README.md.
#![allow(dead_code)]

use std::path::PathBuf;

use classwise::graph::{Graph, ParamKind};
use classwise::weights::{read_tensors, TensorFile};
use classwise::Tensor;

/// The golden fixtures folder (`../shared/fixtures` from the repo root, or
/// `$CWP_FIXTURES`). Tests fail, not skip, when it is missing.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("CWP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
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

/// The formula value of a parameter tensor, exactly as the fixtures README
/// defines it (computed in f64, rounded to f32).
pub fn formula_tensor(name: &str, shape: &[usize], kind: ParamKind) -> Tensor {
    let s = (name.bytes().map(|b| b as u64).sum::<u64>() % 997) as f64;
    let n: usize = shape.iter().product();
    let fan_in = if shape.is_empty() { 1 } else { n / shape[0] };
    Tensor::from_fn(shape, |i| {
        let u = (0.731 * i as f64 + 0.1 * s).sin();
        let v = match kind {
            ParamKind::ConvWeight | ParamKind::LinearWeight => {
                u * (2.0 / fan_in as f64).sqrt() * 0.8
            }
            ParamKind::Bias => 0.05 * u,
            ParamKind::BnWeight => 1.0 + 0.2 * u,
            ParamKind::BnBias | ParamKind::BnMean => 0.1 * u,
            ParamKind::BnVar => 1.0 + 0.25 * (u + 1.0),
        };
        v as f32
    })
}

/// Formula weights for every parameter of a graph.
pub fn formula_params(graph: &Graph) -> Vec<Tensor> {
    graph
        .params
        .iter()
        .map(|p| formula_tensor(&p.name, &p.shape, p.kind))
        .collect()
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
