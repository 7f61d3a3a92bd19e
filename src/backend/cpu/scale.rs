//! Products: `mul` of two tensors (same shape, or a per-channel `[N, C]`
//! gate broadcast over the plane) and the per-channel constant `affine`
//! map, with their gradients. GPU twin: kernels/scale.cu.

use rayon::prelude::*;

use super::{expect_shape, ELEMENTWISE_CHUNK};
use crate::backend::check::channel_dims;
use crate::backend::shape_ops::{affine_params, mul_dims};
use crate::error::Result;
use crate::tensor::Tensor;

/// `out[i] = a[i] * b[i / plane]`.
fn broadcast_mul(a: &[f32], b: &[f32], plane: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    let chunk = ELEMENTWISE_CHUNK;
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .enumerate()
        .for_each(|(k, (o, a))| {
            for (j, (o, &v)) in o.iter_mut().zip(a).enumerate() {
                *o = v * b[(k * chunk + j) / plane];
            }
        });
    out
}

/// `a * b`, `b` of `a`'s shape or broadcast per channel.
pub(super) fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, plane) = mul_dims(a.shape(), b.shape())?;
    Tensor::new(a.shape(), broadcast_mul(a.data(), b.data(), plane))
}

/// `(dy * b, dy * a)`, the second summed per channel in f64 when `b` is
/// broadcast.
pub(super) fn mul_backward(dy: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, plane) = mul_dims(a.shape(), b.shape())?;
    expect_shape("dy", dy, a.shape())?;
    let da = Tensor::new(a.shape(), broadcast_mul(dy.data(), b.data(), plane))?;
    let db = if plane == 1 {
        broadcast_mul(dy.data(), a.data(), 1)
    } else {
        let mut db = vec![0.0f32; b.len()];
        db.par_iter_mut().enumerate().for_each(|(k, o)| {
            let r = k * plane..(k + 1) * plane;
            let s: f64 = dy.data()[r.clone()]
                .iter()
                .zip(&a.data()[r])
                .map(|(&g, &v)| g as f64 * v as f64)
                .sum();
            *o = s as f32;
        });
        db
    };
    Ok((da, Tensor::new(b.shape(), db)?))
}

/// `x * scale[c] + shift[c]` (or `dy * scale[c]` without shift).
fn per_channel(name: &str, x: &Tensor, scale: &[f32], shift: Option<&[f32]>) -> Result<Tensor> {
    let (_, c, plane) = channel_dims(name, x.shape())?;
    let (s, b) = affine_params(scale, shift.unwrap_or(&[0.0]), c)?;
    let chunk = ELEMENTWISE_CHUNK;
    let plane = plane.max(1);
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(chunk)
        .zip(x.data().par_chunks(chunk))
        .enumerate()
        .for_each(|(k, (y, x))| {
            for (j, (y, &v)) in y.iter_mut().zip(x).enumerate() {
                let ch = ((k * chunk + j) / plane) % c;
                *y = if shift.is_some() {
                    v * s[ch] + b[ch]
                } else {
                    v * s[ch]
                };
            }
        });
    Tensor::new(x.shape(), y)
}

/// `x * scale[c] + shift[c]`.
pub(super) fn affine(x: &Tensor, scale: &[f32], shift: &[f32]) -> Result<Tensor> {
    per_channel("x", x, scale, Some(shift))
}

/// `dy * scale[c]`.
pub(super) fn affine_backward(dy: &Tensor, scale: &[f32]) -> Result<Tensor> {
    per_channel("dy", dy, scale, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    #[test]
    fn broadcast_mul_gradients_match_central_differences() {
        let mut g = rng(11);
        let a = uniform(&mut g, &[2, 3, 4, 5], -1.0, 1.0);
        let b = uniform(&mut g, &[2, 3, 1, 1], -1.0, 1.0);
        let r = uniform(&mut g, &[2, 3, 4, 5], -1.0, 1.0);
        let f = |a: &[f64], b: &[f64]| -> Vec<f64> {
            a.iter().enumerate().map(|(i, v)| v * b[i / 20]).collect()
        };
        let y = mul(&a, &b).unwrap();
        // One f32 rounding of the exact product.
        assert_close("mul", y.data(), &f(&f64s(&a), &f64s(&b)), 1e-7);
        let (da, db) = mul_backward(&r, &a, &b).unwrap();
        let (fa, fb, fr) = (f64s(&a), f64s(&b), f64s(&r));
        let na = numeric_grad(&fa, |a| dot(&f(a, &fb), &fr));
        let nb = numeric_grad(&fb, |b| dot(&f(&fa, b), &fr));
        assert_close("mul da", da.data(), &na, 1e-6);
        assert_close("mul db", db.data(), &nb, 1e-6);
        assert_eq!(db.shape(), b.shape());
        assert!(mul(&a, &uniform(&mut g, &[2, 3, 4, 1], -1.0, 1.0)).is_err());
    }

    #[test]
    fn affine_applies_per_channel_values_and_its_gradient_scales() {
        let x = Tensor::from_fn(&[2, 3, 2], |i| i as f32);
        let y = affine(&x, &[1.0, 2.0, -1.0], &[0.5]).unwrap();
        let want: Vec<f32> = (0..12)
            .map(|i| i as f32 * [1.0, 2.0, -1.0][(i / 2) % 3] + 0.5)
            .collect();
        assert_bitwise("affine", y.data(), &want);
        let dx = affine_backward(&x, &[3.0]).unwrap();
        let want: Vec<f32> = (0..12).map(|i| i as f32 * 3.0).collect();
        assert_bitwise("affine_backward", dx.data(), &want);
        assert!(affine(&x, &[1.0, 2.0], &[0.0]).is_err());
    }

    #[test]
    fn products_are_batch_invariant() {
        let mut g = rng(12);
        let a = uniform(&mut g, &[4, 3, 30, 31], -1.0, 1.0);
        let b = uniform(&mut g, &[4, 3], -1.0, 1.0);
        for i in 0..4 {
            let alone = mul(&a.slice_rows(i, i + 1), &b.slice_rows(i, i + 1)).unwrap();
            let all = mul(&a, &b).unwrap();
            assert_bitwise("mul", alone.data(), all.slice_rows(i, i + 1).data());
        }
        assert_batch_invariant("affine", &a, |x| {
            affine(x, &[0.5, -2.0, 3.0], &[1.0, 0.0, -1.0]).unwrap()
        });
    }
}
