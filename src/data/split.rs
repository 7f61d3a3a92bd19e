//! Seeded sampling: the per-class search set and shuffled batch orders.
//!
//! Both use ChaCha8 seeded with [`rand_chacha::rand_core::SeedableRng::seed_from_u64`] and
//! draw bounded integers with our own unbiased rejection method on raw
//! `u64` outputs, so a seed gives the same result on every platform and
//! across `rand` releases (only the ChaCha stream itself is relied on).

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A uniform integer in `0..n` (`n > 0`), unbiased (Lemire's
/// multiply-and-reject).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    // Reject the low products that would over-represent some values.
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = (rng.next_u64() as u128) * (n as u128);
        if (m as u64) >= threshold {
            return (m >> 64) as usize;
        }
    }
}

/// Fisher–Yates on the first `k` positions: afterwards `v[..k]` is a uniform
/// random `k`-subset of `v` in random order.
fn partial_shuffle(v: &mut [usize], k: usize, rng: &mut ChaCha8Rng) {
    let n = v.len();
    for i in 0..k.min(n.saturating_sub(1)) {
        let j = i + below(rng, n - i);
        v.swap(i, j);
    }
}

/// The number of items `floor(frac · n)` takes, with `frac` clamped to
/// `[0, 1]` (NaN counts as 0) and a tolerance for floating-point error, so
/// that 0.29 · 100 gives 29 and not 28.
pub fn sample_size(frac: f64, n: usize) -> usize {
    let frac = if frac.is_nan() {
        0.0
    } else {
        frac.clamp(0.0, 1.0)
    };
    (((frac * n as f64) + 1e-9).floor() as usize).min(n)
}

/// The seeded per-class split (the search set): for each class,
/// `floor(frac · n_class)` (see [`sample_size`]) indices drawn without
/// replacement from that class's indices, sorted ascending in the output.
///
/// Class `c` draws from its own ChaCha stream (`seed`, stream `c`), so its
/// sample depends only on the seed, `c` and its own index list, not on the
/// other classes' sizes. Reproducible for a seed.
pub fn per_class_sample(class_indices: &[Vec<usize>], frac: f64, seed: u64) -> Vec<Vec<usize>> {
    class_indices
        .iter()
        .enumerate()
        .map(|(c, idx)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(c as u64);
            let k = sample_size(frac, idx.len());
            let mut v = idx.clone();
            partial_shuffle(&mut v, k, &mut rng);
            v.truncate(k);
            v.sort_unstable();
            v
        })
        .collect()
}

/// A deterministic shuffle of `items` for `seed` (Fisher–Yates with a
/// seeded ChaCha8 RNG): the same seed always gives the same order.
pub fn shuffled(items: &[usize], seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = items.to_vec();
    let k = v.len();
    partial_shuffle(&mut v, k, &mut rng);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Ten classes of different sizes, interleaved like real labels.
    fn classes() -> Vec<Vec<usize>> {
        let sizes = [1000, 37, 5, 0, 1, 250, 99, 100, 3, 64];
        let mut out = vec![Vec::new(); sizes.len()];
        let mut i = 0;
        let mut left = sizes.to_vec();
        while left.iter().any(|&n| n > 0) {
            for (c, n) in left.iter_mut().enumerate() {
                if *n > 0 {
                    out[c].push(i);
                    i += 1;
                    *n -= 1;
                }
            }
        }
        out
    }

    #[test]
    fn sizes_are_floor_frac_n() {
        let cls = classes();
        let sizes: Vec<usize> = per_class_sample(&cls, 0.2, 7)
            .iter()
            .map(Vec::len)
            .collect();
        // Class sizes 1000, 37, 5, 0, 1, 250, 99, 100, 3, 64 at 20%.
        assert_eq!(sizes, vec![200, 7, 1, 0, 0, 50, 19, 20, 0, 12]);
        for (frac, want) in [(0.0, 0), (1.0, 1000), (0.999, 999), (0.29, 290)] {
            assert_eq!(
                per_class_sample(&cls, frac, 1)[0].len(),
                want,
                "frac {frac}"
            );
        }
        assert_eq!(per_class_sample(&cls, 1.0, 1), cls);
        assert_eq!(sample_size(0.29, 100), 29);
        assert_eq!(sample_size(0.2, 1000), 200);
        assert_eq!(sample_size(0.2, 4), 0);
        assert_eq!(sample_size(1.5, 4), 4);
        assert_eq!(sample_size(-1.0, 4), 0);
        assert_eq!(sample_size(f64::NAN, 4), 0);
    }

    #[test]
    fn samples_are_sorted_subsets_disjoint_across_classes() {
        let cls = classes();
        let s = per_class_sample(&cls, 0.3, 1);
        let mut seen = HashSet::new();
        for (sample, all) in s.iter().zip(&cls) {
            assert!(sample.windows(2).all(|w| w[0] < w[1]), "not ascending");
            let all: HashSet<_> = all.iter().collect();
            for i in sample {
                assert!(all.contains(i), "{i} is not of its class");
                assert!(seen.insert(*i), "{i} drawn twice");
            }
        }
    }

    #[test]
    fn same_seed_same_sample_other_seed_other_sample() {
        let cls = classes();
        let a = per_class_sample(&cls, 0.2, 42);
        assert_eq!(a, per_class_sample(&cls, 0.2, 42));
        let b = per_class_sample(&cls, 0.2, 43);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[5], b[5]);
    }

    #[test]
    fn a_class_sample_ignores_other_classes() {
        let cls = classes();
        let a = per_class_sample(&cls, 0.2, 9);
        let mut other = cls.clone();
        other[0].truncate(10);
        other[6].clear();
        let b = per_class_sample(&other, 0.2, 9);
        assert_eq!(a[5], b[5]);
        assert_eq!(a[9], b[9]);
    }

    #[test]
    fn sample_is_not_just_the_first_indices() {
        let cls = classes();
        let s = per_class_sample(&cls, 0.2, 3);
        assert_ne!(s[0], cls[0][..200].to_vec());
        // Spread over the whole class: some draws from each half.
        let mid = cls[0][500];
        assert!(s[0].iter().any(|&i| i < mid) && s[0].iter().any(|&i| i > mid));
    }

    #[test]
    fn shuffled_is_a_seeded_permutation() {
        let items: Vec<usize> = (100..200).collect();
        let a = shuffled(&items, 5);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, items);
        assert_ne!(a, items);
        assert_eq!(a, shuffled(&items, 5));
        assert_ne!(a, shuffled(&items, 6));
        assert!(shuffled(&[], 1).is_empty());
        assert_eq!(shuffled(&[3], 1), vec![3]);
    }

    #[test]
    fn shuffle_positions_are_roughly_uniform() {
        // Where item 0 of 4 ends up over many seeds: each slot about 1/4.
        let mut counts = [0usize; 4];
        for seed in 0..4000 {
            let v = shuffled(&[0, 1, 2, 3], seed);
            counts[v.iter().position(|&x| x == 0).unwrap()] += 1;
        }
        for c in counts {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for n in [1, 2, 3, 7, 1000, usize::MAX] {
            for _ in 0..100 {
                assert!(below(&mut rng, n) < n);
            }
        }
    }
}
