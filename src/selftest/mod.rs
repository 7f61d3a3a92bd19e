//! The GPU-against-CPU equivalence suite: every op of [`Backend`] on random
//! shapes (odd ones included), every zoo model's forward and input gradient,
//! one search step and one training step, each compared with the CPU
//! reference under a bound derived from the arithmetic.
//!
//! It runs on any driver: CI runs it through the emulated driver
//! (`tests/gpu_emu_*.rs`), `cwp selftest --device cuda` on a real GPU. It sits
//! above the backends (it uses the zoo, the graph runner and the search
//! step), in two parts: [`ops`] and [`models`]. It is also the one source of
//! the formula weights and the model-level tolerances that the tests and the
//! benchmark use.
//!
//! # Tolerances
//! With `u = 2^-24` (f32 unit roundoff) and `γ(k) = k·u / (1 - k·u)`, a sum
//! of `k` products computed in any order, with or without fused
//! multiply-adds, is within `γ(k+1)·Σ|terms|` of the exact sum (Higham,
//! *Accuracy and Stability of Numerical Algorithms*, §3.1). Two such
//! implementations are therefore within `2·γ(k+2)·Σ|terms|` of each other.
//! The suite computes `Σ|terms|` per output element by running the CPU
//! reference on absolute values (`conv(|x|, |w|)`), so each element gets its
//! own bound. A wrong index makes errors of the size of the terms
//! themselves, orders of magnitude above these bounds.
//! Ops whose two implementations perform the same f32 operations in the same
//! order are held to a few ulps (FMA contraction on the GPU may round a
//! product once less); the reductions done in f64 on both sides are held to
//! a few ulps of the result. Model-level checks use the golden-fixture
//! tolerances of `tests/fixtures/README.md` (f32 against f64 PyTorch):
//! logits within `1e-4·max(1, max|ref|)` (deep nets `1e-3`), input gradients
//! within relative L2 `1e-3` (deep nets `5e-3`).
//!
//! Under `--precision tf32x3|tf32|bf16` the convolutions and linear layers
//! round their operands: their bound adds [`Precision::dot_bound`]'s operand
//! term (`2u + u²` of `Σ|terms|`, u = 2^-11 tf32, 2^-8 bf16, 2^-21 tf32x3)
//! and counts the extra additions; the model tolerances grow to first order
//! by `2u` per convolution or linear layer ([`model_tolerances_in`]).

mod models;
mod ops;

pub use models::*;
pub use ops::{check_ops, OP_FAMILIES};

use crate::backend::gpu::{Driver, GpuBackend};
use crate::backend::Precision;
use crate::error::Result;
use crate::graph::{Graph, Op, ParamKind};
use crate::tensor::{numel, Tensor};

/// f32 unit roundoff.
pub const U: f64 = 1.0 / 16_777_216.0;

/// `γ(k) = k·u / (1 - k·u)`: the relative error bound of a k-term sum.
pub fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

/// One comparison of the suite.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// Op family or model.
    pub group: String,
    /// What was compared, with its shape.
    pub name: String,
    /// Largest absolute difference GPU - CPU (or the model-level metric).
    pub max_err: f64,
    /// Largest ratio of an error to its bound: the check passes at <= 1.
    pub ratio: f64,
    /// Whether it passed.
    pub pass: bool,
}

/// The formula weights of `tests/fixtures/README.md` for one parameter.
pub fn formula_tensor(name: &str, shape: &[usize], kind: ParamKind) -> Tensor {
    formula_tensor_with(Formula::Sine, name, shape, kind)
}

/// Which `u_i` a formula tensor is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formula {
    /// `sin(0.731 i + 0.1 s)`, weights scaled by `0.8 sqrt(2 / fan_in)`
    /// (formula-v1, the zoo fixtures).
    Sine,
    /// splitmix64 of `s * 0x9E3779B97F4A7C15 + i`, its top 53 bits mapped to
    /// [-1, 1), weights scaled by `sqrt(6 / fan_in)` (formula-v2-hash, the
    /// torchvision ONNX fixtures). A sine is smooth along a filter, so the
    /// stacked depthwise convolutions of MobileNet or EfficientNet cancel
    /// their input under it and the input gradient ends near 1e-15; hashed
    /// values behave like a random init and are exact in any language with
    /// wrapping u64 arithmetic.
    Hash,
}

