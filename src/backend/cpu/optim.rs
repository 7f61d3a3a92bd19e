//! Parameter and input updates: SGD with momentum, and the L-infinity PGD
//! step of adversarial training.

use rayon::prelude::*;

use super::mask::sign;
use super::{expect_shape, ELEMENTWISE_CHUNK};
use crate::backend::check::pgd_radius;
use crate::backend::SgdParams;
use crate::error::Result;
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
    pgd_radius(eps)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(&[v.len()], v.to_vec()).unwrap()
    }

    #[test]
    fn sgd_step_follows_pytorch_by_hand() {
        // g' = 0.5 + 0.01 * 1 = 0.51; v = 0.9 * 0.2 + 0.51 = 0.69;
        // p = 1 - 0.1 * 0.69 = 0.931.
        let (mut p, mut v) = (t(&[1.0]), t(&[0.2]));
        let sgd = SgdParams {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
        };
        sgd_step(&mut p, &t(&[0.5]), &mut v, sgd).unwrap();
        assert!((v.data()[0] - 0.69).abs() < 1e-7, "{:?}", v.data());
        assert!((p.data()[0] - 0.931).abs() < 1e-7, "{:?}", p.data());
    }

    #[test]
    fn sgd_from_zero_velocity_takes_pytorchs_first_step_then_uses_momentum() {
        // PyTorch's first step sets the buffer to g' itself.
        let (mut p, mut v) = (t(&[2.0, -1.0]), t(&[0.0, 0.0]));
        let sgd = SgdParams {
            lr: 0.5,
            momentum: 0.9,
            weight_decay: 0.0,
        };
        sgd_step(&mut p, &t(&[1.0, -2.0]), &mut v, sgd).unwrap();
        assert_eq!(v.data(), &[1.0, -2.0]);
        assert_eq!(p.data(), &[1.5, 0.0]);
        sgd_step(&mut p, &t(&[1.0, 0.0]), &mut v, sgd).unwrap();
        assert_near(v.data(), &[1.9, -1.8]);
        assert_near(p.data(), &[1.5 - 0.95, 0.9]);
        assert!(sgd_step(&mut p, &t(&[1.0]), &mut v, sgd).is_err());
    }

    fn assert_near(got: &[f32], want: &[f32]) {
        let ok = got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-7);
        assert!(ok && got.len() == want.len(), "{got:?} vs {want:?}");
    }

    #[test]
    fn pgd_step_ascends_by_sign_and_stays_in_the_ball_and_the_unit_box() {
        let x0 = t(&[0.5, 0.5, 0.5, 0.98, 0.02]);
        let mut x = t(&[0.5, 0.52, 0.5, 0.995, 0.02]);
        let g = t(&[1.0, 5.0, 0.0, 1.0, -1.0]);
        pgd_step(&mut x, &g, &x0, 0.01, 0.03).unwrap();
        // Up one step; up but capped at x0 + eps; no move for a zero
        // gradient; capped at 1 inside the ball; down one step.
        assert_near(x.data(), &[0.51, 0.53, 0.5, 1.0, 0.01]);
        pgd_step(&mut x, &g, &x0, 0.01, 0.03).unwrap();
        assert_near(x.data(), &[0.52, 0.53, 0.5, 1.0, 0.0]);
        // The box caps below too: 0 - 0.01 stays at 0.
        pgd_step(&mut x, &g, &x0, 0.01, 0.03).unwrap();
        assert_near(x.data(), &[0.53, 0.53, 0.5, 1.0, 0.0]);
        assert!(pgd_step(&mut x, &g, &x0, 0.01, -0.1).is_err());
        assert!(pgd_step(&mut x, &t(&[1.0]), &x0, 0.01, 0.03).is_err());
    }
}
