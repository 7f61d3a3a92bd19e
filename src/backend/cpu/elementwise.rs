//! Elementwise ops: ReLU and its gradient, sums.

use rayon::prelude::*;

use super::{expect_shape, ELEMENTWISE_CHUNK};
use crate::error::Result;
use crate::tensor::Tensor;

/// `out[i] = f(a[i], b[i])` in parallel chunks.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(a.par_chunks(ELEMENTWISE_CHUNK))
        .zip(b.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((o, a), b)| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

/// `max(x, 0)`; a NaN stays NaN, as in PyTorch.
pub(super) fn relu(x: &Tensor) -> Tensor {
    let mut y = x.clone();
    y.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .for_each(|c| {
            c.iter_mut()
                .for_each(|v| *v = if *v <= 0.0 { 0.0 } else { *v })
        });
    y
}

/// `dy` where the ReLU's output `y` is positive, else 0.
pub(super) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    expect_shape("y", y, dy.shape())?;
    let dx = zip_map(dy.data(), y.data(), |g, v| if v > 0.0 { g } else { 0.0 });
    Tensor::new(dy.shape(), dx)
}

/// `a + b`, same shapes.
pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    expect_shape("b", b, a.shape())?;
    Tensor::new(a.shape(), zip_map(a.data(), b.data(), |x, y| x + y))
}

/// `a += b`, same shapes.
pub(super) fn add_assign(a: &mut Tensor, b: &Tensor) -> Result<()> {
    expect_shape("b", b, a.shape())?;
    a.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(b.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    Ok(())
}
