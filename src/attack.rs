//! L-infinity adversarial examples: PGD (Madry et al.) and FGSM with a random
//! start ("fast adversarial training", Wong et al. 2020, which is PGD with one
//! step of 1.25·ε from a random start). Inputs stay in [0, 1].

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::Backend;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::tensor::Tensor;

/// An L-infinity attack: `steps` signed-gradient steps of size `step` within
/// an ε-ball, optionally from a uniform random start.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attack {
    /// Radius of the ball.
    pub eps: f32,
    /// Step size.
    pub step: f32,
    /// Number of steps.
    pub steps: usize,
    /// Start from a uniform point of the ball instead of the clean image.
    pub random_start: bool,
}

impl Attack {
    /// PGD with `steps` steps of `step`, random start (Madry).
    pub fn pgd(eps: f32, step: f32, steps: usize) -> Result<Attack> {
        let a = Attack {
            eps,
            step,
            steps,
            random_start: true,
        };
        a.validate("--pgd")?;
        Ok(a)
    }

    /// FGSM from a random start with step 1.25·ε (Wong et al. 2020).
    pub fn fgsm_rs(eps: f32) -> Result<Attack> {
        Attack::pgd(eps, 1.25 * eps, 1)
    }

    /// Parses `eps,step,steps` (e.g. `0.1,0.01,20`).
    pub fn parse_pgd(s: &str, option: &str) -> Result<Attack> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let bad = || {
            Error::arg(
                option,
                format!("`{s}` is not EPS,STEP,STEPS (e.g. 0.1,0.01,20)"),
            )
        };
        if parts.len() != 3 {
            return Err(bad());
        }
        let eps: f32 = parts[0].parse().map_err(|_| bad())?;
        let step: f32 = parts[1].parse().map_err(|_| bad())?;
        let steps: usize = parts[2].parse().map_err(|_| bad())?;
        let a = Attack {
            eps,
            step,
            steps,
            random_start: true,
        };
        a.validate(option)?;
        Ok(a)
    }

    /// Parses an adversarial-training attack: `pgd:EPS,STEP,STEPS` or
    /// `fgsm:EPS` (FGSM from a random start, see [`Attack::fgsm_rs`]).
    pub fn parse_training(s: &str, option: &str) -> Result<Attack> {
        match s.split_once(':') {
            Some(("pgd", rest)) => Attack::parse_pgd(rest, option),
            Some(("fgsm", eps)) => {
                let eps: f32 = eps
                    .parse()
                    .map_err(|e| Error::arg(option, format!("`{eps}` is not a number: {e}")))?;
                if !(0.0..=1.0).contains(&eps) {
                    return Err(Error::arg(
                        option,
                        format!("epsilon {eps} is outside [0, 1]"),
                    ));
                }
                Attack::fgsm_rs(eps)
            }
            _ => Err(Error::arg(
                option,
                format!("`{s}` is not pgd:EPS,STEP,STEPS or fgsm:EPS"),
            )),
        }
    }

    /// Checks ε in [0, 1], a positive step and at least one step.
    pub fn validate(&self, option: &str) -> Result<()> {
        if !(0.0..=1.0).contains(&self.eps) {
            return Err(Error::arg(
                option,
                format!("epsilon {} is outside [0, 1]", self.eps),
            ));
        }
        if !(self.step > 0.0 && self.step.is_finite()) {
            return Err(Error::arg(
                option,
                format!("step {} must be positive", self.step),
            ));
        }
        if self.steps == 0 {
            return Err(Error::arg(option, "at least one step is needed"));
        }
        Ok(())
    }
}

/// Adversarial versions of the host batch `x` (labels `y`) against the
/// eval-mode model `params`, left on the device.
pub fn pgd_on_device<B: Backend>(
    be: &B,
    graph: &Graph,
    params: &[B::Buf],
    x: &Tensor,
    y: &[usize],
    attack: &Attack,
    seed: u64,
) -> Result<B::Buf> {
    pgd_loop(be, x, y, attack, seed, |xa, weights| {
        let trace = graph.forward_trace(be, params, xa)?;
        let (_, dlogits) = be.softmax_cross_entropy(trace.logits(), y, weights)?;
        Ok(graph.backward(be, params, &trace, dlogits, false)?.dx)
    })
}

/// The PGD iterations, with the input gradient of the mean loss supplied
/// by `grad(copy of the current batch, per-sample weights)`.
fn pgd_loop<B: Backend>(
    be: &B,
    x: &Tensor,
    y: &[usize],
    attack: &Attack,
    seed: u64,
    grad: impl Fn(B::Buf, &[f32]) -> Result<B::Buf>,
) -> Result<B::Buf> {
    let x0 = be.upload(x)?;
    let start = if attack.random_start {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let eps = attack.eps;
        Tensor::from_fn(x.shape(), |i| {
            (x.data()[i] + rng.random_range(-eps..=eps)).clamp(0.0, 1.0)
        })
    } else {
        x.clone()
    };
    let mut xa = be.upload(&start)?;
    let weights = vec![1.0 / y.len().max(1) as f32; y.len()];
    for _ in 0..attack.steps {
        let copy = be.reshape(&xa, be.shape(&xa))?;
        let dx = grad(copy, &weights)?;
        be.pgd_step(&mut xa, &dx, &x0, attack.step, attack.eps)?;
    }
    Ok(xa)
}

/// Adversarial versions of a host batch against a loaded model.
pub fn pgd_attack<B: Backend>(
    model: &DeviceModel<'_, B>,
    x: &Tensor,
    y: &[usize],
    attack: &Attack,
    seed: u64,
) -> Result<Tensor> {
    // Through the model's eval-mode fused graph.
    let xa = pgd_loop(model.be, x, y, attack, seed, |xa, weights| {
        Ok(model.pass(xa, y, weights)?.dx)
    })?;
    model.be.download(&xa)
}
