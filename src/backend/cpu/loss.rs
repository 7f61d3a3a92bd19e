//! Softmax cross-entropy, per sample, with its weighted gradient.

use rayon::prelude::*;

use super::dims2;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Per-sample losses `logsumexp(logits[n]) - logits[n, labels[n]]` and
/// `dlogits[n] = weights[n] * (softmax(logits[n]) - onehot(labels[n]))`.
///
/// Each row is computed on its own, in f64 after subtracting the row's
/// maximum, so large logits neither overflow nor lose the small terms.
pub(super) fn softmax_cross_entropy(
    logits: &Tensor,
    labels: &[usize],
    weights: &[f32],
) -> Result<(Vec<f32>, Tensor)> {
    let [n, k] = dims2("logits", logits.shape())?;
    for (what, len) in [("labels", labels.len()), ("weights", weights.len())] {
        if len != n {
            return Err(Error::Msg(format!(
                "softmax_cross_entropy: {len} {what} for {n} rows of logits"
            )));
        }
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= k) {
        return Err(Error::Msg(format!(
            "softmax_cross_entropy: label {l} of sample {i} is out of range for {k} classes"
        )));
    }
    let mut dlogits = vec![0.0f32; n * k];
    if k == 0 {
        return Ok((Vec::new(), Tensor::new(&[n, k], dlogits)?));
    }
    let losses = dlogits
        .par_chunks_mut(k)
        .zip(logits.data().par_chunks(k))
        .zip(labels.par_iter().zip(weights.par_iter()))
        .map(|((d, row), (&label, &w))| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let lse = max + sum.ln();
            for (j, (d, &v)) in d.iter_mut().zip(row).enumerate() {
                let p = (v as f64 - lse).exp();
                let target = if j == label { 1.0 } else { 0.0 };
                *d = (w as f64 * (p - target)) as f32;
            }
            (lse - row[label] as f64) as f32
        })
        .collect();
    Ok((losses, Tensor::new(&[n, k], dlogits)?))
}
