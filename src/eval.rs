//! Evaluation of a classifier on a dataset: clean accuracy (overall, per
//! class, confusion matrix), attack success rate of a trigger, and robust
//! accuracy under PGD.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::backend::{Backend, EvalRunner};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::tensor::Tensor;
use crate::train::adversarial::{pgd_attack, Attack};
use crate::train::poison::Trigger;

/// A model's parameters on a backend, ready to run in eval mode (the
/// search, evaluation and attacks): through the backend's own runner when it
/// has one (the GPU's fused path), else through the generic graph runner.
pub struct DeviceModel<'a, B: Backend> {
    /// The backend.
    pub be: &'a B,
    /// The graph.
    pub graph: &'a Graph,
    /// One buffer per graph parameter.
    pub params: Vec<B::Buf>,
    runner: Option<Box<dyn EvalRunner<B::Buf> + 'a>>,
    /// What errors call the model (its file, when the caller gives it).
    label: String,
    /// Forward passes so far, so that a non-finite result names its pass.
    passes: AtomicUsize,
}

impl<'a, B: Backend> DeviceModel<'a, B> {
    /// Uploads host parameters.
    pub fn upload(be: &'a B, graph: &'a Graph, params: &[Tensor]) -> Result<Self> {
        graph.check_params(params)?;
        let params = params
            .iter()
            .map(|t| be.upload(t))
            .collect::<Result<Vec<_>>>()?;
        DeviceModel::new(be, graph, params)
    }

    /// Parameters already on the backend; prepares the backend's own runner.
    pub fn new(be: &'a B, graph: &'a Graph, params: Vec<B::Buf>) -> Result<Self> {
        let runner = be.eval_runner(graph, &params)?;
        Ok(DeviceModel {
            be,
            graph,
            params,
            runner,
            label: graph.arch.clone(),
            passes: AtomicUsize::new(0),
        })
    }

    /// Always the generic graph runner, never the backend's own (so tests
    /// can hold the two together).
    pub fn generic(be: &'a B, graph: &'a Graph, params: Vec<B::Buf>) -> Self {
        DeviceModel {
            be,
            graph,
            params,
            runner: None,
            label: graph.arch.clone(),
            passes: AtomicUsize::new(0),
        }
    }

    /// Names the model in errors (e.g. by its weights file; the
    /// architecture's name otherwise).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// What errors call the model.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Counts a forward pass; returns its number (from 1).
    fn next_pass(&self) -> usize {
        self.passes.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the backend's own runner is in use.
    pub fn is_native(&self) -> bool {
        self.runner.is_some()
    }

    /// Gives the parameter buffers back.
    pub fn into_params(self) -> Vec<B::Buf> {
        self.params
    }

    /// Eval-mode logits of a host batch `[n, C, H, W]`. A NaN or infinite
    /// logit is an error naming the model and the pass: read as a class it
    /// would give a confident wrong answer.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let pass = self.next_pass();
        let xb = self.be.upload(x)?;
        let y = match &self.runner {
            Some(r) => r.logits(&xb)?,
            None => self.graph.forward(self.be, &self.params, &xb)?,
        };
        let y = self.be.download(&y)?;
        self.check(pass, "logits", y.data())?;
        Ok(y)
    }

    fn check(&self, pass: usize, what: &str, values: &[f32]) -> Result<()> {
        finite_or_error(values, || {
            format!("model `{}`: {what} of forward pass {pass}", self.label)
        })
    }

