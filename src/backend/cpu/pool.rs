//! Max, average and global average pooling with their gradients. Each
//! (image, channel) plane is independent and computed sequentially, one
//! plane per task.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::elementwise::relu_gate;
use super::{dims2, dims4, expect_shape};
use crate::backend::check::PoolGeom;
use crate::backend::PoolParams;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Pool geometry, shared with the GPU backend; the window walks are CPU-only.
type Geom = PoolGeom;

impl Geom {
    /// Input indices `lo..hi` that window `o` covers along an axis of
    /// extent `len` (padding clipped away; never empty).
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.p.stride;
        let lo = start.saturating_sub(self.p.pad);
        let hi = (start + self.p.kernel).saturating_sub(self.p.pad).min(len);
        (lo, hi)
    }

    /// Flat index (within the plane) and value of the maximum of the window
    /// at `(oh, ow)`: the first one in row-major order, except that a NaN
    /// wins, as in PyTorch.
    fn argmax(&self, plane: &[f32], oh: usize, ow: usize) -> (usize, f32) {
        let (h0, h1) = self.window(oh, self.h);
        let (w0, w1) = self.window(ow, self.w);
        let mut best = (h0 * self.w + w0, plane[h0 * self.w + w0]);
        for ih in h0..h1 {
            for iw in w0..w1 {
                let i = ih * self.w + iw;
                let v = plane[i];
                if v > best.1 || v.is_nan() {
                    best = (i, v);
                }
            }
        }
        best
    }

    /// Whether every window is the whole 2x2 block at `(2 oh, 2 ow)`:
    /// `MaxPool2d(2)` with no padding and no partial last window, the
    /// common case, which takes a walk without window arithmetic.
    fn is_pairs(&self) -> bool {
        let p = self.p;
        p.kernel == 2
            && p.stride == 2
            && p.pad == 0
            && 2 * self.oh <= self.h
            && 2 * self.ow <= self.w
    }

    /// The two input rows under output row `oh` of an [`Geom::is_pairs`]
    /// pool, cut to the `2 ow` columns its windows cover.
    fn row_pair<'a>(&self, plane: &'a [f32], oh: usize) -> (&'a [f32], &'a [f32]) {
        let top = &plane[2 * oh * self.w..][..2 * self.w];
        let (top, bottom) = top.split_at(self.w);
        (&top[..2 * self.ow], &bottom[..2 * self.ow])
    }
}

/// [`Geom::argmax`] of one 2x2 window in row-major order: the position
/// (0..4) and value of its first maximum, or of its last NaN. Written as
/// selects, not branches, since the winner depends on the data alone.
#[inline(always)]
fn first_max4(v: [f32; 4]) -> (usize, f32) {
    let (mut k, mut best) = (0, v[0]);
    for (i, &x) in v.iter().enumerate().skip(1) {
        let wins = x > best || x.is_nan();
        k = if wins { i } else { k };
        best = if wins { x } else { best };
    }
    (k, best)
}

/// Runs `f(input plane, output plane)` over every (image, channel) pair.
fn per_plane(
    input: &[f32],
    in_plane: usize,
    out: &mut [f32],
    out_plane: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync + Send,
) {
    if in_plane == 0 || out_plane == 0 {
        return;
    }
    out.par_chunks_mut(out_plane)
        .zip(input.par_chunks(in_plane))
        .for_each(|(o, i)| f(i, o));
}

/// Max pooling; padded positions never win.
pub(super) fn max_pool2d(x: &Tensor, p: PoolParams) -> Result<Tensor> {
    let g = Geom::new(x.shape(), p)?;
    let mut y = vec![0.0f32; g.n * g.c * g.oh * g.ow];
    let plane = if g.is_pairs() { pairs_max } else { walk_max };
    per_plane(x.data(), g.h * g.w, &mut y, g.oh * g.ow, |xp, yp| {
        plane(&g, xp, yp)
    });
    Tensor::new(&g.out_shape(), y)
}

