//! From a mask to a pattern and its predictive power: the top-k mask
//! positions filled with the canvas's pixels, hard-pasted into images of the
//! other classes; the share then classified as the target class.

use serde::{Deserialize, Serialize};

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::data::Dataset;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
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

/// Blends the canvas into every image of a batch `[N, C, H, W]` at the
/// mask's values, `m * canvas + (1 - m) * x` with the `[H, W]` mask over all
/// channels: the composite the search optimised, evaluated as it is, with
/// no pixel cut away. The CPU reference's `composite` computes it (one
/// search of N images), so the formula lives in one place.
pub fn blend_batch(x: &mut Tensor, canvas: &[f32], mask: &[f32]) -> Result<()> {
    let (h, w) = match x.shape() {
        [_, _, h, w] => (*h, *w),
        other => {
            return Err(Error::tensor(
                "images",
                format!("a blend needs a batch [N, C, H, W], got shape {other:?}"),
            ))
        }
    };
    let canvas = Tensor::new(&[1, canvas.len() / (h * w).max(1), h, w], canvas.to_vec())?;
    let mask = Tensor::new(&[1, h, w], mask.to_vec())?;
    *x = CpuBackend::REFERENCE.composite(&canvas, &mask, x)?;
    Ok(())
}

/// How a pattern is put into the images whose predictions measure its power.
#[derive(Clone, Copy, Debug)]
pub enum Paste<'a> {
    /// The canvas's pixels at these positions, hard-pasted: the top-k
    /// pattern, as the authors evaluate it.
    Stamp(&'a [usize]),
    /// The canvas blended in at this `[H, W]` mask's values: the optimised
    /// mask itself. A diffuse trigger (a blend) lives in many pixels at low
    /// mask values, which no top-k cut keeps.
    Blend(&'a [f32]),
}

/// Predictive power of the pattern (the canvas put in as `paste` says)
/// towards `target` on `images` (per source class), against the clean
/// predictions. The target's own images count only with `include_target`
/// (the authors' ImageNet protocol). `k` is the number of positions
/// stamped, or every pixel of the image for a blend.
#[allow(clippy::too_many_arguments)]
pub fn predictive_power<B: Backend>(
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    target: usize,
    canvas: &[f32],
    paste: Paste<'_>,
    images: &[Vec<usize>],
    clean: &[usize],
    batch: usize,
    include_target: bool,
) -> Result<Power> {
    let [_, h, w] = test.shape();
    let plane = h * w;
    let mut per_source = Vec::new();
    let (mut hit, mut clean_hit, mut total) = (0usize, 0usize, 0usize);
    for (source, idx) in images.iter().enumerate() {
        if (source == target && !include_target) || idx.is_empty() {
            continue;
        }
        let preds = crate::eval::predict_all(
            model,
            test,
            idx,
            batch,
            |x| match paste {
                Paste::Stamp(positions) => {
                    stamp_batch(x, canvas, positions, plane);
                    Ok(())
                }
                Paste::Blend(mask) => blend_batch(x, canvas, mask),
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
        k: match paste {
            Paste::Stamp(positions) => positions.len(),
            Paste::Blend(_) => plane,
        },
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

/// Parses the `--k-sweep` option: `default` (gives `default`), `none` (no
/// sweep) or a comma list of k values, returned sorted without repeats.
pub fn parse_k_sweep(s: &str, default: Vec<usize>) -> Result<Vec<usize>> {
    match s {
        "default" => Ok(default),
        "none" => Ok(Vec::new()),
        list => {
            let mut v: Vec<usize> = list
                .split(',')
                .map(|k| k.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| {
                    Error::arg(
                        "--k-sweep",
                        format!("`{list}` is not a comma list of whole numbers: {e}"),
                    )
                })?;
            v.sort_unstable();
            v.dedup();
            Ok(v)
        }
    }
}

/// Most k values measured one by one inside a gap of the sweep; a wider gap
/// is first narrowed on a grid of this many points.
const SCAN_POINTS: usize = 32;

/// The smallest measured k whose predictive power reaches `threshold`,
/// given the sorted `sweep` and a power function of k. `None` when no
/// sweep point reaches it.
///
/// Power need not rise with k: on a white canvas a large patch becomes its
/// own evidence, so power may rise, fall and rise again. Nothing here
/// assumes an order. Let `hi` be the first sweep point that reaches the
/// threshold and `lo` the sweep point before it. The gap `(lo, hi)` is
/// measured at every k when it holds at most [`SCAN_POINTS`] values;
/// otherwise on [`SCAN_POINTS`] evenly spaced k, and the sub-gap below the
/// leftmost grid point that reaches is refined the same way (a grid point
/// that misses only bounds that sub-gap from the left). The answer is the
/// smallest k among all measured ones that reaches the threshold; a k that
/// was never measured can still reach it, which is why the sweep is kept in
/// the report beside the minimal k.
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
    // Invariant: `hi` reaches the threshold and is the smallest measured k
    // that does; every k in `(lo, hi)` is still unmeasured.
    while hi - lo > 1 {
        let gap = hi - lo - 1;
        if gap <= SCAN_POINTS {
            for k in lo + 1..hi {
                if power_of(k)? >= threshold {
                    return Ok(Some(k));
                }
            }
            return Ok(Some(hi));
        }
        // Grid points lo + i*gap/(SCAN_POINTS+1), strictly inside the gap.
        let mut prev = lo;
        let mut found = None;
        for i in 1..=SCAN_POINTS {
            let k = lo + i * (gap + 1) / (SCAN_POINTS + 1);
            if k <= prev || k >= hi {
                continue;
            }
            if power_of(k)? >= threshold {
                found = Some((prev, k));
                break;
            }
            prev = k;
        }
        match found {
            Some((below, k)) => {
                lo = below;
                hi = k;
            }
            // No grid point reached: refine the last sub-gap, next to `hi`.
            None => lo = prev,
        }
    }
    Ok(Some(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blend_is_the_composite_the_search_optimised() {
        let (n, c, h, w) = (2, 3, 2, 3);
        let plane = h * w;
        let canvas: Vec<f32> = (0..c * plane)
            .map(|i| (0.05 + 0.37 * i as f32) % 1.0)
            .collect();
        let mask = vec![0.0, 1.0, 0.25, 0.5, 0.125, 0.9];
        let x: Vec<f32> = (0..n * c * plane)
            .map(|i| (0.11 * i as f32) % 1.0)
            .collect();
        let mut blended = Tensor::new(&[n, c, h, w], x.clone()).unwrap();
        blend_batch(&mut blended, &canvas, &mask).unwrap();

        let be = CpuBackend::REFERENCE;
        let up = |shape: &[usize], v: &[f32]| be.upload(&Tensor::new(shape, v.to_vec()).unwrap());
        let composite = be
            .composite(
                &up(&[1, c, h, w], &canvas).unwrap(),
                &up(&[1, h, w], &mask).unwrap(),
                &up(&[n, c, h, w], &x).unwrap(),
            )
            .unwrap();
        assert_eq!(blended.data(), be.download(&composite).unwrap().data());
        // Mask 0 keeps the image's pixel, mask 1 takes the canvas's, in every channel.
        for img in 0..n {
            for ch in 0..c {
                let at = |p: usize| (img * c + ch) * plane + p;
                assert_eq!(blended.data()[at(0)], x[at(0)]);
                assert_eq!(blended.data()[at(1)], canvas[ch * plane + 1]);
            }
        }
    }

    #[test]
    fn a_k_sweep_list_is_sorted_without_repeats() {
        assert_eq!(parse_k_sweep("8, 2,8,4", vec![1]).unwrap(), [2, 4, 8]);
        assert_eq!(parse_k_sweep("default", vec![1, 3]).unwrap(), [1, 3]);
        assert!(parse_k_sweep("none", vec![1]).unwrap().is_empty());
        let e = parse_k_sweep("2,x", vec![1]).unwrap_err().to_string();
        assert!(e.contains("--k-sweep") && e.contains("`2,x`"), "{e}");
    }

    /// A power function that counts its calls.
    fn counted(
        f: impl Fn(usize) -> f64,
    ) -> (
        impl FnMut(usize) -> Result<f64>,
        std::rc::Rc<std::cell::Cell<usize>>,
    ) {
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let c = calls.clone();
        (
            move |k| {
                c.set(c.get() + 1);
                Ok(f(k))
            },
            calls,
        )
    }

    fn sweep_of(ks: &[usize], f: impl Fn(usize) -> f64) -> Vec<(usize, f64)> {
        ks.iter().map(|&k| (k, f(k))).collect()
    }

    #[test]
    fn a_narrow_peak_below_a_later_rise_is_the_minimal_k() {
        // Power reaches 0.9 at k = 33 only, falls, and rises for good at 50:
        // bisection between the sweep points 32 and 64 would answer 50.
        let f = |k: usize| match k {
            33 => 0.95,
            k if k >= 50 => 0.95,
            _ => 0.1,
        };
        let sweep = sweep_of(&[1, 2, 4, 8, 16, 32, 64, 128], f);
        let (p, _) = counted(f);
        assert_eq!(minimal_k(&sweep, 0.9, p).unwrap(), Some(33));
    }

    #[test]
    fn power_that_rises_and_falls_gives_the_first_k_that_reaches() {
        // A white canvas: power peaks around k = 40 and falls for large k,
        // so only one sweep point (the default k, 38) reaches the threshold.
        let f = |k: usize| if (35..=45).contains(&k) { 0.92 } else { 0.5 };
        let sweep = sweep_of(&[1, 2, 4, 8, 16, 32, 38, 64, 128, 256, 512, 784], f);
        let (p, _) = counted(f);
        assert_eq!(minimal_k(&sweep, 0.9, p).unwrap(), Some(35));
    }

    #[test]
    fn a_wide_gap_is_narrowed_on_a_grid_and_finds_the_leftmost_reaching_region() {
        // Gap (256, 512): 255 values, wider than one scan. Power reaches at
        // 300..=320 and again from 400 on.
        let f = |k: usize| {
            if (300..=320).contains(&k) || k >= 400 {
                0.99
            } else {
                0.2
            }
        };
        let sweep = sweep_of(&[128, 256, 512], f);
        let (p, calls) = counted(f);
        assert_eq!(minimal_k(&sweep, 0.9, p).unwrap(), Some(300));
        // Far fewer measurements than the 255 of a full scan.
        assert!(calls.get() < 100, "{} measurements", calls.get());
    }

    #[test]
    fn monotone_power_gives_the_crossing() {
        let f = |k: usize| k as f64 / 100.0;
        let sweep = sweep_of(&[1, 2, 4, 8, 16, 32, 64, 128], f);
        let (p, _) = counted(f);
        assert_eq!(minimal_k(&sweep, 0.9, p).unwrap(), Some(90));
    }

    #[test]
    fn no_sweep_point_reaching_means_not_reached_and_no_measurement() {
        let f = |_k: usize| 0.3;
        let sweep = sweep_of(&[1, 2, 4], f);
        let (p, calls) = counted(f);
        assert_eq!(minimal_k(&sweep, 0.9, p).unwrap(), None);
        assert_eq!(calls.get(), 0);
    }

    #[test]
    fn the_first_sweep_point_reaching_at_k_1_is_the_answer() {
        let f = |_k: usize| 1.0;
        let sweep = sweep_of(&[1, 2, 4], f);
        let (p, _) = counted(f);
        assert_eq!(minimal_k(&sweep, 0.9, p).unwrap(), Some(1));
    }

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
