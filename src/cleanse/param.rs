//! Neural Cleanse's box constraint through tanh and its optimiser (Keras
//! 2.2 Adam), on the host in f64: the parameters are one mask plane and one
//! pattern image per class, small beside a forward pass, and per-element
//! host arithmetic keeps every class independent of the others (batched
//! and one-at-a-time runs agree bit for bit).

use serde::{Deserialize, Serialize};

/// `K.epsilon()`, the ε of the tanh mapping and of Adam.
pub const EPS: f64 = 1e-7;

/// A value in [0, 1] from an unconstrained parameter:
/// `tanh(a) / (2 - ε) + 0.5`, clamped to [0, 1]: as 1/(2 - ε) exceeds 1/2,
/// a saturated tanh would overshoot by 2.5e-8 in f64 (Keras computes in f32,
/// where 2 - 1e-7 rounds to 2 and the range is [0, 1] exactly).
pub fn squash(a: f64) -> f64 {
    (a.tanh() / (2.0 - EPS) + 0.5).clamp(0.0, 1.0)
}

/// `d squash / d a = (1 - tanh(a)^2) / (2 - ε)`.
pub fn squash_grad(a: f64) -> f64 {
    let t = a.tanh();
    (1.0 - t * t) / (2.0 - EPS)
}

/// The parameter whose [`squash`] is `v` (`v` in [0, 1]): the original's
/// initialisation maps its random values back this way.
pub fn unsquash(v: f64) -> f64 {
    ((v - 0.5) * (2.0 - EPS)).atanh()
}

/// Adam's constants (Neural Cleanse's: lr 0.1, β1 0.5, β2 0.9, ε 1e-7).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamParams {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            lr: 0.1,
            beta1: 0.5,
            beta2: 0.9,
            eps: EPS,
        }
    }
}

/// Adam's state for one parameter vector, updated as Keras 2.2 does:
/// `lr_t = lr * sqrt(1 - β2^t) / (1 - β1^t)`, `p -= lr_t * m / (sqrt(v) + ε)`.
#[derive(Clone, Debug)]
pub struct Adam {
    p: AdamParams,
    t: i32,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adam {
    /// Fresh state (zero moments) for `n` parameters.
    pub fn new(n: usize, p: AdamParams) -> Adam {
        Adam {
            p,
            t: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One update of `params` down the gradient `grad`.
    pub fn step(&mut self, params: &mut [f64], grad: &[f64]) {
        debug_assert_eq!(params.len(), self.m.len());
        debug_assert_eq!(grad.len(), self.m.len());
        self.t += 1;
        let AdamParams {
            lr,
            beta1,
            beta2,
            eps,
        } = self.p;
        let lr_t = lr * (1.0 - beta2.powi(self.t)).sqrt() / (1.0 - beta1.powi(self.t));
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = beta1 * *m + (1.0 - beta1) * g;
            *v = beta2 * *v + (1.0 - beta2) * g * g;
            *p -= lr_t * *m / (v.sqrt() + eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tanh_mapping_keeps_masks_and_patterns_in_the_unit_interval() {
        for a in [
            f64::NEG_INFINITY,
            -1e300,
            -40.0,
            -3.0,
            0.0,
            1e-9,
            3.0,
            40.0,
            1e300,
            f64::INFINITY,
        ] {
            let v = squash(a);
            assert!((0.0..=1.0).contains(&v), "squash({a}) = {v}");
            let f = v as f32;
            assert!((0.0..=1.0).contains(&f), "squash({a}) as f32 = {f}");
            assert!(squash_grad(a) >= 0.0);
        }
        assert_eq!(squash(0.0), 0.5);
    }

    #[test]
    fn unsquash_inverts_squash_over_the_initial_range() {
        for v in [0.0, 1e-6, 0.25, 0.5, 0.9, 0.999_999] {
            let back = squash(unsquash(v));
            assert!((back - v).abs() < 1e-9, "{v} -> {back}");
        }
    }

    #[test]
    fn squash_gradient_matches_central_differences() {
        for a in [-2.0, -0.3, 0.0, 0.7, 1.5] {
            let h = 1e-6;
            let num = (squash(a + h) - squash(a - h)) / (2.0 * h);
            assert!((squash_grad(a) - num).abs() < 1e-8, "at {a}");
        }
    }

    #[test]
    fn adam_first_step_moves_each_parameter_by_about_lr_against_its_gradient() {
        // t = 1: m = (1-β1) g, v = (1-β2) g², lr_t = lr sqrt(1-β2)/(1-β1),
        // so the step is lr * g / (|g| + ε / sqrt(1-β2)).
        let p = AdamParams::default();
        let mut adam = Adam::new(3, p);
        let mut x = vec![1.0, 1.0, 1.0];
        adam.step(&mut x, &[2.0, -0.5, 0.0]);
        let moved = |g: f64| p.lr * g / (g.abs() + p.eps / (1.0 - p.beta2).sqrt());
        for (i, g) in [2.0f64, -0.5].into_iter().enumerate() {
            assert!((x[i] - (1.0 - moved(g))).abs() < 1e-12, "{x:?}");
        }
        assert_eq!(x[2], 1.0);
    }

    #[test]
    fn adam_second_step_follows_the_bias_corrected_moments() {
        let p = AdamParams::default();
        let mut adam = Adam::new(1, p);
        let mut x = vec![0.0];
        adam.step(&mut x, &[1.0]);
        let after_one = x[0];
        adam.step(&mut x, &[-3.0]);
        let m = p.beta1 * (1.0 - p.beta1) * 1.0 + (1.0 - p.beta1) * -3.0;
        let v = p.beta2 * (1.0 - p.beta2) * 1.0 + (1.0 - p.beta2) * 9.0;
        let lr_t = p.lr * (1.0 - p.beta2 * p.beta2).sqrt() / (1.0 - p.beta1 * p.beta1);
        let want = after_one - lr_t * m / (v.sqrt() + p.eps);
        assert!((x[0] - want).abs() < 1e-15, "{} vs {want}", x[0]);
    }
}