/// Gradient of [`max_pool2d`], routed to the first maximum of each window;
/// when `gated` (`x` is a ReLU's output), also through that ReLU's
/// gradient ([`relu_gate`] by `x`), in the same pass.
pub(super) fn max_pool2d_backward(
    x: &Tensor,
    dy: &Tensor,
    p: PoolParams,
    gated: bool,
) -> Result<Tensor> {
    let g = Geom::new(x.shape(), p)?;
    expect_shape("dy", dy, &g.out_shape())?;
    let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
    if out_plane == 0 {
        return Tensor::new(x.shape(), vec![0.0; x.len()]);
    }
    let planes = x
        .data()
        .par_chunks(in_plane)
        .zip(dy.data().par_chunks(out_plane));
    if g.is_pairs() {
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            dx.par_chunks_mut(in_plane)
                .zip(planes)
                .for_each(|(dxp, (xp, dyp))| match gated {
                    true => pairs_max_backward::<true>(&g, xp, dyp, dxp),
                    false => pairs_max_backward::<false>(&g, xp, dyp, dxp),
                });
        };
        // SAFETY: the planes cover `dx`, and `pairs_max_backward` writes
        // every value of its plane.
        let dx = unsafe { super::filled_by(x.len(), fill) };
        return Tensor::new(x.shape(), dx);
    }
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(in_plane)
        .zip(planes)
        .for_each(|(dxp, (xp, dyp))| {
            walk_max_backward(&g, xp, dyp, dxp);
            if gated {
                dxp.iter_mut()
                    .zip(xp)
                    .for_each(|(d, &y)| *d = relu_gate(*d, y));
            }
        });
    Tensor::new(x.shape(), dx)
}

/// One plane of [`max_pool2d`], window by window.
fn walk_max(g: &Geom, xp: &[f32], yp: &mut [f32]) {
    for oh in 0..g.oh {
        for ow in 0..g.ow {
            yp[oh * g.ow + ow] = g.argmax(xp, oh, ow).1;
        }
    }
}

/// One plane of [`max_pool2d_backward`], window by window, into a zeroed
/// `dxp` (overlapping windows add up).
fn walk_max_backward(g: &Geom, xp: &[f32], dyp: &[f32], dxp: &mut [f32]) {
    for oh in 0..g.oh {
        for ow in 0..g.ow {
            dxp[g.argmax(xp, oh, ow).0] += dyp[oh * g.ow + ow];
        }
    }
}

/// [`walk_max`] for a [`Geom::is_pairs`] pool: a row pair at a time, with
/// no window arithmetic.
fn pairs_max(g: &Geom, xp: &[f32], yp: &mut [f32]) {
    let vector = has_avx2();
    for (oh, yr) in yp.chunks_exact_mut(g.ow).enumerate() {
        let (top, bottom) = g.row_pair(xp, oh);
        pairs_row(top, bottom, yr, vector);
    }
}

/// Whether the 2x2 walks may take [`avx2`].
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One output row of [`pairs_max`] from its two input rows (`2 y.len()`
/// values each), its whole blocks of eight windows through [`avx2`] when
/// `vector` (which the caller has checked with [`has_avx2`]).
fn pairs_row(top: &[f32], bottom: &[f32], y: &mut [f32], vector: bool) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: the caller found AVX2.
        done = unsafe { avx2::pairs_row(top, bottom, y) };
    }
    let _ = vector;
    let windows = top[2 * done..]
        .chunks_exact(2)
        .zip(bottom[2 * done..].chunks_exact(2));
    for (y, (t, b)) in y[done..].iter_mut().zip(windows) {
        *y = first_max4([t[0], t[1], b[0], b[1]]).1;
    }
}

/// [`walk_max_backward`] for a [`Geom::is_pairs`] pool, gated by the
/// input when `GATED`. The windows do not overlap, so each covered input is
/// written once, the gradient or 0; the inputs no window covers (an odd
/// last row or column) get 0.
fn pairs_max_backward<const GATED: bool>(
    g: &Geom,
    xp: &[f32],
    dyp: &[f32],
    dxp: &mut [MaybeUninit<f32>],
) {
    let vector = has_avx2();
    for (oh, dyr) in dyp.chunks_exact(g.ow).enumerate() {
        let (top, bottom) = g.row_pair(xp, oh);
        let (dtop, dbottom) = dxp[2 * oh * g.w..][..2 * g.w].split_at_mut(g.w);
        pairs_row_backward::<GATED>(top, bottom, dyr, dtop, dbottom, vector);
        for v in dtop[2 * g.ow..].iter_mut().chain(&mut dbottom[2 * g.ow..]) {
            v.write(0.0);
        }
    }
    for v in &mut dxp[2 * g.oh * g.w..] {
        v.write(0.0);
    }
}

