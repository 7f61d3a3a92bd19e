//! Softmax cross-entropy, per sample, with its weighted gradient.

use rayon::prelude::*;

use crate::backend::check::cross_entropy_args;
use crate::error::Result;
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
    let [n, k] = cross_entropy_args(logits.shape(), labels, weights)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    /// `sum_n weights[n] * (logsumexp(row) - row[label])` in f64.
    fn f64_weighted_ce(logits: &[f64], k: usize, labels: &[usize], weights: &[f32]) -> f64 {
        logits
            .chunks(k)
            .zip(labels.iter().zip(weights))
            .map(|(row, (&l, &w))| {
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                w as f64 * (lse - row[l])
            })
            .sum()
    }

    #[test]
    fn loss_is_log_softmax_by_hand() {
        let logits = Tensor::new(&[2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]).unwrap();
        let (losses, d) = softmax_cross_entropy(&logits, &[0, 2], &[1.0, 0.5]).unwrap();
        let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
        assert_close("losses", &losses, &[z.ln() - 1.0, 3f64.ln()], 1e-7);
        let p = [1f64.exp() / z, 2f64.exp() / z, 3f64.exp() / z];
        let want = [
            p[0] - 1.0,
            p[1],
            p[2],
            0.5 / 3.0,
            0.5 / 3.0,
            0.5 * (1.0 / 3.0 - 1.0),
        ];
        assert_close("dlogits", d.data(), &want, 1e-7);
    }

    #[test]
    fn huge_logits_neither_overflow_nor_lose_precision() {
        let big = Tensor::new(&[1, 3], vec![1000.0, 1001.0, 1002.0]).unwrap();
        let small = Tensor::new(&[1, 3], vec![0.0, 1.0, 2.0]).unwrap();
        let (lb, db) = softmax_cross_entropy(&big, &[1], &[1.0]).unwrap();
        let (ls, ds) = softmax_cross_entropy(&small, &[1], &[1.0]).unwrap();
        assert!(
            lb[0].is_finite() && (lb[0] - ls[0]).abs() < 1e-6,
            "{lb:?} vs {ls:?}"
        );
        assert_close("dlogits", db.data(), &f64s(&ds), 1e-6);
    }

    #[test]
    fn gradient_matches_central_differences_of_the_weighted_loss() {
        let mut g = rng(1);
        let (n, k) = (4, 5);
        let logits = uniform(&mut g, &[n, k], -3.0, 3.0);
        let labels = [0, 4, 2, 2];
        let weights = [0.25, 0.5, 0.05, 1.0];
        let (losses, d) = softmax_cross_entropy(&logits, &labels, &weights).unwrap();
        let per_sample: Vec<f64> = (0..n)
            .map(|i| {
                let row = &f64s(&logits)[i * k..(i + 1) * k];
                f64_weighted_ce(row, k, &labels[i..i + 1], &[1.0])
            })
            .collect();
        assert_close("losses", &losses, &per_sample, 1e-6);
        let num = numeric_grad(&f64s(&logits), |l| f64_weighted_ce(l, k, &labels, &weights));
        assert_close("dlogits", d.data(), &num, 1e-5);
    }

    #[test]
    fn each_row_is_batch_invariant() {
        let mut g = rng(2);
        let logits = uniform(&mut g, &[9, 10], -5.0, 5.0);
        let labels: Vec<usize> = (0..9).map(|i| (3 * i + 1) % 10).collect();
        let weights: Vec<f32> = (0..9).map(|i| 0.1 * i as f32).collect();
        let (losses, d) = with_threads(2, || {
            softmax_cross_entropy(&logits, &labels, &weights).unwrap()
        });
        for i in 0..9 {
            let (l, di) = softmax_cross_entropy(
                &logits.slice_rows(i, i + 1),
                &labels[i..=i],
                &weights[i..=i],
            )
            .unwrap();
            assert_bitwise("loss", &l, &losses[i..=i]);
            assert_bitwise("dlogits", di.data(), d.slice_rows(i, i + 1).data());
        }
    }

    #[test]
    fn a_label_out_of_range_is_an_error_naming_it() {
        let logits = Tensor::zeros(&[2, 10]);
        let err = softmax_cross_entropy(&logits, &[3, 10], &[1.0, 1.0]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("label 10") && msg.contains("sample 1"),
            "{msg}"
        );
        assert!(softmax_cross_entropy(&logits, &[3], &[1.0, 1.0]).is_err());
        assert!(softmax_cross_entropy(&logits, &[3, 3], &[1.0]).is_err());
        assert!(softmax_cross_entropy(&Tensor::zeros(&[2, 2, 5]), &[3, 3], &[1.0, 1.0]).is_err());
    }
}
