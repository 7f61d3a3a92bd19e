//! Parameter and input updates: SGD with momentum, and the L-infinity PGD
//! step of adversarial training.

use rayon::prelude::*;

use super::mask::sign;
use super::{expect_shape, ELEMENTWISE_CHUNK};
use crate::backend::SgdParams;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One SGD-with-momentum update in place, PyTorch's convention (no
/// dampening, no Nesterov): `g' = g + wd * p; v = momentum * v + g';
/// p -= lr * v`. A zero velocity makes the first step PyTorch's first step,
/// whose buffer starts as `g'`.
pub(super) fn sgd_step(
    param: &mut Tensor,
    grad: &Tensor,
    velocity: &mut Tensor,
    p: SgdParams,
) -> Result<()> {
    expect_shape("grad", grad, param.shape())?;
    expect_shape("velocity", velocity, param.shape())?;
    param
        .data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(velocity.data_mut().par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(grad.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((w, v), g)| {
            for ((w, v), &g) in w.iter_mut().zip(v).zip(g) {
                let g = g + p.weight_decay * *w;
                *v = p.momentum * *v + g;
                *w -= p.lr * *v;
            }
        });
    Ok(())
}

/// One L-infinity PGD ascent step in place:
/// `x = clamp(clamp(x + step * sign(g), x0 - eps, x0 + eps), 0, 1)`.
pub(super) fn pgd_step(
    x: &mut Tensor,
    grad: &Tensor,
    x0: &Tensor,
    step: f32,
    eps: f32,
) -> Result<()> {
    expect_shape("grad", grad, x.shape())?;
    expect_shape("x0", x0, x.shape())?;
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::arg(
            "eps",
            format!("PGD radius must be >= 0, got {eps}"),
        ));
    }
    x.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(grad.data().par_chunks(ELEMENTWISE_CHUNK))
        .zip(x0.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((x, g), x0)| {
            for ((x, &g), &x0) in x.iter_mut().zip(g).zip(x0) {
                let stepped = *x + step * sign(g);
                *x = stepped.max(x0 - eps).min(x0 + eps).clamp(0.0, 1.0);
            }
        });
    Ok(())
}