/// One output row's share of [`pairs_max_backward`]: the first `2
/// dy.len()` values of both gradient rows, through [`avx2`] when `vector`.
fn pairs_row_backward<const GATED: bool>(
    top: &[f32],
    bottom: &[f32],
    dy: &[f32],
    dtop: &mut [MaybeUninit<f32>],
    dbottom: &mut [MaybeUninit<f32>],
    vector: bool,
) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: the caller found AVX2.
        done = unsafe { avx2::pairs_row_backward::<GATED>(top, bottom, dy, dtop, dbottom) };
    }
    let _ = vector;
    let (top, bottom, dy) = (&top[2 * done..], &bottom[2 * done..], &dy[done..]);
    let (dtop, dbottom) = (&mut dtop[2 * done..], &mut dbottom[2 * done..]);
    let pass = |won: bool, d: f32, x: f32| -> f32 {
        let v = if won { d } else { 0.0 };
        if GATED {
            relu_gate(v, x)
        } else {
            v
        }
    };
    let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
    let grads = dtop.chunks_exact_mut(2).zip(dbottom.chunks_exact_mut(2));
    for ((&d, (t, b)), (dt, db)) in dy.iter().zip(windows).zip(grads) {
        let v = [t[0], t[1], b[0], b[1]];
        let k = first_max4(v).0;
        dt[0].write(pass(k == 0, d, v[0]));
        dt[1].write(pass(k == 1, d, v[1]));
        db[0].write(pass(k == 2, d, v[2]));
        db[1].write(pass(k == 3, d, v[3]));
    }
}

/// The 2x2 walks eight windows at a time: the two rows are split into the
/// windows' left and right values, and [`first_max4`]'s comparisons run as
/// vector compares and blends, in its order, so the winner, and so every
/// bit, is the scalar walk's. Whole blocks of eight only: the scalar walk
/// finishes a row (masked loads and stores cost more than it on Zen 3).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Values `2 j .. 2 j + 16` of a row, split into the left and right
    /// values of windows `j .. j + 8`.
    #[target_feature(enable = "avx2")]
    unsafe fn split(row: &[f32], j: usize) -> (__m256, __m256) {
        let p = row[2 * j..][..16].as_ptr();
        let (lo, hi) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
        let left = in_order(_mm256_shuffle_ps(lo, hi, 0x88));
        let right = in_order(_mm256_shuffle_ps(lo, hi, 0xDD));
        (left, right)
    }

    /// `[l0 l2 h0 h2 | l4 l6 h4 h6]` (a shuffle of two rows' halves `l`
    /// and `h`) as `[l0 l2 l4 l6 h0 h2 h4 h6]`: its 64-bit pieces reordered.
    #[target_feature(enable = "avx2")]
    fn in_order(v: __m256) -> __m256 {
        _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8))
    }

    /// The inverse of [`split`]: windows' left and right values stored as
    /// row values `2 j .. 2 j + 16`.
    #[target_feature(enable = "avx2")]
    unsafe fn join(row: &mut [MaybeUninit<f32>], j: usize, left: __m256, right: __m256) {
        let (a, b) = (
            _mm256_unpacklo_ps(left, right),
            _mm256_unpackhi_ps(left, right),
        );
        let p = row[2 * j..][..16].as_mut_ptr().cast::<f32>();
        _mm256_storeu_ps(p, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps(a, b, 0x31));
    }

    /// [`first_max4`](super::first_max4) of eight windows: the winner's
    /// position (as 0..4 in each lane) and value.
    #[target_feature(enable = "avx2")]
    fn first_max(v: [__m256; 4]) -> (__m256i, __m256) {
        let mut best = v[0];
        let mut k = _mm256_setzero_si256();
        for (i, &x) in v.iter().enumerate().skip(1) {
            let wins = _mm256_or_ps(
                _mm256_cmp_ps(x, best, _CMP_GT_OQ),
                _mm256_cmp_ps(x, x, _CMP_UNORD_Q),
            );
            best = _mm256_blendv_ps(best, x, wins);
            k = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(k),
                _mm256_castsi256_ps(_mm256_set1_epi32(i as i32)),
                wins,
            ));
        }
        (k, best)
    }

    /// The gradient that position `i` of eight windows gets: `d` where it
    /// won (and, when `GATED`, where its input `x` is positive), else 0.
    #[target_feature(enable = "avx2")]
    fn routed<const GATED: bool>(k: __m256i, i: i32, d: __m256, x: __m256) -> __m256 {
        let won = _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(i)));
        let g = _mm256_and_ps(won, d);
        if GATED {
            _mm256_and_ps(g, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ))
        } else {
            g
        }
    }

    /// The first whole blocks of eight of one output row of the 2x2 max
    /// pool; returns how many windows it did.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pairs_row(top: &[f32], bottom: &[f32], y: &mut [f32]) -> usize {
        let blocks = y.len() / 8 * 8;
        for j in (0..blocks).step_by(8) {
            let (t0, t1) = split(top, j);
            let (b0, b1) = split(bottom, j);
            let (_, best) = first_max([t0, t1, b0, b1]);
            _mm256_storeu_ps(y[j..][..8].as_mut_ptr(), best);
        }
        blocks
    }

    /// The first whole blocks of eight of one output row of the 2x2 max
    /// pool's gradient, through the ReLU that `top` and `bottom` are the
    /// output of when `GATED`: each window's winner gets its `dy` (0 where
    /// the gate shuts), the other three 0. Returns how many windows it did.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pairs_row_backward<const GATED: bool>(
        top: &[f32],
        bottom: &[f32],
        dy: &[f32],
        dtop: &mut [MaybeUninit<f32>],
        dbottom: &mut [MaybeUninit<f32>],
    ) -> usize {
        let blocks = dy.len() / 8 * 8;
        for j in (0..blocks).step_by(8) {
            let d = _mm256_loadu_ps(dy[j..][..8].as_ptr());
            let (t0, t1) = split(top, j);
            let (b0, b1) = split(bottom, j);
            let (k, _) = first_max([t0, t1, b0, b1]);
            let (g0, g1) = (routed::<GATED>(k, 0, d, t0), routed::<GATED>(k, 1, d, t1));
            let (g2, g3) = (routed::<GATED>(k, 2, d, b0), routed::<GATED>(k, 3, d, b1));
            join(dtop, j, g0, g1);
            join(dbottom, j, g2, g3);
        }
        blocks
    }
}

