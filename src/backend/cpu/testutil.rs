//! Helpers shared by the CPU backend's tests: seeded data, float64
//! comparisons, central differences, batch-invariance and thread-count
//! checks.
//!
//! Gradient checks follow one pattern. For an op `y = f(x)` the test writes
//! a plain float64 re-implementation `f64_f`, checks the backend's forward
//! against it, and takes `L(x) = sum(f64_f(x) * r)` for a fixed random `r`.
//! The backend's backward, fed `dy = r`, must match the central differences
//! of `L`. In float64 with step 1e-6 the differences are exact to about
//! 1e-9 (truncation ~h^2, rounding ~1e-16/h), so the tolerance of 1e-4
//! (relative to the largest gradient) only has to absorb the backend's f32
//! rounding; a real bug (a wrong index, a missing term, a wrong sign) is off
//! by the size of the gradient itself.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tensor::Tensor;

/// A seeded generator, so every test sees the same data on every run.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A tensor of values drawn uniformly from `lo..hi`.
pub fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    Tensor::from_fn(shape, |_| rng.random_range(lo..hi))
}

/// A tensor whose values are all distinct and at least `gap` apart (a
/// shuffled ramp), so no max or ReLU kink lies within a finite-difference
/// step of them.
pub fn distinct(rng: &mut ChaCha8Rng, shape: &[usize], gap: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    Tensor::from_fn(shape, |i| (order[i] as f32 - n as f32 / 2.0) * gap)
}

/// The values of a tensor in f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

/// `sum(a * b)` in f64.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `f` at `x`, one coordinate at a time (step 1e-6).
pub fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    const H: f64 = 1e-6;
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = x[i];
            x[i] = v + H;
            let up = f(&x);
            x[i] = v - H;
            let down = f(&x);
            x[i] = v;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Asserts `max |got - want| <= tol * max(1, max |want|)`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .enumerate()
        .fold(
            (0, 0.0),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    assert!(
        err <= tol * scale,
        "{what}: |diff| {err:e} at [{i}] (got {}, want {}) > {tol:e} * {scale}",
        got[i],
        want[i]
    );
}

/// Asserts two results are the same bits.
pub fn assert_bitwise(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: differs at [{i}]: {} vs {}", a[i], b[i]);
    }
}

/// Runs `f` on a rayon pool of `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Asserts that `f` gives the same bits on pools of 1, 2 and 3 threads
/// (every output, concatenated, as `f` returns them).
pub fn assert_thread_independent(what: &str, f: impl Fn() -> Vec<f32> + Sync + Send) {
    let one = with_threads(1, &f);
    for threads in [2, 3] {
        let many = with_threads(threads, &f);
        assert_bitwise(&format!("{what} with 1 vs {threads} threads"), &one, &many);
    }
}

/// Asserts that `f` maps each image (row along the first axis) of `x`
/// alone to the same bits as inside the whole batch. `f` is run on a pool
/// of 2 threads, so the batch really is split between threads.
pub fn assert_batch_invariant(what: &str, x: &Tensor, f: impl Fn(&Tensor) -> Tensor + Sync + Send) {
    with_threads(2, || {
        let batch = f(x);
        let n = x.shape()[0];
        for i in 0..n {
            let alone = f(&x.slice_rows(i, i + 1));
            assert_bitwise(
                &format!("{what}: image {i} alone vs in a batch of {n}"),
                alone.data(),
                batch.slice_rows(i, i + 1).data(),
            );
        }
    });
}

/// Concatenates tensors' values (to compare several outputs at once).
pub fn flat(ts: &[&Tensor]) -> Vec<f32> {
    ts.iter().flat_map(|t| t.data().iter().copied()).collect()
}
