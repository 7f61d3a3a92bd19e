//! Evaluation of a classifier on a dataset: clean accuracy (overall, per
//! class, confusion matrix), attack success rate of a trigger, and robust
//! accuracy under PGD.

use serde::Serialize;

use crate::attack::{pgd_attack, Attack};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::tensor::Tensor;
use crate::train::poison::Trigger;

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