    /// Predicted class of each image of a host batch.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<usize>> {
        Ok(self.logits(x)?.argmax_rows())
    }

    /// Per-sample cross-entropy, host logits and the gradient of the
    /// weighted loss with respect to a batch already on the backend
    /// (`weights` as in [`Backend::softmax_cross_entropy`]).
    /// A NaN or infinite loss or logit is an error naming the model and the
    /// pass (see [`check_finite`]).
    pub fn pass(&self, x: B::Buf, labels: &[usize], weights: &[f32]) -> Result<ModelPass<B::Buf>> {
        let pass = self.next_pass();
        let out = if let Some(r) = &self.runner {
            let (losses, logits, dx) = r.loss_and_input_grad(&x, labels, weights)?;
            ModelPass {
                losses,
                logits: self.be.download(&logits)?,
                dx,
            }
        } else {
            let trace = self.graph.forward_trace(self.be, &self.params, x)?;
            let (losses, dlogits) =
                self.be
                    .softmax_cross_entropy(trace.logits(), labels, weights)?;
            let logits = self.be.download(trace.logits())?;
            let dx = self
                .graph
                .backward(self.be, &self.params, &trace, dlogits, false)?
                .dx;
            ModelPass { losses, logits, dx }
        };
        self.check(pass, "logits", out.logits.data())?;
        self.check(pass, "cross-entropy", &out.losses)?;
        Ok(out)
    }

    /// Mean cross-entropy loss and input gradient (eval mode) of a host batch.
    pub fn loss_and_input_grad(&self, x: &Tensor, labels: &[usize]) -> Result<(f32, Tensor)> {
        let n = labels.len();
        let weights = vec![1.0 / n as f32; n];
        let out = self.pass(self.be.upload(x)?, labels, &weights)?;
        let loss = out.losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
        Ok((loss as f32, self.be.download(&out.dx)?))
    }
}

/// What one eval-mode forward and backward pass over a batch gives.
pub struct ModelPass<Buf> {
    /// Per-sample cross-entropy (unweighted).
    pub losses: Vec<f32>,
    /// Logits `[N, K]`.
    pub logits: Tensor,
    /// Gradient of the weighted loss with respect to the input.
    pub dx: Buf,
}

/// Fails unless every value is finite: a NaN or infinite logit or loss
/// during a run means the weights overflow (or are corrupt), and every
/// figure computed from it would be meaningless (NaN logits all read as
/// class 0). `what` names the model and the values (e.g. "model `m.safetensors`:
/// logits"), `step` the forward pass or search step they came from; the
/// error gives the first bad element's index.
pub fn check_finite(what: &str, step: usize, values: &[f32]) -> Result<()> {
    finite_or_error(values, || format!("{what} at step {step}"))
}

fn finite_or_error(values: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Msg(format!(
            "{}: element {i} is {} ({} of {} values non-finite); the model overflows or its \
             weights are corrupt, so no result computed from it can be trusted",
            what(),
            values[i],
            values.iter().filter(|v| !v.is_finite()).count(),
            values.len()
        ))),
    }
}

/// Checks that a dataset fits a model: image shape and class count.
pub fn check_fits(graph: &Graph, data: &Dataset) -> Result<()> {
    if data.shape() != graph.input {
        return Err(Error::arg(
            "--data",
            format!(
                "{} holds {:?} images, but the model takes {:?}",
                data.name(),
                data.shape(),
                graph.input
            ),
        ));
    }
    if data.num_classes() != graph.num_classes {
        return Err(Error::arg(
            "--data",
            format!(
                "{} has {} classes, but the model predicts {}",
                data.name(),
                data.num_classes(),
                graph.num_classes
            ),
        ));
    }
    Ok(())
}

