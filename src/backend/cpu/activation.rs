//! The activations of [`Activation`] and their input gradients, one value
//! at a time through [`Activation::apply`] and [`Activation::grad`].

use rayon::prelude::*;

use super::{expect_shape, ELEMENTWISE_CHUNK};
use crate::backend::Activation;
use crate::error::Result;
use crate::tensor::Tensor;

/// `act(x)`, any shape.
pub(super) fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    act.check()?;
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(x.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(y, x)| {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = act.apply(v);
            }
        });
    Tensor::new(x.shape(), y)
}

/// `dy * act'(x)`.
pub(super) fn activation_backward(dy: &Tensor, x: &Tensor, act: Activation) -> Result<Tensor> {
    act.check()?;
    expect_shape("x", x, dy.shape())?;
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(x.data().par_chunks(ELEMENTWISE_CHUNK))
        .zip(dy.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((dx, x), dy)| {
            for ((dx, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                *dx = act.grad(v, g);
            }
        });
    Tensor::new(dy.shape(), dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    #[test]
    fn activation_is_batch_invariant_and_checks_shapes() {
        let mut g = rng(7);
        let x = uniform(&mut g, &[5, 3, 40, 41], -8.0, 8.0);
        let act = Activation::Silu;
        assert_batch_invariant("silu", &x, |x| activation(x, act).unwrap());
        let dy = uniform(&mut g, &[5, 3, 40, 41], -1.0, 1.0);
        assert!(activation_backward(&dy, &x.slice_rows(0, 2), act).is_err());
        let bad = Activation::Clip { min: 1.0, max: 0.0 };
        assert!(activation(&x, bad).is_err());
    }
}