impl Geom {
    /// The divisor of the average-pooling window at `(oh, ow)`, as PyTorch
    /// computes it: the window clipped to the padded input when padding is
    /// counted, else clipped to the input. In floor mode with padding
    /// counted this is `kernel^2` for every window; in ceil mode the last
    /// windows may hang over the right padding and count less.
    fn avg_divisor(&self, oh: usize, ow: usize) -> f32 {
        let p = self.p;
        let extent = |o: usize, len: usize| {
            if p.count_include_pad {
                let start = o * p.stride;
                (start + p.kernel).min(len + 2 * p.pad) - start
            } else {
                let (lo, hi) = self.window(o, len);
                hi - lo
            }
        };
        (extent(oh, self.h) * extent(ow, self.w)) as f32
    }
}

/// Average pooling; the divisor follows `p.count_include_pad`.
pub(super) fn avg_pool2d(x: &Tensor, p: PoolParams) -> Result<Tensor> {
    let g = Geom::new(x.shape(), p)?;
    let mut y = vec![0.0f32; g.n * g.c * g.oh * g.ow];
    per_plane(x.data(), g.h * g.w, &mut y, g.oh * g.ow, |xp, yp| {
        for oh in 0..g.oh {
            let (h0, h1) = g.window(oh, g.h);
            for ow in 0..g.ow {
                let (w0, w1) = g.window(ow, g.w);
                let mut s = 0.0f32;
                for ih in h0..h1 {
                    s += xp[ih * g.w + w0..ih * g.w + w1].iter().sum::<f32>();
                }
                yp[oh * g.ow + ow] = s / g.avg_divisor(oh, ow);
            }
        }
    });
    Tensor::new(&g.out_shape(), y)
}

/// Gradient of [`avg_pool2d`] for an input of shape `x_shape`.
pub(super) fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], p: PoolParams) -> Result<Tensor> {
    let g = Geom::new(x_shape, p)?;
    expect_shape("dy", dy, &g.out_shape())?;
    let mut dx = vec![0.0f32; g.n * g.c * g.h * g.w];
    per_plane(dy.data(), g.oh * g.ow, &mut dx, g.h * g.w, |dyp, dxp| {
        for oh in 0..g.oh {
            let (h0, h1) = g.window(oh, g.h);
            for ow in 0..g.ow {
                let (w0, w1) = g.window(ow, g.w);
                let share = dyp[oh * g.ow + ow] / g.avg_divisor(oh, ow);
                for ih in h0..h1 {
                    dxp[ih * g.w + w0..ih * g.w + w1]
                        .iter_mut()
                        .for_each(|d| *d += share);
                }
            }
        }
    });
    Tensor::new(x_shape, dx)
}

/// Mean over H and W: `[N,C,H,W] -> [N,C]` (summed in f64, in order).
pub(super) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = dims4("x", x.shape())?;
    let hw = h * w;
    if hw == 0 {
        return Err(Error::tensor("x", "global_avg_pool of an empty plane"));
    }
    let y = x
        .data()
        .par_chunks(hw)
        .map(|plane| (plane.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32)
        .collect();
    Tensor::new(&[n, c], y)
}