/// Clean accuracy of a model on a dataset.
#[derive(Clone, Debug, Serialize)]
pub struct Accuracy {
    /// Images evaluated.
    pub images: usize,
    /// Share classified correctly.
    pub accuracy: f64,
    /// Share classified correctly, per true class.
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// Predictions for the images `idx`, in batches, after `transform` (which
/// may stamp a trigger or do nothing) is applied to each host batch.
pub fn predict_all<B: Backend>(
    model: &DeviceModel<'_, B>,
    data: &Dataset,
    idx: &[usize],
    batch: usize,
    mut transform: impl FnMut(&mut Tensor) -> Result<()>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<usize>> {
    let mut preds = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(batch.max(1)) {
        let mut x = data.batch(chunk);
        transform(&mut x)?;
        preds.extend(model.predict(&x)?);
        progress(chunk.len());
    }
    Ok(preds)
}

/// Clean accuracy, per-class accuracy and confusion matrix over all of `data`.
pub fn accuracy<B: Backend>(
    model: &DeviceModel<'_, B>,
    data: &Dataset,
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Accuracy> {
    check_fits(model.graph, data)?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let preds = predict_all(model, data, &idx, batch, |_| Ok(()), progress)?;
    Ok(summarise(data.labels(), &preds, data.num_classes()))
}

/// Accuracy figures from labels and predictions.
pub fn summarise(labels: &[usize], preds: &[usize], classes: usize) -> Accuracy {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&y, &p) in labels.iter().zip(preds) {
        confusion[y][p] += 1;
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let n: usize = row.iter().sum();
            if n == 0 {
                0.0
            } else {
                row[c] as f64 / n as f64
            }
        })
        .collect();
    Accuracy {
        images: labels.len(),
        accuracy: if labels.is_empty() {
            0.0
        } else {
            correct as f64 / labels.len() as f64
        },
        per_class,
        confusion,
    }
}

/// Attack success rate of a trigger: the share of test images of classes
/// other than `target` that, with the trigger stamped, are classified as `target`.
#[derive(Clone, Debug, Serialize)]
pub struct AttackSuccess {
    /// The target class.
    pub target: usize,
    /// Non-target images evaluated.
    pub images: usize,
    /// Share of triggered images classified as the target.
    pub asr: f64,
    /// Share of the same images, clean, classified as the target.
    pub clean_to_target: f64,
}

/// Measures the attack success rate of `trigger` towards `target`.
pub fn attack_success<B: Backend>(
    model: &DeviceModel<'_, B>,
    data: &Dataset,
    trigger: &Trigger,
    target: usize,
    batch: usize,
) -> Result<AttackSuccess> {
    check_fits(model.graph, data)?;
    if target >= data.num_classes() {
        return Err(Error::arg(
            "--target",
            format!(
                "class {target} does not exist ({} classes)",
                data.num_classes()
            ),
        ));
    }
    trigger.check_fits(data.shape())?;
    let idx: Vec<usize> = (0..data.len())
        .filter(|&i| data.label(i) != target)
        .collect();
    let hit =
        |p: &[usize]| p.iter().filter(|&&c| c == target).count() as f64 / p.len().max(1) as f64;
    let stamped = predict_all(model, data, &idx, batch, |x| trigger.apply_batch(x), |_| {})?;
    let clean = predict_all(model, data, &idx, batch, |_| Ok(()), |_| {})?;
    Ok(AttackSuccess {
        target,
        images: idx.len(),
        asr: hit(&stamped),
        clean_to_target: hit(&clean),
    })
}

/// Accuracy under an L-infinity PGD attack.
#[derive(Clone, Debug, Serialize)]
pub struct Robustness {
    /// The attack.
    pub attack: Attack,
    /// Images evaluated.
    pub images: usize,
    /// Clean accuracy on the same images.
    pub clean_accuracy: f64,
    /// Accuracy on the adversarial images.
    pub robust_accuracy: f64,
}

/// Robust accuracy under `attack` on the first `limit` images (all when None).
pub fn robust_accuracy<B: Backend>(
    model: &DeviceModel<'_, B>,
    data: &Dataset,
    attack: &Attack,
    batch: usize,
    limit: Option<usize>,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Result<Robustness> {
    check_fits(model.graph, data)?;
    let n = limit.unwrap_or(data.len()).min(data.len());
    if n == 0 {
        // An accuracy over no images would read as 0%, not as "unmeasured".
        return Err(Error::Msg(format!(
            "robust accuracy needs at least 1 image; {} has {} and the limit is {limit:?}",
            data.name(),
            data.len()
        )));
    }
    let (mut clean_ok, mut robust_ok) = (0usize, 0usize);
    for (b, start) in (0..n).step_by(batch.max(1)).enumerate() {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let x = data.batch(&idx);
        let y = data.batch_labels(&idx);
        let clean = model.predict(&x)?;
        let adv = pgd_attack(model, &x, &y, attack, seed.wrapping_add(b as u64))?;
        let robust = model.predict(&adv)?;
        clean_ok += clean.iter().zip(&y).filter(|(p, t)| p == t).count();
        robust_ok += robust.iter().zip(&y).filter(|(p, t)| p == t).count();
        progress(idx.len());
    }
    Ok(Robustness {
        attack: attack.clone(),
        images: n,
        clean_accuracy: clean_ok as f64 / n.max(1) as f64,
        robust_accuracy: robust_ok as f64 / n.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finite_passes_finite_values_and_names_the_first_bad_one() {
        check_finite("model `m`: search CE", 3, &[0.0, -1.5, f32::MAX]).unwrap();
        let e = check_finite("model `m`: search CE", 7, &[0.5, f32::INFINITY, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model `m`: search CE at step 7")
                && e.contains("element 1 is inf")
                && e.contains("2 of 3"),
            "{e}"
        );
    }
}
