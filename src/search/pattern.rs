//! From a mask to a pattern and its predictive power: the top-k mask
//! positions filled with the canvas's pixels, hard-pasted into images of the
//! other classes; the share then classified as the target class.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::Result;
use crate::eval::DeviceModel;
use crate::tensor::Tensor;

/// The `k` positions (flat `row * W + col`) with the largest mask values,
/// largest first. The mask moves in steps of `lr` and is clamped, so it
/// lives on a few dozen levels with large exact ties (at 0 and 1 above
/// all); a tie is broken by `tie` (the mask averaged over the last epoch:
/// the pixel the optimisation kept higher for longer goes first), and only
/// an exact tie of both goes to the smaller position, so the choice is
/// deterministic. An empty `tie` (results stored before it was kept)
/// leaves ties to position.
pub fn top_k(mask: &[f32], tie: &[f32], k: usize) -> Vec<usize> {
    let tie_of = |i: usize| tie.get(i).copied().unwrap_or(0.0);
    let mut idx: Vec<usize> = (0..mask.len()).collect();
    idx.sort_by(|&a, &b| {
        mask[b]
            .total_cmp(&mask[a])
            .then(tie_of(b).total_cmp(&tie_of(a)))
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// Pastes the canvas's pixels at `positions` (all channels) into one
/// `[C, H, W]` image: a hard replacement, as the authors' evaluation does.
pub fn stamp(img: &mut [f32], canvas: &[f32], positions: &[usize], plane: usize) {
    for ch in 0..img.len() / plane {
        for &p in positions {
            img[ch * plane + p] = canvas[ch * plane + p];
        }
    }
}

/// Stamps every image of a batch `[N, C, H, W]`.
pub fn stamp_batch(x: &mut Tensor, canvas: &[f32], positions: &[usize], plane: usize) {
    let per = canvas.len();
    for img in x.data_mut().chunks_mut(per) {
        stamp(img, canvas, positions, plane);
    }
}

/// Predictive power for one source class.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourcePower {
    /// The source (true) class of the stamped images.
    pub source: usize,
    /// Images of that class evaluated.
    pub images: usize,
    /// Share of stamped images classified as the target.
    pub stamped: f64,
    /// Share of the same images, clean, classified as the target.
    pub clean: f64,
}

/// Predictive power of a pattern over all other classes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Power {
    /// Pattern size.
    pub k: usize,
    /// Share of all stamped other-class images classified as the target.
    pub overall: f64,
    /// Share of the same images, clean, classified as the target.
    pub clean: f64,
    /// Per source class.
    pub per_source: Vec<SourcePower>,
}

/// Predictions of the model on every image of the test set, clean (computed
/// once per run and shared by all patterns).
pub fn clean_predictions<B: Backend>(
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    batch: usize,
) -> Result<Vec<usize>> {
    let idx: Vec<usize> = (0..test.len()).collect();
    crate::eval::predict_all(model, test, &idx, batch, |_| Ok(()), |_| {})
}

/// Predictive power of the pattern (canvas pixels at `positions`) towards
/// `target` on `images` (per source class), against the clean predictions.
#[allow(clippy::too_many_arguments)]
pub fn predictive_power<B: Backend>(
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    target: usize,
    canvas: &[f32],
    positions: &[usize],
    images: &[Vec<usize>],
    clean: &[usize],
    batch: usize,
) -> Result<Power> {
    let [_, h, w] = test.shape();
    let plane = h * w;
    let mut per_source = Vec::new();
    let (mut hit, mut clean_hit, mut total) = (0usize, 0usize, 0usize);
    for (source, idx) in images.iter().enumerate() {
        if source == target || idx.is_empty() {
            continue;
        }
        let preds = crate::eval::predict_all(
            model,
            test,
            idx,
            batch,
            |x| {
                stamp_batch(x, canvas, positions, plane);
                Ok(())
            },
            |_| {},
        )?;
        let s = preds.iter().filter(|&&p| p == target).count();
        let c = idx.iter().filter(|&&i| clean[i] == target).count();
        per_source.push(SourcePower {
            source,
            images: idx.len(),
            stamped: s as f64 / idx.len() as f64,
            clean: c as f64 / idx.len() as f64,
        });
        hit += s;
        clean_hit += c;
        total += idx.len();
    }
    Ok(Power {
        k: positions.len(),
        overall: hit as f64 / total.max(1) as f64,
        clean: clean_hit as f64 / total.max(1) as f64,
        per_source,
    })
}

/// The k values of a default sweep for `pixels` positions: the powers of
/// two below it, then all pixels (the minimal k is refined by bisection).
pub fn default_sweep(pixels: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = std::iter::successors(Some(1usize), |k| Some(k * 2))
        .take_while(|&k| k < pixels)
        .collect();
    ks.push(pixels);
    ks
}

/// The smallest k whose predictive power reaches `threshold`, given a
/// power function of k: first over the sorted `sweep`, then by bisection
/// between the last k below and the first k at or above the threshold
/// (top-k sets are nested, so power grows with k in practice). `None` when
/// even the largest k of the sweep stays below.
pub fn minimal_k(
    sweep: &[(usize, f64)],
    threshold: f64,
    mut power_of: impl FnMut(usize) -> Result<f64>,
) -> Result<Option<usize>> {
    let Some(first_ok) = sweep.iter().position(|&(_, p)| p >= threshold) else {
        return Ok(None);
    };
    let mut hi = sweep[first_ok].0;
    let mut lo = if first_ok == 0 {
        0
    } else {
        sweep[first_ok - 1].0
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if power_of(mid)? >= threshold {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Some(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tie_across_k_goes_to_the_larger_last_epoch_average_not_the_lower_position() {
        // Two clear winners, then six pixels tied at 0.5 of which k = 4
        // takes two. The tied pixels' averages rise with position, so
        // position order (0, 1 first) and average order (7, 6 first) differ.
        let mask = [0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5, 0.9, 0.0];
        let avg = [0.40, 0.41, 0.42, 0.90, 0.43, 0.44, 0.47, 0.48, 0.80, 0.1];
        let chosen = top_k(&mask, &avg, 4);
        assert_eq!(chosen, vec![3, 8, 7, 6]);
        let by_position = top_k(&mask, &[], 4);
        assert_eq!(by_position, vec![3, 8, 0, 1]);
        assert_ne!(chosen[2..], by_position[2..]);
    }

    #[test]
    fn the_final_mask_outranks_the_average() {
        // A pixel with a lower final value stays behind even with a higher average.
        let chosen = top_k(&[0.6, 0.5], &[0.1, 0.9], 1);
        assert_eq!(chosen, vec![0]);
    }

    #[test]
    fn an_exact_tie_of_both_goes_to_the_smaller_position() {
        assert_eq!(top_k(&[0.5; 4], &[0.3, 0.7, 0.7, 0.3], 2), vec![1, 2]);
    }
}
