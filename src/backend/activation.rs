//! The elementwise activations the backends provide (Sigmoid, SiLU, HardSigmoid, ...):
//! their definition (PyTorch's, with ONNX's names and parameters), the one
//! scalar implementation the CPU reference runs, and the codes that
//! kernels/activation.cu reads.
//!
//! Gradients at the kinks follow PyTorch's autograd (checked against it by
//! tests/fixtures/ops): the clamping activations (`Clip`, `HardSigmoid`)
//! pass the gradient strictly inside their linear range only, as `clamp`,
//! `hardtanh`, `relu6` and `hardsigmoid` do; `HardSwish` has slope 0 at
//! x = -3 and 1 at x = 3; `LeakyRelu` has slope `alpha` at 0.

use crate::error::{Error, Result};

/// An elementwise activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `x * sigmoid(x)` (SiLU, swish).
    Silu,
    /// `max(0, min(1, alpha * x + beta))`: ONNX's default is alpha 0.2,
    /// beta 0.5; PyTorch's `hardsigmoid` is alpha 1/6, beta 0.5.
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x * min(max(x + 3, 0), 6) / 6`, PyTorch's `hardswish`.
    HardSwish,
    /// `min(max(x, min), max)` (ReLU6 is `Clip { min: 0, max: 6 }`); either
    /// bound may be infinite. NaN stays NaN.
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `x` for `x > 0`, else `alpha * x`.
    LeakyRelu {
        /// Slope of the negative side.
        alpha: f32,
    },
}

impl Activation {
    /// Refuses parameters that make the activation meaningless: NaN or
    /// infinite slopes and offsets, NaN clip bounds or `min > max`.
    pub fn check(self) -> Result<()> {
        let bad = |what: &str| Err(Error::arg("activation", format!("{self:?}: {what}")));
        match self {
            Activation::HardSigmoid { alpha, beta } => {
                if !alpha.is_finite() || !beta.is_finite() {
                    return bad("alpha and beta must be finite");
                }
            }
            Activation::Clip { min, max } => {
                if min.is_nan() || max.is_nan() {
                    return bad("a bound is NaN");
                }
                if min > max {
                    return bad("min is above max");
                }
            }
            Activation::LeakyRelu { alpha } => {
                if !alpha.is_finite() {
                    return bad("alpha must be finite");
                }
            }
            Activation::Sigmoid | Activation::Silu | Activation::HardSwish => {}
        }
        Ok(())
    }

    /// `(kind, alpha, beta)` as kernels/activation.cu's `ActArgs` takes them.
    pub(crate) fn kernel_args(self) -> (i32, f32, f32) {
        match self {
            Activation::Sigmoid => (0, 0.0, 0.0),
            Activation::Silu => (1, 0.0, 0.0),
            Activation::HardSigmoid { alpha, beta } => (2, alpha, beta),
            Activation::HardSwish => (3, 0.0, 0.0),
            Activation::Clip { min, max } => (4, min, max),
            Activation::LeakyRelu { alpha } => (5, alpha, 0.0),
        }
    }

    /// The activation of one value. The same operations, in the same order,
    /// as kernels/activation.cu (which keeps its products unfused), so both
    /// give the same bits wherever their `expf` agree.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Sigmoid => sigmoid(x),
            Activation::Silu => x * sigmoid(x),
            Activation::HardSigmoid { alpha, beta } => clamp(alpha * x + beta, 0.0, 1.0),
            Activation::HardSwish => x * clamp(x + 3.0, 0.0, 6.0) / 6.0,
            Activation::Clip { min, max } => clamp(x, min, max),
            Activation::LeakyRelu { alpha } => {
                if x > 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
        }
    }

    /// `dy * act'(x)`, with PyTorch's one-sided choices at the kinks.
    pub fn grad(self, x: f32, dy: f32) -> f32 {
        match self {
            Activation::Sigmoid => {
                let s = sigmoid(x);
                dy * s * (1.0 - s)
            }
            Activation::Silu => {
                let s = sigmoid(x);
                dy * s * (1.0 + x * (1.0 - s))
            }
            Activation::HardSigmoid { alpha, beta } => {
                let v = alpha * x + beta;
                if v > 0.0 && v < 1.0 {
                    dy * alpha
                } else {
                    0.0
                }
            }
            Activation::HardSwish => {
                if x <= -3.0 {
                    0.0
                } else if x >= 3.0 {
                    dy
                } else {
                    dy * (x / 3.0 + 0.5)
                }
            }
            Activation::Clip { min, max } => {
                if x > min && x < max {
                    dy
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu { alpha } => {
                if x > 0.0 {
                    dy
                } else {
                    dy * alpha
                }
            }
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `min(max(x, lo), hi)` by comparisons, so NaN passes through.
fn clamp(x: f32, lo: f32, hi: f32) -> f32 {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_refused() {
        let nan = f32::NAN;
        for a in [
            Activation::HardSigmoid {
                alpha: nan,
                beta: 0.5,
            },
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: f32::INFINITY,
            },
            Activation::Clip { min: nan, max: 6.0 },
            Activation::Clip { min: 1.0, max: 0.0 },
            Activation::LeakyRelu { alpha: nan },
        ] {
            assert!(a.check().is_err(), "{a:?} accepted");
        }
        let one_sided = Activation::Clip {
            min: 0.0,
            max: f32::INFINITY,
        };
        assert!(one_sided.check().is_ok());
        assert_eq!(one_sided.apply(1e30), 1e30);
    }

    #[test]
    fn nan_propagates_through_every_activation() {
        for a in [
            Activation::Sigmoid,
            Activation::Silu,
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Activation::HardSwish,
            Activation::Clip { min: 0.0, max: 6.0 },
            Activation::LeakyRelu { alpha: 0.1 },
        ] {
            assert!(a.apply(f32::NAN).is_nan(), "{a:?}");
        }
    }

    #[test]
    fn gradients_match_central_differences_away_from_kinks() {
        let acts = [
            Activation::Sigmoid,
            Activation::Silu,
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Activation::HardSwish,
            Activation::Clip {
                min: -1.0,
                max: 2.0,
            },
            Activation::LeakyRelu { alpha: 0.1 },
        ];
        for a in acts {
            for i in 0..40 {
                // Steps of 0.3 from -5.95: never within 0.05 of a kink.
                let x = -5.95 + 0.3 * i as f64;
                let h = 1e-3;
                let f = |v: f64| a.apply(v as f32) as f64;
                let num = (f(x + h) - f(x - h)) / (2.0 * h);
                let got = a.grad(x as f32, 1.0) as f64;
                assert!(
                    (got - num).abs() <= 2e-3 * (1.0 + num.abs()),
                    "{a:?} at {x}: {got} vs {num}"
                );
            }
        }
    }
}
