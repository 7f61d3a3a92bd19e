//! The search ops: the composite of canvas and other-class images under a
//! mask, the mask gradient reduced per search, and the signed mask step.
//!
//! Search `s` owns images `s*B .. (s+1)*B`; nothing crosses searches, so S
//! searches batched together give the bits of S separate runs.

use rayon::prelude::*;

use super::{dims4, expect_shape, ELEMENTWISE_CHUNK};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `(S, B, C, H*W)` of a search batch, checked: `canvas [S,C,H,W]`, `others`
/// (and anything shaped like it) `[S*B,C,H,W]`.
fn search_dims(canvas: &Tensor, others: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let [s, c, h, w] = dims4("canvas", canvas.shape())?;
    let [n, oc, oh, ow] = dims4("others", others.shape())?;
    if s == 0 {
        return Err(Error::tensor("canvas", "no searches (S = 0)"));
    }
    if (oc, oh, ow) != (c, h, w) || n % s != 0 {
        let b = (n / s).max(1);
        return Err(Error::shape("others", &[s * b, c, h, w], others.shape()));
    }
    Ok((s, n / s, c, h * w))
}

/// `out[s*B+b] = mask[s] * canvas[s] + (1 - mask[s]) * others[s*B+b]`, the
/// `[S,H,W]` mask broadcast over channels.
pub(super) fn composite(canvas: &Tensor, mask: &Tensor, others: &Tensor) -> Result<Tensor> {
    let (s, b, c, hw) = search_dims(canvas, others)?;
    let [_, _, h, w] = dims4("canvas", canvas.shape())?;
    expect_shape("mask", mask, &[s, h, w])?;
    let mut out = vec![0.0f32; others.len()];
    if hw > 0 && b > 0 {
        out.par_chunks_mut(c * hw)
            .zip(others.data().par_chunks(c * hw))
            .enumerate()
            .for_each(|(i, (out_i, other_i))| {
                let si = i / b;
                let m = &mask.data()[si * hw..(si + 1) * hw];
                let canvas_s = &canvas.data()[si * c * hw..(si + 1) * c * hw];
                for ((o, x), cv) in out_i
                    .chunks_exact_mut(hw)
                    .zip(other_i.chunks_exact(hw))
                    .zip(canvas_s.chunks_exact(hw))
                {
                    for (((o, &x), &cv), &m) in o.iter_mut().zip(x).zip(cv).zip(m) {
                        *o = m * cv + (1.0 - m) * x;
                    }
                }
            });
    }
    Tensor::new(others.shape(), out)
}

/// The mask gradient of each search, `[S,H,W]`:
/// `l1_grad + sum_{b,c} dx[s*B+b,c] * (canvas[s,c] - others[s*B+b,c])`.
///
/// The sum runs in f32, over `b` then `c` (image by image, channel by
/// channel), from zero; `l1_grad` is added last.
pub(super) fn mask_grad(
    dx: &Tensor,
    canvas: &Tensor,
    others: &Tensor,
    l1_grad: f32,
) -> Result<Tensor> {
    let (s, b, c, hw) = search_dims(canvas, others)?;
    expect_shape("dx", dx, others.shape())?;
    let [_, _, h, w] = dims4("canvas", canvas.shape())?;
    let mut grad = vec![0.0f32; s * hw];
    if hw > 0 {
        grad.par_chunks_mut(hw).enumerate().for_each(|(si, g)| {
            let canvas_s = &canvas.data()[si * c * hw..(si + 1) * c * hw];
            let images = si * b * c * hw..(si + 1) * b * c * hw;
            let dx_s = &dx.data()[images.clone()];
            let others_s = &others.data()[images];
            for (dx_i, other_i) in dx_s.chunks_exact(c * hw).zip(others_s.chunks_exact(c * hw)) {
                for ((d, x), cv) in dx_i
                    .chunks_exact(hw)
                    .zip(other_i.chunks_exact(hw))
                    .zip(canvas_s.chunks_exact(hw))
                {
                    for (((g, &d), &x), &cv) in g.iter_mut().zip(d).zip(x).zip(cv) {
                        *g += d * (cv - x);
                    }
                }
            }
            g.iter_mut().for_each(|g| *g += l1_grad);
        });
    }
    Tensor::new(&[s, h, w], grad)
}

/// `sign(g)` with `sign(0) = 0` (and 0 for NaN, so a NaN gradient leaves
/// the value where it is).
pub(super) fn sign(g: f32) -> f32 {
    if g > 0.0 {
        1.0
    } else if g < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Signed-gradient descent on the mask: `m = clamp(m - lr * sign(g), 0, 1)`.
pub(super) fn sign_step_clamp(mask: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
    expect_shape("grad", grad, mask.shape())?;
    mask.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(grad.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                *m = (*m as f64 - lr * sign(g) as f64).clamp(0.0, 1.0) as f32;
            }
        });
    Ok(())
}
