//! Arithmetic precision of the convolutions (`--precision`): the f32 path,
//! or one of the tensor-core modes of `kernels/conv_mma.cu`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// How a backend multiplies in its convolutions (and linear layers, which
/// run as 1x1 convolutions). Every mode accumulates in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Plain f32 products on the f32 units: the reference path.
    #[default]
    Fp32,
    /// Tensor cores, each operand split into two tf32 parts (three products
    /// per term): close to f32 accuracy.
    Tf32x3,
    /// Tensor cores, operands rounded to tf32 (10-bit mantissa).
    Tf32,
    /// Tensor cores, operands rounded to bf16 (7-bit mantissa).
    Bf16,
}

impl Precision {
    /// Every mode, in the order of the `--precision` help.
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Tf32x3,
        Precision::Tf32,
        Precision::Bf16,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32x3 => "tf32x3",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Relative error one operand of a product carries in this mode (its
    /// unit roundoff): 2^-11 for tf32 (10 stored mantissa bits, round to
    /// nearest), 2^-8 for bf16 (7 bits). For tf32x3, `x = big + small`
    /// with `|x - big| <= 2^-11 |x|` and the small part rounded again, so
    /// each operand is off by at most 2^-22 |x|, and the dropped
    /// `small * small` term adds 2^-22 |a| |b|: 2^-21 per operand covers
    /// both. For fp32, the f32 unit roundoff 2^-24.
    pub fn operand_roundoff(self) -> f64 {
        match self {
            Precision::Fp32 => 2f64.powi(-24),
            Precision::Tf32x3 => 2f64.powi(-21),
            Precision::Tf32 => 2f64.powi(-11),
            Precision::Bf16 => 2f64.powi(-8),
        }
    }

    /// Products per term: tf32x3 makes three.
    pub fn products_per_term(self) -> usize {
        if self == Precision::Tf32x3 {
            3
        } else {
            1
        }
    }

    /// Bound on `|computed - cpu|` of a dot product of `k` terms with
    /// `sum |a| |b| = abs_sum`, between this mode and the f32 CPU reference.
    /// Rounding both operands with unit roundoff `u` moves each product by
    /// at most `(2u + u^2) |a| |b|`. Each f32 addition adds at most one ulp
    /// of the running sum (2^-23 relative: a tensor core's adder may
    /// truncate rather than round), the running sum being at most
    /// `abs_sum`: `products_per_term * k` additions here and `k` in the
    /// reference.
    pub fn dot_bound(self, abs_sum: f64, k: usize) -> f64 {
        let u = self.operand_roundoff();
        let adds = (self.products_per_term() * k + k) as f64;
        let ops = if self == Precision::Fp32 {
            0.0
        } else {
            2.0 * u + u * u
        };
        (ops + adds * 2f64.powi(-23)) * abs_sum
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Precision> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::arg(
                    "--precision",
                    format!("unknown precision `{s}` (fp32, tf32x3, tf32, bf16)"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_names_round_trip_and_unknown_names_are_refused() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        let e = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("--precision") && e.contains("fp16"), "{e}");
    }

    #[test]
    fn coarser_modes_have_wider_bounds() {
        let b: Vec<f64> = Precision::ALL
            .iter()
            .map(|p| p.dot_bound(1.0, 100))
            .collect();
        // fp32 < tf32x3 < tf32 < bf16
        assert!(b[0] < b[1] && b[1] < b[2] && b[2] < b[3], "{b:?}");
    }
}