/// Gradient of [`global_avg_pool`]: `dy[n, c] / (H*W)` on every pixel.
pub(super) fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let [n, c, h, w] = dims4("x", x_shape)?;
    let [dn, dc] = dims2("dy", dy.shape())?;
    if (dn, dc) != (n, c) {
        return Err(Error::shape("dy", &[n, c], dy.shape()));
    }
    let hw = h * w;
    let mut dx = vec![0.0f32; n * c * hw];
    if hw > 0 {
        dx.par_chunks_mut(hw)
            .zip(dy.data().par_iter())
            .for_each(|(plane, &g)| plane.fill(g / hw as f32));
    }
    Tensor::new(x_shape, dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    fn pp(kernel: usize, stride: usize, pad: usize) -> PoolParams {
        PoolParams::new(kernel, stride, pad)
    }

    /// Pooling by definition in f64: the max or the sum over the in-range
    /// pixels of each window; a sum is divided by the window's taps that
    /// lie in the padded input (`count_include_pad`) or in the input.
    fn f64_pool(x: &[f64], shape: [usize; 4], p: PoolParams, max: bool) -> Vec<f64> {
        let [n, c, h, w] = shape;
        let (oh, ow) = (p.out_len(h), p.out_len(w));
        let mut y = Vec::new();
        for plane in x.chunks(h * w).take(n * c) {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
                    let mut count = 0usize;
                    for a in 0..p.kernel {
                        for b in 0..p.kernel {
                            let (ih, iw) = (
                                (i * p.stride + a) as isize - p.pad as isize,
                                (j * p.stride + b) as isize - p.pad as isize,
                            );
                            let pad = p.pad as isize;
                            let in_padded = ih < h as isize + pad && iw < w as isize + pad;
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                count += (p.count_include_pad && in_padded) as usize;
                                continue;
                            }
                            count += 1;
                            let v = plane[ih as usize * w + iw as usize];
                            acc = if max { acc.max(v) } else { acc + v };
                        }
                    }
                    y.push(if max { acc } else { acc / count as f64 });
                }
            }
        }
        y
    }

    fn f64_gap(x: &[f64], hw: usize) -> Vec<f64> {
        x.chunks(hw)
            .map(|p| p.iter().sum::<f64>() / hw as f64)
            .collect()
    }

    const SHAPE: [usize; 4] = [2, 2, 5, 6];
    const WINDOWS: [(usize, usize, usize); 4] = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 1)];

    /// Every window of [`WINDOWS`] in the four combinations of `ceil_mode`
    /// and `count_include_pad`.
    fn all_modes() -> Vec<PoolParams> {
        let mut out = Vec::new();
        for (k, s, pad) in WINDOWS {
            for ceil in [false, true] {
                for count in [true, false] {
                    out.push(
                        pp(k, s, pad)
                            .with_ceil_mode(ceil)
                            .with_count_include_pad(count),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn ceil_mode_adds_a_last_window_only_when_it_starts_inside_the_input_or_left_padding() {
        // 5 wide, 2x2 stride 2: floor 2 windows, ceil 3 (the third starts at 4).
        assert_eq!(pp(2, 2, 0).out_len(5), 2);
        assert_eq!(pp(2, 2, 0).with_ceil_mode(true).out_len(5), 3);
        // 5 wide, 2x2 stride 2 pad 1: rounding up would give 4 windows, but
        // the fourth would start at 6 - 1 = 5, in the right padding only, so
        // it is dropped (PyTorch gives 3).
        assert_eq!(pp(2, 2, 1).with_ceil_mode(true).out_len(5), 3);
        // 4 wide, 3x3 stride 2 pad 1: the third window starts at 3, inside.
        assert_eq!(pp(3, 2, 1).with_ceil_mode(true).out_len(4), 3);
        // Divisible extents: both modes agree.
        assert_eq!(pp(2, 2, 0).with_ceil_mode(true).out_len(6), 3);
        // Every window of every mode holds at least one input pixel.
        for p in all_modes() {
            for len in 2..12 {
                if len + 2 * p.pad < p.kernel {
                    continue;
                }
                let last_start = (p.out_len(len) - 1) * p.stride;
                assert!(last_start < len + p.pad, "{p:?} len {len}");
            }
        }
    }

    #[test]
    fn avg_pool_modes_match_f64_and_their_gradients_match_central_differences() {
        let mut g = rng(5);
        let x = uniform(&mut g, &SHAPE, -1.0, 1.0);
        let xm = distinct(&mut g, &SHAPE, 0.01);
        for p in all_modes() {
            let y = avg_pool2d(&x, p).unwrap();
            let f = |x: &[f64]| f64_pool(x, SHAPE, p, false);
            assert_close(&format!("avg {p:?}"), y.data(), &f(&f64s(&x)), 1e-6);
            let r = uniform(&mut g, y.shape(), -1.0, 1.0);
            let dx = avg_pool2d_backward(&r, &SHAPE, p).unwrap();
            let num = numeric_grad(&f64s(&x), |x| dot(&f(x), &f64s(&r)));
            assert_close(&format!("avg dx {p:?}"), dx.data(), &num, 1e-4);

            let y = max_pool2d(&xm, p).unwrap();
            let f = |x: &[f64]| f64_pool(x, SHAPE, p, true);
            assert_close(&format!("max {p:?}"), y.data(), &f(&f64s(&xm)), 1e-7);
            let dx = max_pool2d_backward(&xm, &r, p, false).unwrap();
            let num = numeric_grad(&f64s(&xm), |x| dot(&f(x), &f64s(&r)));
            assert_close(&format!("max dx {p:?}"), dx.data(), &num, 1e-4);
        }
    }

    #[test]
    fn avg_pool_without_count_include_pad_divides_by_the_pixels_inside() {
        let p = pp(3, 1, 1).with_count_include_pad(false);
        let y = avg_pool2d(&Tensor::full(&[1, 1, 3, 3], 1.0), p).unwrap();
        assert_eq!(y.data(), &[1.0; 9]);
    }

    #[test]
    fn max_pool_matches_f64_and_its_gradient_matches_central_differences() {
        let mut g = rng(1);
        // Distinct values 0.01 apart: no ties within a finite-difference step.
        let x = distinct(&mut g, &SHAPE, 0.01);
        for (k, s, pad) in WINDOWS {
            let p = pp(k, s, pad);
            let y = max_pool2d(&x, p).unwrap();
            let f = |x: &[f64]| f64_pool(x, SHAPE, p, true);
            assert_close(&format!("max {p:?}"), y.data(), &f(&f64s(&x)), 1e-7);
            let r = uniform(&mut g, y.shape(), -1.0, 1.0);
            let dx = max_pool2d_backward(&x, &r, p, false).unwrap();
            let num = numeric_grad(&f64s(&x), |x| dot(&f(x), &f64s(&r)));
            assert_close(&format!("max dx {p:?}"), dx.data(), &num, 1e-4);
        }
    }

    #[test]
    fn max_pool_routes_ties_to_the_first_maximum_in_row_major_order() {
        let x = Tensor::full(&[1, 1, 2, 2], 1.0);
        let dx =
            max_pool2d_backward(&x, &Tensor::full(&[1, 1, 1, 1], 1.0), pp(2, 2, 0), false).unwrap();
        assert_eq!(dx.data(), &[1.0, 0.0, 0.0, 0.0]);

        // 3x3/2 pad 1 over 4x4: window (0,0) ties (0,1) with (1,0); window
        // (0,1) ties (0,1) with (0,2); both go to (0,1).
        #[rustfmt::skip]
        let x = Tensor::new(&[1, 1, 4, 4], vec![
            0., 5., 5., 0.,
            5., 0., 0., 0.,
            0., 0., 0., 0.,
            0., 0., 0., 5.,
        ]).unwrap();
        let dy = Tensor::new(&[1, 1, 2, 2], vec![1., 2., 3., 4.]).unwrap();
        let dx = max_pool2d_backward(&x, &dy, pp(3, 2, 1), false).unwrap();
        #[rustfmt::skip]
        let want = [
            0., 3., 0., 0.,
            3., 0., 0., 0.,
            0., 0., 0., 0.,
            0., 0., 0., 4.,
        ];
        assert_eq!(dx.data(), &want);
    }

    #[test]
    fn the_2x2_walk_gives_the_general_walks_bits_with_ties_nans_and_odd_extents() {
        let mut r = rng(9);
        for (h, w) in [(4, 4), (5, 6), (7, 5), (2, 3), (28, 28)] {
            let shape = [2, 3, h, w];
            // Values from a few levels, so windows tie, with some NaNs.
            let levels = uniform(&mut r, &shape, 0.0, 4.0);
            let mut x = levels.data().iter().map(|v| v.floor()).collect::<Vec<_>>();
            for i in (0..x.len()).step_by(7) {
                x[i] = f32::NAN;
            }
            let x = Tensor::new(&shape, x).unwrap();
            let g = Geom::new(&shape, pp(2, 2, 0)).unwrap();
            assert!(g.is_pairs(), "{shape:?}");
            let dy = uniform(&mut r, &g.out_shape(), -1.0, 1.0);
            let (planes, ip, op) = (2 * 3, h * w, g.oh * g.ow);
            let (mut y_walk, mut dx_walk) = (vec![0.0; planes * op], vec![0.0; planes * ip]);
            for k in 0..planes {
                let xp = &x.data()[k * ip..][..ip];
                walk_max(&g, xp, &mut y_walk[k * op..][..op]);
                let dyp = &dy.data()[k * op..][..op];
                walk_max_backward(&g, xp, dyp, &mut dx_walk[k * ip..][..ip]);
            }
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let y = max_pool2d(&x, pp(2, 2, 0)).unwrap();
            assert_eq!(bits(y.data()), bits(&y_walk), "forward {shape:?}");
            let dx = max_pool2d_backward(&x, &dy, pp(2, 2, 0), false).unwrap();
            assert_eq!(bits(dx.data()), bits(&dx_walk), "backward {shape:?}");
        }
        // Ceil mode with an odd extent has a partial last window: not pairs.
        let g = Geom::new(&[1, 1, 5, 5], pp(2, 2, 0).with_ceil_mode(true)).unwrap();
        assert!(!g.is_pairs());
    }

    #[test]
    fn the_pool_gradient_gated_by_its_relu_gives_the_bits_of_the_two_passes() {
        let mut r = rng(10);
        let modes = [pp(2, 2, 0), pp(3, 2, 1), pp(2, 2, 0).with_ceil_mode(true)];
        for (h, w) in [(4, 4), (5, 6), (7, 5), (28, 28)] {
            for p in modes {
                let shape = [2, 3, h, w];
                // Levels around 0 so windows tie and the gate shuts, and
                // NaNs, which the gate shuts too.
                let levels = uniform(&mut r, &shape, -2.0, 2.0);
                let mut x = levels.data().iter().map(|v| v.floor()).collect::<Vec<_>>();
                for i in (0..x.len()).step_by(11) {
                    x[i] = f32::NAN;
                }
                let x = Tensor::new(&shape, x).unwrap();
                let g = Geom::new(&shape, p).unwrap();
                let dy = uniform(&mut r, &g.out_shape(), -1.0, 1.0);
                let two = max_pool2d_backward(&x, &dy, p, false).unwrap();
                let two = super::super::elementwise::relu_backward(&two, &x).unwrap();
                let one = max_pool2d_backward(&x, &dy, p, true).unwrap();
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(one.data()), bits(two.data()), "{shape:?} {p:?}");
            }
        }
    }

    #[test]
    fn the_vector_2x2_rows_give_the_scalar_rows_bits_at_every_length() {
        if !has_avx2() {
            return;
        }
        let mut r = rng(11);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for n in 1..=27 {
            // Levels around 0 (ties, shut gates), NaNs, and a tail past
            // the rows that neither path may read or write.
            let levels = uniform(&mut r, &[2, 2 * n + 3], -2.0, 2.0);
            let mut x: Vec<f32> = levels.data().iter().map(|v| v.floor()).collect();
            for i in (n % 5..x.len()).step_by(9) {
                x[i] = f32::NAN;
            }
            let (top, bottom) = x.split_at(2 * n + 3);
            let dy = uniform(&mut r, &[n], -1.0, 1.0);
            let forward = |vector| {
                let mut y = vec![7.0; n + 2];
                pairs_row(top, bottom, &mut y[..n], vector);
                y
            };
            assert_eq!(
                bits(&forward(true)),
                bits(&forward(false)),
                "forward, {n} windows"
            );
            for gated in [false, true] {
                let backward = |vector| {
                    let mut d = vec![MaybeUninit::new(7.0f32); 2 * (2 * n + 3)];
                    let (dt, db) = d.split_at_mut(2 * n + 3);
                    match gated {
                        true => pairs_row_backward::<true>(top, bottom, dy.data(), dt, db, vector),
                        false => {
                            pairs_row_backward::<false>(top, bottom, dy.data(), dt, db, vector)
                        }
                    }
                    // SAFETY: every value was initialised (to 7, then
                    // possibly written).
                    d.iter()
                        .map(|v| unsafe { v.assume_init() })
                        .collect::<Vec<_>>()
                };
                let (v, s) = (backward(true), backward(false));
                assert_eq!(bits(&v), bits(&s), "backward, gated {gated}, {n} windows");
                assert!(
                    s[2 * n..2 * n + 3].iter().all(|&v| v == 7.0),
                    "past the row"
                );
            }
        }
    }

    #[test]
    fn max_pool_padding_never_wins() {
        let x = Tensor::full(&[1, 1, 3, 3], -1.0);
        let y = max_pool2d(&x, pp(3, 2, 1)).unwrap();
        assert_eq!(y.data(), &[-1.0; 4]);
    }

    #[test]
    fn avg_pool_counts_padding_in_the_divisor() {
        let y = avg_pool2d(&Tensor::full(&[1, 1, 3, 3], 1.0), pp(3, 1, 1)).unwrap();
        let want = [4., 6., 4., 6., 9., 6., 4., 6., 4.].map(|v| v / 9.0);
        assert_close("avg 3x3/1 pad 1 of ones", y.data(), &want, 1e-7);
    }

    #[test]
    fn avg_pool_matches_f64_and_its_gradient_matches_central_differences() {
        let mut g = rng(2);
        let x = uniform(&mut g, &SHAPE, -1.0, 1.0);
        for (k, s, pad) in WINDOWS {
            let p = pp(k, s, pad);
            let y = avg_pool2d(&x, p).unwrap();
            let f = |x: &[f64]| f64_pool(x, SHAPE, p, false);
            assert_close(&format!("avg {p:?}"), y.data(), &f(&f64s(&x)), 1e-6);
            let r = uniform(&mut g, y.shape(), -1.0, 1.0);
            let dx = avg_pool2d_backward(&r, &SHAPE, p).unwrap();
            let num = numeric_grad(&f64s(&x), |x| dot(&f(x), &f64s(&r)));
            assert_close(&format!("avg dx {p:?}"), dx.data(), &num, 1e-4);
        }
    }

    #[test]
    fn global_avg_pool_matches_f64_and_its_gradient_matches_central_differences() {
        let mut g = rng(3);
        let x = uniform(&mut g, &SHAPE, -1.0, 1.0);
        let y = global_avg_pool(&x).unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_close("gap", y.data(), &f64_gap(&f64s(&x), 30), 1e-6);
        let r = uniform(&mut g, &[2, 2], -1.0, 1.0);
        let dx = global_avg_pool_backward(&r, &SHAPE).unwrap();
        let num = numeric_grad(&f64s(&x), |x| dot(&f64_gap(x, 30), &f64s(&r)));
        assert_close("gap dx", dx.data(), &num, 1e-4);
    }

    #[test]
    fn pools_are_batch_invariant_and_thread_independent() {
        let mut g = rng(4);
        let x = uniform(&mut g, &[7, 5, 9, 8], -1.0, 1.0);
        for (k, s, pad) in WINDOWS {
            let p = pp(k, s, pad);
            let dy = uniform(&mut g, &[7, 5, p.out_len(9), p.out_len(8)], -1.0, 1.0);
            assert_batch_invariant("max", &x, |x| max_pool2d(x, p).unwrap());
            assert_batch_invariant("avg", &x, |x| avg_pool2d(x, p).unwrap());
            assert_batch_invariant("avg backward", &dy, |dy| {
                avg_pool2d_backward(dy, &[dy.shape()[0], 5, 9, 8], p).unwrap()
            });
            // The max-pool gradient reads x and dy of the same image.
            let batch = max_pool2d_backward(&x, &dy, p, false).unwrap();
            for i in 0..7 {
                let (xi, dyi) = (x.slice_rows(i, i + 1), dy.slice_rows(i, i + 1));
                let alone = max_pool2d_backward(&xi, &dyi, p, false).unwrap();
                assert_bitwise(
                    "max backward",
                    alone.data(),
                    batch.slice_rows(i, i + 1).data(),
                );
            }
            assert_thread_independent(&format!("pools {p:?}"), || {
                let outs = [
                    max_pool2d(&x, p).unwrap(),
                    max_pool2d_backward(&x, &dy, p, false).unwrap(),
                    avg_pool2d(&x, p).unwrap(),
                    avg_pool2d_backward(&dy, x.shape(), p).unwrap(),
                    global_avg_pool(&x).unwrap(),
                ];
                flat(&outs.iter().collect::<Vec<_>>())
            });
        }
        assert_batch_invariant("gap", &x, |x| global_avg_pool(x).unwrap());
        let dy = uniform(&mut g, &[7, 5], -1.0, 1.0);
        assert_batch_invariant("gap backward", &dy, |dy| {
            global_avg_pool_backward(dy, &[dy.shape()[0], 5, 9, 8]).unwrap()
        });
    }

    #[test]
    fn bad_shapes_and_windows_are_errors_not_panics() {
        let x = Tensor::zeros(&[1, 2, 4, 4]);
        assert!(
            max_pool2d(&x, pp(2, 2, 2)).is_err(),
            "padding over half the window"
        );
        assert!(
            max_pool2d(&x, pp(7, 1, 1)).is_err(),
            "window over the padded input"
        );
        assert!(avg_pool2d(&x, pp(2, 0, 0)).is_err(), "stride 0");
        assert!(avg_pool2d(&Tensor::zeros(&[2, 4, 4]), pp(2, 2, 0)).is_err());
        assert!(max_pool2d(&Tensor::zeros(&[1, 2, 0, 4]), pp(1, 1, 0)).is_err());
        assert!(
            max_pool2d_backward(&x, &Tensor::zeros(&[1, 2, 3, 2]), pp(2, 2, 0), false).is_err()
        );
        assert!(
            avg_pool2d_backward(&Tensor::zeros(&[1, 2, 3, 2]), x.shape(), pp(2, 2, 0)).is_err()
        );
        assert!(global_avg_pool_backward(&Tensor::zeros(&[1, 3]), x.shape()).is_err());
        assert!(global_avg_pool(&Tensor::zeros(&[1, 2, 0, 3])).is_err());
    }
}