/// `u_i` of [`Formula::Hash`].
fn hash_unit(s: u64, i: u64) -> f64 {
    let mut z = s.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// One parameter's weights under `formula` (see [`Formula`]).
pub fn formula_tensor_with(
    formula: Formula,
    name: &str,
    shape: &[usize],
    kind: ParamKind,
) -> Tensor {
    let s = name.bytes().map(|b| b as u64).sum::<u64>() % 997;
    let n = numel(shape);
    let fan_in = if shape.is_empty() {
        1
    } else {
        n / shape[0].max(1)
    };
    Tensor::from_fn(shape, |i| {
        let (u, weight_scale) = match formula {
            Formula::Sine => (
                (0.731 * i as f64 + 0.1 * s as f64).sin(),
                (2.0 / fan_in as f64).sqrt() * 0.8,
            ),
            Formula::Hash => (hash_unit(s, i as u64), (6.0 / fan_in as f64).sqrt()),
        };
        let v = match kind {
            ParamKind::ConvWeight | ParamKind::LinearWeight => u * weight_scale,
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

/// The formula input batch of the fixtures README.
pub fn formula_input(shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |j| {
        (0.5 + 0.45 * (0.917 * j as f64 + 0.3).sin()) as f32
    })
}

/// Logit and input-gradient tolerances of a model case (fixtures README).
pub fn model_tolerances(deep: bool) -> (f64, f64) {
    if deep {
        (1e-3, 5e-3)
    } else {
        (1e-4, 1e-3)
    }
}

/// [`model_tolerances`] for a GPU whose convolutions and linear layers
/// (`gemm_layers` of them in the model) multiply in `precision`. fp32 keeps
/// the fixture tolerances. The other modes round every operand of every
/// product with unit roundoff `u` (tf32 2^-11, bf16 2^-8), which moves
/// each layer's output by at most `2u` relative to its terms; to first
/// order these errors add up through the layers, the input gradient
/// passing through each layer twice (forward and back). So the tolerances
/// grow by `2u·L` (logits) and `2·2u·L` (input gradient).
pub fn model_tolerances_in(deep: bool, precision: Precision, gemm_layers: usize) -> (f64, f64) {
    let (l, g) = model_tolerances(deep);
    if precision == Precision::Fp32 {
        return (l, g);
    }
    let per_layer = 2.0 * precision.operand_roundoff();
    let layers = gemm_layers.max(1) as f64;
    (l + per_layer * layers, g + 2.0 * per_layer * layers)
}

/// The convolution and linear layers of `graph`: the ops whose arithmetic
/// `--precision` changes.
pub fn gemm_layers(graph: &Graph) -> usize {
    graph
        .nodes
        .iter()
        .filter(|n| {
            matches!(
                n.op,
                Op::Conv { .. } | Op::FusedConv { .. } | Op::Linear { .. }
            )
        })
        .count()
}

/// What [`run_suite`] runs.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// Op families only (no model-level checks).
    pub ops_only: bool,
    /// Images per batch of the model checks (`None`: the small CI batches).
    pub batch: Option<usize>,
    /// Seed of the random op inputs.
    pub seed: u64,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            ops_only: false,
            batch: None,
            seed: 0x5eed,
        }
    }
}

/// The whole equivalence suite on `gpu`: every op family, every zoo model,
/// one batched search step and one training step. `progress` hears what
/// runs next. A check that cannot run (an error) is itself a failed check.
pub fn run_suite<D: Driver>(
    gpu: &GpuBackend<D>,
    opts: &SuiteOptions,
    progress: &mut dyn FnMut(&str),
) -> Vec<Check> {
    let mut out = Vec::new();
    let push = |group: &str, r: Result<Vec<Check>>, out: &mut Vec<Check>| match r {
        Ok(c) => out.extend(c),
        Err(e) => out.push(Check {
            group: group.to_string(),
            name: format!("error: {e}"),
            max_err: f64::INFINITY,
            ratio: f64::INFINITY,
            pass: false,
        }),
    };
    for f in OP_FAMILIES {
        progress(&format!("ops: {f}"));
        push(f, check_ops(gpu, f, opts.seed), &mut out);
    }
    if opts.ops_only {
        return out;
    }
    for mut case in zoo_cases() {
        if let Some(b) = opts.batch {
            case.batch = b;
        }
        progress(&format!(
            "model: {} {:?} batch {}",
            case.arch, case.input, case.batch
        ));
        push(case.arch, check_model(gpu, &case), &mut out);
    }
    let small = zoo_cases().into_iter().next().expect("zoo cases");
    progress("search step");
    push("search step", check_search_step(gpu, &small), &mut out);
    progress("training step");
    push("train step", check_train_step(gpu, &small), &mut out);
    out
}

/// The checks as a table: group, name, max error, error/bound, verdict.
pub fn format_checks(checks: &[Check]) -> String {
    let mut s = format!(
        "{:<44} {:<66} {:>11} {:>9}  result\n",
        "group", "check", "max err", "err/bound"
    );
    for c in checks {
        s += &format!(
            "{:<44} {:<66} {:>11.3e} {:>9.3}  {}\n",
            c.group,
            c.name,
            c.max_err,
            c.ratio,
            if c.pass { "ok" } else { "FAIL" }
        );
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    s += &format!("{} checks, {} failed\n", checks.len(), failed);
    s
}

#[cfg(test)]
mod formula_tests {
    use super::*;

    #[test]
    fn the_hash_formula_gives_the_values_numpy_computes_for_tools_make_torchvision_fixtures() {
        // Printed by tools/make_torchvision_fixtures.py's formula_tensor
        // (numpy uint64 arithmetic) for this name and shape.
        let t = formula_tensor_with(
            Formula::Hash,
            "features.0.0.weight",
            &[2, 3, 3, 3],
            ParamKind::ConvWeight,
        );
        // f32 values, printed exactly as f64.
        let want: [f64; 4] = [
            -0.2124003916978836,
            -0.433564156293869,
            0.14830629527568817,
            -0.05029049143195152,
        ];
        let got: Vec<f64> = t.data()[..4].iter().map(|&v| v as f64).collect();
        assert_eq!(got, want);
        assert_eq!(t.data()[53] as f64, -0.385342538356781);
    }

    #[test]
    fn the_sine_formula_is_unchanged_by_the_hash_variant() {
        let a = formula_tensor("conv1.weight", &[4, 3, 3, 3], ParamKind::ConvWeight);
        let b = formula_tensor_with(
            Formula::Sine,
            "conv1.weight",
            &[4, 3, 3, 3],
            ParamKind::ConvWeight,
        );
        assert_eq!(a.data(), b.data());
        let h = formula_tensor_with(
            Formula::Hash,
            "conv1.weight",
            &[4, 3, 3, 3],
            ParamKind::ConvWeight,
        );
        assert_ne!(a.data(), h.data());
    }
}
