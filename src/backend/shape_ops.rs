//! Shape checks of the broadcast, concatenation and padding ops
//! (`mul`, `affine`, `concat`, `pad2d`), shared by every backend so the CPU
//! reference and the GPU path accept and refuse the same inputs with the
//! same messages.

use super::check::dims4;
use crate::error::{Error, Result};
use crate::tensor::numel;

/// Zeros added around the H and W axes of an NCHW tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Pad2d {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Pad2d {
    /// `(H, W)` after padding an `h` x `w` plane.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (h + self.top + self.bottom, w + self.left + self.right)
    }
}

/// How `mul`'s second operand meets the first: `(N*C*plane, plane of the
/// broadcast)`: the broadcast plane is 1 when `b` has `a`'s shape, else the
/// `H*W` that one value of `b [N,C,1,1]` or `[N,C]` covers.
pub fn mul_dims(a: &[usize], b: &[usize]) -> Result<(usize, usize)> {
    if a == b {
        return Ok((numel(a), 1));
    }
    let fits = a.len() >= 2 && (b == &a[..2] || (a.len() == 4 && b == [a[0], a[1], 1, 1]));
    if !fits {
        return Err(Error::tensor(
            "b",
            format!(
                "mul: shape {b:?} neither equals a's {a:?} nor is [N, C, 1, 1] or [N, C] of it"
            ),
        ));
    }
    Ok((numel(a), numel(&a[2..])))
}

/// Per-channel `(scale, shift)` of `affine` for `c` channels, each of
/// length 1 (broadcast) or `c`, expanded to `c`; non-finite values refused.
pub fn affine_params(scale: &[f32], shift: &[f32], c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let expand = |name: &str, v: &[f32]| -> Result<Vec<f32>> {
        if let Some(bad) = v.iter().find(|v| !v.is_finite()) {
            return Err(Error::tensor(
                name,
                format!("affine: value {bad} is not finite"),
            ));
        }
        match v.len() {
            1 => Ok(vec![v[0]; c]),
            n if n == c => Ok(v.to_vec()),
            n => Err(Error::tensor(
                name,
                format!("affine: {n} values for {c} channels (1 or {c} needed)"),
            )),
        }
    };
    Ok((expand("scale", scale)?, expand("shift", shift)?))
}

/// `(N, plane, channels of each part)` of a channel-axis concatenation:
/// at least two parts, equal in every extent but the channels.
pub fn concat_dims(shapes: &[&[usize]]) -> Result<(usize, usize, Vec<usize>)> {
    let Some(first) = shapes.first() else {
        return Err(Error::arg("concat", "no inputs"));
    };
    if shapes.len() < 2 {
        return Err(Error::arg("concat", "needs at least two inputs"));
    }
    if first.len() < 2 {
        return Err(Error::tensor(
            "concat input 0",
            format!("expected [N, C, ...], got shape {first:?}"),
        ));
    }
    for (i, s) in shapes.iter().enumerate() {
        if s.len() != first.len() || s[0] != first[0] || s[2..] != first[2..] {
            return Err(Error::tensor(
                format!("concat input {i}"),
                format!(
                    "shape {s:?} differs from input 0's {first:?} in an extent other than the channels"
                ),
            ));
        }
    }
    Ok((
        first[0],
        numel(&first[2..]),
        shapes.iter().map(|s| s[1]).collect(),
    ))
}

/// The output shape of padding `x`.
pub fn pad_out_shape(x: &[usize], p: Pad2d) -> Result<[usize; 4]> {
    let [n, c, h, w] = dims4("x", x)?;
    let (oh, ow) = p.out_hw(h, w);
    Ok([n, c, oh, ow])
}

/// The shape the gradient of a padded tensor crops back to.
pub fn crop_shape(dy: &[usize], p: Pad2d) -> Result<[usize; 4]> {
    let [n, c, h, w] = dims4("dy", dy)?;
    if h < p.top + p.bottom || w < p.left + p.right {
        return Err(Error::tensor(
            "dy",
            format!("pad2d_backward: shape {dy:?} is smaller than the padding {p:?}"),
        ));
    }
    Ok([n, c, h - p.top - p.bottom, w - p.left - p.right])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_accepts_equal_shapes_and_channel_broadcasts_only() {
        assert_eq!(mul_dims(&[2, 3, 4, 5], &[2, 3, 4, 5]).unwrap(), (120, 1));
        assert_eq!(mul_dims(&[2, 3, 4, 5], &[2, 3, 1, 1]).unwrap(), (120, 20));
        assert_eq!(mul_dims(&[2, 3, 4, 5], &[2, 3]).unwrap(), (120, 20));
        assert_eq!(mul_dims(&[2, 3], &[2, 3]).unwrap(), (6, 1));
        for b in [
            &[1usize, 3, 1, 1][..],
            &[2, 1, 1, 1],
            &[2, 3, 4, 1],
            &[3, 2],
        ] {
            assert!(mul_dims(&[2, 3, 4, 5], b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn affine_broadcasts_single_values_and_refuses_others() {
        let (s, b) = affine_params(&[2.0], &[1.0, 2.0, 3.0], 3).unwrap();
        assert_eq!((s, b), (vec![2.0; 3], vec![1.0, 2.0, 3.0]));
        assert!(affine_params(&[1.0, 2.0], &[0.0], 3).is_err());
        assert!(affine_params(&[f32::NAN], &[0.0], 3).is_err());
        assert!(affine_params(&[1.0], &[f32::INFINITY], 3).is_err());
    }

    #[test]
    fn concat_needs_two_parts_equal_but_for_channels() {
        let (n, plane, cs) = concat_dims(&[&[2, 3, 4, 5], &[2, 1, 4, 5]]).unwrap();
        assert_eq!((n, plane, cs), (2, 20, vec![3, 1]));
        assert!(concat_dims(&[&[2, 3, 4, 5]]).is_err());
        assert!(concat_dims(&[&[2, 3, 4, 5], &[2, 3, 5, 4]]).is_err());
        assert!(concat_dims(&[&[2, 3, 4, 5], &[1, 3, 4, 5]]).is_err());
    }

    #[test]
    fn crop_refuses_a_gradient_smaller_than_the_padding() {
        let p = Pad2d {
            top: 1,
            bottom: 2,
            left: 0,
            right: 3,
        };
        assert_eq!(pad_out_shape(&[1, 2, 3, 4], p).unwrap(), [1, 2, 6, 7]);
        assert_eq!(crop_shape(&[1, 2, 6, 7], p).unwrap(), [1, 2, 3, 4]);
        assert!(crop_shape(&[1, 2, 2, 7], p).is_err());
    }
}
