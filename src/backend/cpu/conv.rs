//! 2-D convolution by im2col + GEMM: forward, backward-data (GEMM `W^T dY`
//! then col2im) and backward-filter (GEMM `dY col^T`, plus the bias sum).
//!
//! Forward and backward-data put the columns of many images side by side
//! in one product, so deep layers with 16 or 64 positions per image still
//! make wide products. They stay batch invariant because the product
//! ([`chain_gemm`]) gives every output element one multiply-add chain whose
//! order depends on the layer's shape only, never on the other columns.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::chain_gemm::{self, padded_stride, PackedA, CUT, MR, NR};
use super::filter_cache::{self, Packing};
use super::winograd::{self, Epilogue};
use super::{expect_shape, layout, with_scratch, ELEMENTWISE_CHUNK};
use crate::backend::check::ConvGeom;
use crate::backend::{ConvParams, Pad2d};
use crate::error::Result;
use crate::tensor::Tensor;

/// Backward-filter cuts the batch into at most this many ranges of images,
/// one partial gradient each, added in order: shorter chains than one over
/// the whole batch, few enough that the partials (one filter's size each)
/// stay small.
const FILTER_PARTS: usize = 4;

/// Positions (images times output pixels) a backward-filter range spans at
/// least: a shape with fewer in all is one range, since its partials would
/// cost more to write and add than their chains take to run.
const FILTER_PART_POSITIONS: usize = 2048;

/// Upper bound, in values, of the column matrix one backward-filter task
/// fills at a time, and of the transposed `dY` all its ranges hold at a
/// time (16 MiB each), so large batches do not need gigabytes.
const FILTER_BUDGET: usize = 1 << 22;

/// The extents of one convolution (shared with the GPU path).
type Geom = ConvGeom;

/// What the im2col + GEMM path needs to know of a convolution's extents.
impl Geom {
    /// Values in one input image.
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Values in one output image.
    fn out_len(&self) -> usize {
        self.o * self.positions()
    }

    /// Rows of the column matrix: `C * KH * KW`.
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the column matrix: output positions `OH * OW`.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
}

/// The output indices `lo..hi` along one axis whose input index
/// `o * stride + k - pad` lies inside `0..len` (the others read padding).
pub(super) fn valid_outputs(
    k: usize,
    pad: usize,
    stride: usize,
    len: usize,
    out: usize,
) -> (usize, usize) {
    let lo = if pad > k {
        (pad - k).div_ceil(stride)
    } else {
        0
    };
    let hi = if len + pad > k {
        (len + pad - k).div_ceil(stride)
    } else {
        0
    };
    let hi = hi.min(out);
    (lo.min(hi), hi)
}

/// Writes the rows `rows` and columns `positions` of one image's column
/// matrix `[C*KH*KW, OH*OW]` (row `(c, kh, kw)`, column `(oh, ow)` holds
/// `x[c, oh*s + kh - pad, ow*s + kw - pad]`, or 0 in the padding) into
/// `col`, a row-major buffer of stride `ld`, from its row 0 and column `j0`.
fn im2col_segment(
    x: &[f32],
    g: &Geom,
    rows: Range<usize>,
    positions: Range<usize>,
    col: &mut [f32],
    ld: usize,
    j0: usize,
) {
    if g.stride == 1 && g.ow == g.w {
        im2col_shifted(x, g, rows, positions, col, ld, j0);
    } else {
        im2col_by_rows(x, g, rows, positions, col, ld, j0);
    }
}

/// [`im2col_segment`] of a stride-1 convolution whose output rows are as
/// wide as the input's (a `2 pad + 1` wide kernel): a row `(c, kh, kw)` of
/// the column matrix is then the plane `c` shifted by `(kh - pad) W + kw -
/// pad`, so it is one copy over all the segment's output rows, after which
/// the columns that wrapped around a row's edge (or the plane's) are
/// zeroed. Short output rows (14 wide, say) made the row-by-row copy a
/// third of the backward-filter's time.
fn im2col_shifted(
    x: &[f32],
    g: &Geom,
    rows: Range<usize>,
    positions: Range<usize>,
    col: &mut [f32],
    ld: usize,
    j0: usize,
) {
    let (hw, w, taps) = (g.h * g.w, g.w, g.kh * g.kw);
    let (p0, p1) = (positions.start, positions.end);
    for (i, r) in rows.enumerate() {
        let (c, kh, kw) = (r / taps, r % taps / g.kw, r % g.kw);
        let plane = &x[c * hw..][..hw];
        let (oh_lo, oh_hi) = valid_outputs(kh, g.pad, 1, g.h, g.oh);
        let (ow_lo, ow_hi) = valid_outputs(kw, g.pad, 1, g.w, g.ow);
        let row = &mut col[i * ld + j0..][..p1 - p0];
        // The positions whose input row lies in the plane, and where their
        // values start in it.
        let (v0, v1) = ((oh_lo * w).clamp(p0, p1), (oh_hi * w).clamp(p0, p1));
        row[..v0 - p0].fill(0.0);
        row[v1 - p0..].fill(0.0);
        if v0 == v1 {
            continue;
        }
        let shift = (kh * w + kw) as isize - (g.pad * w + g.pad) as isize;
        // Only an edge column can fall off the plane's ends; it is zeroed
        // below with the others.
        let s0 = (v0 as isize + shift).clamp(0, hw as isize) as usize;
        let s1 = (v1 as isize + shift).clamp(0, hw as isize) as usize;
        if s0 < s1 {
            let d0 = (s0 as isize - shift) as usize - p0;
            row[d0..d0 + s1 - s0].copy_from_slice(&plane[s0..s1]);
        }
        // An edge column at a time (none for a 1-wide kernel): a value
        // every `w` positions.
        for e in (0..ow_lo).chain(ow_hi..w) {
            let first = v0 - v0 % w + e;
            let first = if first < v0 { first + w } else { first };
            for p in (first..v1).step_by(w) {
                row[p - p0] = 0.0;
            }
        }
    }
}

/// [`im2col_segment`] one output row at a time: any stride and padding.
fn im2col_by_rows(
    x: &[f32],
    g: &Geom,
    rows: Range<usize>,
    positions: Range<usize>,
    col: &mut [f32],
    ld: usize,
    j0: usize,
) {
    let (hw, ow, taps) = (g.h * g.w, g.ow, g.kh * g.kw);
    for (i, r) in rows.enumerate() {
        let (c, kh, kw) = (r / taps, r % taps / g.kw, r % g.kw);
        let plane = &x[c * hw..][..hw];
        let (oh_lo, oh_hi) = valid_outputs(kh, g.pad, g.stride, g.h, g.oh);
        let (ow_lo, ow_hi) = valid_outputs(kw, g.pad, g.stride, g.w, g.ow);
        let row = &mut col[i * ld + j0..][..positions.len()];
        let mut p = positions.start;
        while p < positions.end {
            let (oh, a) = (p / ow, p % ow);
            let b = ow.min(a + positions.end - p);
            let dst = &mut row[p - positions.start..][..b - a];
            p += b - a;
            if oh < oh_lo || oh >= oh_hi {
                dst.fill(0.0);
                continue;
            }
            let lo = ow_lo.clamp(a, b);
            let hi = ow_hi.clamp(lo, b);
            dst[..lo - a].fill(0.0);
            dst[hi - a..].fill(0.0);
            if lo == hi {
                continue;
            }
            let src = &plane[(oh * g.stride + kh - g.pad) * g.w..][..g.w];
            let dst = &mut dst[lo - a..hi - a];
            let iw0 = lo * g.stride + kw - g.pad;
            if g.stride == 1 {
                dst.copy_from_slice(&src[iw0..iw0 + dst.len()]);
            } else {
                for (d, v) in dst.iter_mut().zip(src[iw0..].iter().step_by(g.stride)) {
                    *d = *v;
                }
            }
        }
    }
}

/// Writes the columns `cols` of the batch's column matrix (every image's
/// columns side by side, see [`im2col_segment`]) into `panels`, the layout
/// [`chain_gemm::gemm`] reads, from its column 0.
///
/// It goes panel by panel, so the writes run in order through memory: each
/// panel's 16 columns are located once (image, input row and column of
/// their first tap), then every row `(c, kh, kw)` is 16 loads at a fixed
/// offset from those, or one 16-wide copy where the columns are 16
/// neighbours of one input row inside the image.
fn im2col_panels(x: &[f32], g: &Geom, cols: Range<usize>, panels: &mut [f32]) {
    let (k, pos, hw) = (g.rows(), g.positions(), g.h * g.w);
    let taps = g.kh * g.kw;
    // Per tap, the lanes whose input pixel lies inside the image.
    let mut inside = vec![0u16; taps];
    for (q, dst) in panels.chunks_exact_mut(k * NR).enumerate() {
        let first = cols.start + q * NR;
        let lanes = NR.min(cols.end - first);
        // Input offset of each lane's first tap (it may lie outside the
        // image: only taps flagged inside are read).
        let mut base = [0isize; NR];
        let (mut ih0, mut iw0) = ([0isize; NR], [0isize; NR]);
        for l in 0..lanes {
            let (img, p) = ((first + l) / pos, (first + l) % pos);
            ih0[l] = (p / g.ow * g.stride) as isize - g.pad as isize;
            iw0[l] = (p % g.ow * g.stride) as isize - g.pad as isize;
            base[l] = (img * g.in_len()) as isize + ih0[l] * g.w as isize + iw0[l];
        }
        for (t, m) in inside.iter_mut().enumerate() {
            let (kh, kw) = ((t / g.kw) as isize, (t % g.kw) as isize);
            *m = (0..lanes)
                .filter(|&l| {
                    let (ih, iw) = (ih0[l] + kh, iw0[l] + kw);
                    ih >= 0 && ih < g.h as isize && iw >= 0 && iw < g.w as isize
                })
                .fold(0, |m, l| m | 1 << l);
        }
        // Lanes reading 16 neighbouring input values (one input row, or
        // rows that meet): each tap is one contiguous copy, its lanes in
        // the padding zeroed after.
        let neighbours = lanes == NR && (0..NR).all(|l| base[l] == base[0] + l as isize);
        for (row, r) in dst.chunks_exact_mut(NR).zip(0..) {
            let (c, t) = (r / taps, r % taps);
            let off = (c * hw + t / g.kw * g.w + t % g.kw) as isize;
            let m = inside[t];
            let at = base[0] + off;
            if neighbours && at >= 0 && at as usize + NR <= x.len() {
                // The lanes outside the image read whatever lies beside it
                // (a stride-1 kernel as wide as `2 pad + 1` reads the
                // neighbouring row's ends), then become the padding's zeros.
                let at = at as usize;
                let src: &[f32; NR] = x[at..at + NR].try_into().expect("16 floats");
                row.copy_from_slice(src);
                if m != u16::MAX {
                    for (l, v) in row.iter_mut().enumerate() {
                        if m >> l & 1 == 0 {
                            *v = 0.0;
                        }
                    }
                }
                continue;
            }
            for (l, v) in row.iter_mut().enumerate() {
                *v = if m >> l & 1 == 1 {
                    x[(base[l] + off) as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

/// The adjoint of [`im2col_segment`] over a whole image, for the channels
/// `x` holds (whole planes): folds the rows of `col` (stride `ld`, columns
/// from `j0`) back into them, summing the entries that came from the same
/// input pixel in row order, so the sum order is fixed.
fn col2im(col: &[f32], ld: usize, j0: usize, g: &Geom, x: &mut [f32]) {
    x.fill(0.0);
    let (hw, ow, pos) = (g.h * g.w, g.ow, g.positions());
    let mut r = 0;
    for plane in x.chunks_exact_mut(hw) {
        for kh in 0..g.kh {
            let (oh_lo, oh_hi) = valid_outputs(kh, g.pad, g.stride, g.h, g.oh);
            for kw in 0..g.kw {
                let (ow_lo, ow_hi) = valid_outputs(kw, g.pad, g.stride, g.w, g.ow);
                let row = &col[r * ld + j0..][..pos];
                r += 1;
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.stride + kh - g.pad;
                    let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
                    let src = &row[oh * ow + ow_lo..oh * ow + ow_hi];
                    let iw0 = ow_lo * g.stride + kw - g.pad;
                    if g.stride == 1 {
                        for (d, v) in dst[iw0..iw0 + src.len()].iter_mut().zip(src) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst[iw0..].iter_mut().step_by(g.stride).zip(src) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

/// The pieces of the batch's column range `cols` (columns of all images
/// side by side, `pos` per image): `(image, positions, first local column)`.
fn segments(cols: Range<usize>, pos: usize) -> impl Iterator<Item = (usize, Range<usize>, usize)> {
    let start = cols.start;
    let mut c = cols.start;
    std::iter::from_fn(move || {
        if c >= cols.end {
            return None;
        }
        let (img, p0) = (c / pos, c % pos);
        let p1 = pos.min(p0 + cols.end - c);
        let seg = (img, p0..p1, c - start);
        c += p1 - p0;
        Some(seg)
    })
}

/// A mutable slice that parallel tasks write through, each into a region
/// no other task touches; possibly not yet initialised
/// ([`SharedOut::uninit`]), then written with [`SharedOut::put`].
pub(super) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: the pointer comes from a `&mut [f32]` (or `[MaybeUninit<f32>]`)
// held for `'a`; tasks only form disjoint sub-slices through `region`,
// `put` and `put4`.
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(super) fn new(data: &'a mut [f32]) -> Self {
        SharedOut {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Over memory not yet initialised: only [`SharedOut::put`] may touch
    /// it.
    pub(super) fn uninit(data: &'a mut [MaybeUninit<f32>]) -> Self {
        SharedOut {
            ptr: data.as_mut_ptr().cast(),
            len: data.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Writes `src` at `start` and returns that sub-slice, now initialised.
    ///
    /// # Safety
    /// No other live slice from this `SharedOut` may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn put(&self, start: usize, src: &[f32]) -> &mut [f32] {
        assert!(
            start + src.len() <= self.len,
            "SharedOut: put out of bounds"
        );
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(start), src.len());
        std::slice::from_raw_parts_mut(self.ptr.add(start), src.len())
    }

    /// [`SharedOut::put`] of the first `len` (at most 4) values of `src`,
    /// without a call to `memcpy`, which costs more than the copy at this
    /// size (Winograd writes its outputs four at a time).
    ///
    /// # Safety
    /// As [`SharedOut::put`].
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn put4(&self, start: usize, src: [f32; 4], len: usize) -> &mut [f32] {
        assert!(
            len <= 4 && start + len <= self.len,
            "SharedOut: put4 out of bounds"
        );
        let p = self.ptr.add(start);
        // Each length its own fixed-size store (a loop would become a
        // `memcpy` call again).
        match len {
            4 => p.cast::<[f32; 4]>().write_unaligned(src),
            3 => p
                .cast::<[f32; 3]>()
                .write_unaligned([src[0], src[1], src[2]]),
            2 => p.cast::<[f32; 2]>().write_unaligned([src[0], src[1]]),
            1 => p.write(src[0]),
            _ => {}
        }
        std::slice::from_raw_parts_mut(p, len)
    }

    /// The sub-slice `start..start + len`.
    ///
    /// # Safety
    /// No other live slice from this `SharedOut` may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn region(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "SharedOut: region out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

/// How a product is cut into parallel tasks: `chunk` columns by `parts`
/// ranges of rows. Only speed depends on it: every element is one
/// in-order chain (see [`chain_gemm`]), whatever the cut.
fn plan_tasks(cols: usize, k: usize, row_blocks: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    // The column buffer of one task (`k x chunk`) stays within 2 MiB.
    let max_chunk = ((1usize << 19) / k.max(1)).clamp(CUT, 1024) / CUT * CUT;
    let chunk = cols.div_ceil(threads).div_ceil(CUT) * CUT;
    let chunk = chunk.clamp(CUT, max_chunk);
    let col_tasks = cols.div_ceil(chunk).max(1);
    let parts = if col_tasks >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(col_tasks)
            .min(row_blocks.div_ceil(4))
            .max(1)
    };
    (chunk, parts)
}

/// Cross-correlation of `x [N,C,H,W]` with `w [O,C,KH,KW]`, plus `bias [O]`:
/// per image, `Y = W col` (`[O, C*KH*KW] x [C*KH*KW, OH*OW]`).
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> Result<Tensor> {
    conv2d_fused(x, w, bias, None, false, p, false)
}

/// [`conv2d`] with its epilogue `relu?(. + residual)` applied to each
/// image's output while it is still in cache; through Winograd where it
/// applies when `winograd` (and `p` does not ask for the direct path).
///
/// Winograd is the caller's choice, not the default, because its outputs
/// differ from the direct path's by a few ulps (F(4x4) up to about 2e-5
/// relative), and a pre-activation that sits that close to zero, or two
/// pooled values that close to each other, flips a ReLU or max-pool
/// decision, which moves the input gradient by up to a few percent. On the
/// float64 fixtures that happens three times: vgg16 (one max-pool window,
/// dx off by 1.8e-2, bound 5e-3), densenet121's ONNX fixture (2.3e-3,
/// bound 1e-3) and the zoo resnet18's ONNX fixture (1.6e-3; there one ReLU
/// input of 1.1 M is -1.2e-7 at RMS 1.5, and half of the 1e-7 relative
/// perturbations of the input flip it with the direct path too). The other
/// forward fixtures and the search-step fixture hold with it.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    p: ConvParams,
    winograd: bool,
) -> Result<Tensor> {
    let g = Geom::new(x.shape(), w.shape(), p)?;
    if let Some(b) = bias {
        expect_shape("bias", b, &[g.o])?;
    }
    if let Some(r) = residual {
        expect_shape("residual", r, &[g.n, g.o, g.oh, g.ow])?;
    }
    if !g.is_dense() {
        return super::conv_grouped::forward(x, w, bias, residual, relu, &g);
    }
    let epi = Epilogue {
        bias: bias.map(|b| b.data()),
        residual: residual.map(|r| r.data()),
        relu,
    };
    let y = if winograd && !p.direct && winograd::applies(&g) {
        winograd::forward(x.data(), w.data(), &g, &epi)
    } else if windows_pay(&g) {
        forward_windows(x.data(), w.data(), &epi, &g)
    } else {
        forward_dense(x.data(), w.data(), &epi, &g)
    };
    Tensor::new(&[g.n, g.o, g.oh, g.ow], y)
}

/// A fully connected layer's forward, `x [N,K] w[O,K]^T + bias`, run as
/// the 1x1 convolution of `N` 1x1 images that it is: the filters are packed
/// (and cached) once and each output is one in-order chain over `K`, so a
/// row gets the same bits in any batch. `N`, `K` and `O` are non-zero.
pub(super) fn fully_connected(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    [n, k, o]: [usize; 3],
) -> Vec<f32> {
    let g = pointwise(n, k, o);
    let epi = Epilogue {
        bias,
        residual: None,
        relu: false,
    };
    forward_dense(x, w, &epi, &g)
}

/// Columns of `dx` one task of [`fully_connected_backward_data`] computes.
const FC_DGRAD_COLS: usize = 256;

/// The input gradient of [`fully_connected`], `dx [N,K] = dy [N,O] w
/// [O,K]`: one product with `dy`'s rows as its rows and `w`'s rows read in
/// place as its panels, written straight to `dx`'s rows.
///
/// The 1x1 convolution's backward-data gives the same bits (every element
/// is the same in-order chain over `O`), but it gathers `dy` into panels
/// one value per (image, output) and folds `N` one-pixel images back: on
/// smallcnn's `fc1` that was five times the product's own time.
pub(super) fn fully_connected_backward_data(
    dy: &[f32],
    w: &[f32],
    [n, k, o]: [usize; 3],
) -> Vec<f32> {
    // `w`'s rows as whole panels: a `K` that is not whole panels gets
    // zero columns, which give columns of the product that are dropped.
    let kp = k.div_ceil(NR) * NR;
    let w = zero_extended(w, (o, k), (o, kp));
    let rows: Vec<usize> = (0..o).map(|r| r * kp).collect();
    let panels: Vec<usize> = (0..kp / NR).map(|p| p * NR).collect();
    let b = chain_gemm::Windows::new(&w, &rows, &panels);
    // `dy` in whole row blocks (the kernel reads every row of a block).
    let blocks = n.div_ceil(MR);
    let dy = zero_extended(dy, (n, o), (blocks * MR, o));
    let a = chain_gemm::AView::row_major(&dy, n, o, o);
    // Tasks: column ranges, and row groups where there are few of those.
    // Every element's chain is whole in one task, so the cut changes no bit.
    let col_tasks = kp.div_ceil(FC_DGRAD_COLS);
    let threads = rayon::current_num_threads().max(1);
    let groups = (2 * threads).div_ceil(col_tasks).clamp(1, blocks);
    let per_group = blocks.div_ceil(groups);
    let mut dx = vec![0.0f32; n * k];
    let out = SharedOut::new(&mut dx);
    (0..col_tasks * groups).into_par_iter().for_each(|t| {
        let (c0, group) = (t / groups * FC_DGRAD_COLS, t % groups);
        let blks = group * per_group..((group + 1) * per_group).min(blocks);
        if blks.is_empty() {
            return;
        }
        let cols = FC_DGRAD_COLS.min(kp - c0);
        let live = cols.min(k - c0);
        let ld = padded_stride(cols);
        with_scratch([blks.len() * MR * ld], |[c]| {
            chain_gemm::gemm_windows(a, blks.clone(), b.panels_from(c0 / NR), cols, c, ld);
            for (i, row) in (blks.start * MR..(blks.end * MR).min(n)).enumerate() {
                // SAFETY: tasks cover disjoint (row, column range) sets.
                let dst = unsafe { out.region(row * k + c0, live) };
                dst.copy_from_slice(&c[i * ld..][..live]);
            }
        })
    });
    dx
}

/// The row-major `rows x cols` matrix `m` with zero rows and columns
/// appended up to `to`; `m` itself where that adds none.
fn zero_extended(m: &[f32], (rows, cols): (usize, usize), to: (usize, usize)) -> Cow<'_, [f32]> {
    if (rows, cols) == to {
        return m.into();
    }
    let pad = Pad2d {
        top: 0,
        bottom: to.0 - rows,
        left: 0,
        right: to.1 - cols,
    };
    let mut out = vec![0.0f32; to.0 * to.1];
    layout::pad_planes(m, (rows, cols), pad, &mut out);
    out.into()
}

/// The geometry of [`fully_connected`]: `N` images of `K` channels, 1x1.
fn pointwise(n: usize, k: usize, o: usize) -> Geom {
    // Internal invariant: the caller checked the shapes and that none of
    // `K` and `O` is zero, which is all a 1x1 geometry can refuse.
    Geom::new(&[n, k, 1, 1], &[o, k, 1, 1], ConvParams::new(1, 0))
        .expect("fully connected: a checked non-empty shape")
}

/// The dense forward: `Y = W col` with the columns of every image side by
/// side (`[O, C*KH*KW] x [C*KH*KW, N*OH*OW]`), cut into tasks of a few
/// hundred columns; each task unfolds its columns, multiplies, and writes
/// its outputs with the epilogue applied.
fn forward_dense(x: &[f32], w: &[f32], epi: &Epilogue<'_>, g: &Geom) -> Vec<f32> {
    let (k, pos) = (g.rows(), g.positions());
    let task = ForwardTask {
        cols: g.n * pos,
        scratch: |n: usize| k * n.div_ceil(NR) * NR,
        product: |cols: Range<usize>, a: &PackedA, blocks, b: &mut [f32], c: &mut [f32], ld| {
            im2col_panels(x, g, cols.clone(), b);
            chain_gemm::gemm(a, blocks, b, cols.len(), c, ld);
        },
        pieces: |cols: Range<usize>| {
            segments(cols, pos)
                .map(|(img, ps, j0)| (img, ps.start, j0, ps.len()))
                .collect()
        },
    };
    forward_tasks(w, g, &task, epi)
}

/// Whether the dense forward reads its columns in place, as windows of the
/// zero-padded input ([`forward_windows`]), rather than unfolding them
/// (im2col). Both give the same bits. The windows spare a copy of the
/// input nine times its size but compute `2 pad` wasted columns per output
/// row (those that wrap around the padding) and round each image up to
/// whole panels, so they take stride-1 kernels of more than one tap where
/// the wasted products cost less than the unfolding: fewer than
/// `WINDOW_WASTE / O` of the columns wasted.
///
/// A 1x1 kernel's unfolding is only a copy of the input, so it takes the
/// windows only where they waste nothing and read the input itself: no
/// padding, images of whole panels (see [`forward_windows`]), and planes
/// that do not [alias](aliases) (a 4x4 image, not an 8x8 or 32x32 one:
/// unfolding those ran 1.1-1.25x as fast as their windows on resnet50's
/// 1x1 layers).
fn windows_pay(g: &Geom) -> bool {
    if !g.is_dense() || g.stride != 1 {
        return false;
    }
    if g.kh * g.kw < 2 {
        let pos = g.positions();
        return g.pad == 0 && pos.is_multiple_of(NR) && !aliases(pos);
    }
    let (pos, per_image) = (g.positions(), window_columns(g));
    (per_image - pos) * g.o < WINDOW_WASTE * pos
}

/// See [`windows_pay`]: wasted columns times output channels, below this
/// many times the columns. Timed one layer at a time (2-core Zen 3,
/// 2026-12-04), the windows took 0.82x the unfolded forward's time at
/// 28x28 with 32 filters (2.3 by this measure), 0.90-0.96x at 14x14 with
/// 64 (9.1), 0.92x at 32x32 with 64 (4), and 1.00x at 16x16 with 128 (16).
const WINDOW_WASTE: usize = 12;

/// Whether rows of a window product that lie `stride` floats apart (one
/// channel's plane from the next) crowd into few cache sets: at a
/// multiple of 32 floats (two lines) they fill at most half of a
/// first-level cache's 64 sets, at 1 KiB (a 16x16 plane) only 4, so the
/// few hundred rows of one inner block, which ought to stay in the cache
/// while every row block passes, evict each other. Unaligned or odd-line
/// strides spread over every set.
fn aliases(stride: usize) -> bool {
    stride.is_multiple_of(32)
}

/// Zero rows that [`forward_windows`] adds below each padded plane of
/// `hp x wp` so that its planes do not [alias](aliases): one where `hp wp`
/// is a multiple of 32 and `wp` is not (`hp` is then even, so `(hp + 1)
/// wp` has no more factors of 2 than `wp`), else none. It costs the copy a
/// row of zeros per plane; the columns, and so the products, stay the
/// same.
fn alias_rows(hp: usize, wp: usize) -> usize {
    usize::from(aliases(hp * wp) && !aliases((hp + 1) * wp))
}

/// Columns per image of [`forward_windows`]: every output row at the padded
/// width, rounded up to whole panels so none straddles two images.
fn window_columns(g: &Geom) -> usize {
    (g.oh * (g.w + 2 * g.pad)).div_ceil(NR) * NR
}

/// The dense forward of a stride-1 convolution with its column matrix read
/// in place ([`chain_gemm::Windows`]): the batch is copied once, zero-padded
/// (`[N, C, H + 2 pad + extra, W + 2 pad]`, the extra rows from
/// [`alias_rows`]); column `v` of an image is output pixel `(v / Wp, v %
/// Wp)` at the padded width `Wp`, and row `(c, kh, kw)` of the column
/// matrix is the padded plane `c` from `kh * Wp + kw` on. The columns with
/// `v % Wp >= OW` wrap into the next row and are dropped. Every kept output
/// is the chain of [`forward_dense`], bit for bit.
fn forward_windows(x: &[f32], w: &[f32], epi: &Epilogue<'_>, g: &Geom) -> Vec<f32> {
    let (k, taps) = (g.rows(), g.kh * g.kw);
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    let extra = alias_rows(hp, wp);
    let (plane, per_image) = ((hp + extra) * wp, window_columns(g));
    let image = g.c * plane;
    let rows: Vec<usize> = (0..k)
        .map(|r| r / taps * plane + r % taps / g.kw * wp + r % g.kw)
        .collect();
    let cols = g.n * per_image;
    let panels: Vec<usize> = (0..cols / NR)
        .map(|p| p * NR / per_image * image + p * NR % per_image)
        .collect();
    // The last panels read past the last image (into columns dropped).
    let len = (panels.last().copied().unwrap_or(0) + rows[k - 1] + NR).max(g.n * image);
    let run = |xp: &[f32]| {
        let windows = chain_gemm::Windows::new(xp, &rows, &panels);
        let task = ForwardTask {
            cols,
            scratch: |_: usize| 0,
            product: |cols: Range<usize>, a: &PackedA, blocks, _: &mut [f32], c: &mut [f32], ld| {
                let b = windows.panels_from(cols.start / NR);
                chain_gemm::gemm_windows(a, blocks, b, cols.len(), c, ld);
            },
            pieces: |cols| kept_columns(g, cols, per_image),
        };
        forward_tasks(w, g, &task, epi)
    };
    if g.pad == 0 && extra == 0 && len <= x.len() {
        // Whole panels per image and nothing to pad (a 1x1 kernel over
        // 16 pixels, say): the input is its own windows.
        return run(x);
    }
    with_scratch([len], |[xp]| {
        let p = g.pad;
        let pad = Pad2d {
            top: p,
            bottom: p + extra,
            left: p,
            right: p,
        };
        layout::pad_planes(x, (g.h, g.w), pad, &mut xp[..g.n * image]);
        xp[g.n * image..].fill(0.0);
        run(xp)
    })
}

/// How one forward path computes a task: `cols` columns in all; a task of
/// `n` columns needs `scratch(n)` floats of its own; `product(columns, a,
/// row blocks, scratch, c, ldc)` fills `c` with those columns' outputs;
/// `pieces(columns)` says which outputs they are, as `(image, first
/// position, first column in the task, length)`.
struct ForwardTask<S, P, Q> {
    cols: usize,
    scratch: S,
    product: P,
    pieces: Q,
}

/// The dense forwards' common frame: the filters packed (cached), the
/// columns cut into tasks of a few hundred columns by row blocks, each
/// task's product written out with the epilogue applied.
fn forward_tasks<S, P, Q>(
    w: &[f32],
    g: &Geom,
    task: &ForwardTask<S, P, Q>,
    epi: &Epilogue<'_>,
) -> Vec<f32>
where
    S: Fn(usize) -> usize + Sync,
    P: Fn(Range<usize>, &PackedA, Range<usize>, &mut [f32], &mut [f32], usize) + Sync,
    Q: Fn(Range<usize>) -> Vec<(usize, usize, usize, usize)> + Sync,
{
    let (k, pos) = (g.rows(), g.positions());
    let a = filter_cache::packed(Packing::Dense, [g.o, g.c, g.kh, g.kw], w, || {
        vec![PackedA::new(w, g.o, k, k, 1)]
    });
    let a = &a[0];
    let (chunk, parts) = plan_tasks(task.cols, k, a.blocks());
    let per_part = a.blocks().div_ceil(parts);
    let fill = |y: &mut [MaybeUninit<f32>]| {
        let out = SharedOut::uninit(y);
        let tasks = task.cols.div_ceil(chunk) * parts;
        (0..tasks).into_par_iter().for_each(|t| {
            let c0 = t / parts * chunk;
            let cols = c0..(c0 + chunk).min(task.cols);
            let blocks = (t % parts) * per_part..((t % parts + 1) * per_part).min(a.blocks());
            if blocks.is_empty() {
                return;
            }
            let ld = padded_stride(cols.len());
            let pieces = (task.pieces)(cols.clone());
            let lens = [(task.scratch)(cols.len()), blocks.len() * MR * ld];
            with_scratch(lens, |[b, c]| {
                (task.product)(cols.clone(), a, blocks.clone(), b, c, ld);
                let o0 = blocks.start * MR;
                for o in o0..(blocks.end * MR).min(g.o) {
                    let c_row = &c[(o - o0) * ld..];
                    for &(img, p0, j0, n) in &pieces {
                        let at = img * g.out_len() + o * pos + p0;
                        // SAFETY: tasks cover disjoint (channel, column) sets,
                        // so no two write the same outputs.
                        let dst = unsafe { out.put(at, &c_row[j0..j0 + n]) };
                        let res = epi.residual.map(|r| &r[at..at + n]);
                        epilogue(dst, epi.bias.map(|b| b[o]), res, epi.relu);
                    }
                }
            })
        });
    };
    // SAFETY: the tasks' column ranges and row blocks cover every
    // (channel, column), and each task's pieces are every output among its
    // columns (the unit tests' NaN fill would show a miss).
    unsafe { super::filled_by(g.n * g.out_len(), fill) }
}

/// The output pieces that the columns `cols` of [`forward_windows`] hold:
/// `(image, first position, first local column, length)`, one per output
/// row that the range meets, without the wrapped columns.
fn kept_columns(
    g: &Geom,
    cols: Range<usize>,
    per_image: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let wp = g.w + 2 * g.pad;
    let mut kept = Vec::new();
    let mut c = cols.start;
    while c < cols.end {
        let (img, v) = (c / per_image, c % per_image);
        let (oh, ow) = (v / wp, v % wp);
        if oh >= g.oh {
            // Rounding columns after the image's last row.
            c = c - v + per_image;
            continue;
        }
        // To the end of this padded row or of the range.
        let end = (c - ow + wp).min(cols.end);
        if ow < g.ow {
            let n = g.ow.min(ow + end - c) - ow;
            kept.push((img, oh * g.ow + ow, c - cols.start, n));
        }
        c = end;
    }
    kept
}

/// The fused conv's epilogue on a finished output (one output channel's
/// values): `relu?(y + bias + residual)`, in that order.
pub(super) fn epilogue(y: &mut [f32], bias: Option<f32>, residual: Option<&[f32]>, relu: bool) {
    if let Some(b) = bias {
        y.iter_mut().for_each(|v| *v += b);
    }
    if let Some(r) = residual {
        y.iter_mut().zip(r).for_each(|(v, &r)| *v += r);
    }
    if relu {
        y.iter_mut()
            .for_each(|v| *v = super::elementwise::relu_value(*v));
    }
}

/// Gradient of [`conv2d`] with respect to its input: per image, the column
/// gradient `W^T dY` folded back by [`col2im`].
pub(super) fn conv2d_backward_data(
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    p: ConvParams,
) -> Result<Tensor> {
    conv2d_gated_backward_data(dy, None, w, x_shape, p)
}

/// [`conv2d_backward_data`] of a convolution followed by a ReLU whose
/// output is `relu_y`: `dY` passes the ReLU's gate as it is read, the same
/// bits as masking it first, without a pass of its own over `dY`.
pub(super) fn conv2d_gated_backward_data(
    dy: &Tensor,
    relu_y: Option<&Tensor>,
    w: &Tensor,
    x_shape: &[usize],
    p: ConvParams,
) -> Result<Tensor> {
    let g = Geom::new(x_shape, w.shape(), p)?;
    expect_shape("dy", dy, &[g.n, g.o, g.oh, g.ow])?;
    if let Some(y) = relu_y {
        expect_shape("relu_y", y, dy.shape())?;
    }
    if !g.is_dense() {
        return match relu_y {
            Some(y) => {
                let gated = super::elementwise::relu_backward(dy, y)?;
                super::conv_grouped::backward_data(&gated, w, &g)
            }
            None => super::conv_grouped::backward_data(dy, w, &g),
        };
    }
    let gate = relu_y.map(Tensor::data);
    // Winograd where it applies, unless asked not to: F(4x4) takes 4x
    // fewer multiplies than the direct path (F(2x2), on small images,
    // 2.25x), and on the fixtures its input gradients stay within 1.6e-5 of
    // PyTorch's float64 ones (relative L2, vgg16 the worst; tolerances 1e-3
    // and up), against 7.1e-6 for F(2x2) everywhere (see `conv2d_fused`
    // for the forward, and `ConvParams::direct` for why training takes it
    // too).
    let dx = if !p.direct && winograd::applies(&g) {
        winograd::backward_data(dy.data(), gate, w.data(), &g)
    } else {
        backward_data_dense(dy.data(), gate, w.data(), &g)
    };
    Tensor::new(x_shape, dx)
}

/// The dense input gradient: the column gradient `W^T dY` of a group of
/// whole images at a time (their columns side by side), folded back by
/// [`col2im`] image by image. Tasks are image groups, split by input
/// channel when there are few, so each input pixel's sum stays in one task
/// and in row order.
/// With a `gate` (a ReLU's output, shaped as `dy`), `dy` passes it as it
/// is read.
fn backward_data_dense(dy: &[f32], gate: Option<&[f32]>, w: &[f32], g: &Geom) -> Vec<f32> {
    let (rows, pos, khw) = (g.rows(), g.positions(), g.kh * g.kw);
    let (chunk, parts) = plan_tasks(g.n * pos, rows, rows.div_ceil(MR));
    let per_group = (chunk / pos).max(1);
    let parts = parts.min(g.c);
    let per_part = g.c.div_ceil(parts);
    // `W^T` restricted to each part's channels: element (i, o) is
    // `w[o * rows + c0 * khw + i]`.
    let shape = [g.o, g.c, g.kh, g.kw];
    let packed = filter_cache::packed(Packing::DenseAdjoint { per_part }, shape, w, || {
        (0..g.c)
            .step_by(per_part)
            .map(|c0| {
                let c1 = (c0 + per_part).min(g.c);
                PackedA::new(&w[c0 * khw..], (c1 - c0) * khw, g.o, 1, rows)
            })
            .collect()
    });
    let packed: Vec<(Range<usize>, &PackedA)> = (0..g.c)
        .step_by(per_part)
        .zip(packed.iter())
        .map(|(c0, a)| (c0..(c0 + per_part).min(g.c), a))
        .collect();
    let mut dx = vec![0.0f32; g.n * g.in_len()];
    let out = SharedOut::new(&mut dx);
    let hw = g.h * g.w;
    let tasks = g.n.div_ceil(per_group) * packed.len();
    (0..tasks).into_par_iter().for_each(|t| {
        let (channels, a) = &packed[t % packed.len()];
        let first = t / packed.len() * per_group;
        let images = first..(first + per_group).min(g.n);
        let cols = images.len() * pos;
        let ld = padded_stride(cols);
        let width = cols.div_ceil(NR) * NR;
        with_scratch([g.o * width, a.blocks() * MR * ld], |[b, dcol]| {
            for o in 0..g.o {
                for (j, img) in images.clone().enumerate() {
                    let at = img * g.out_len() + o * pos;
                    let gate = gate.map(|y| &y[at..][..pos]);
                    chain_gemm::copy_into_panels(b, g.o, o, j * pos, &dy[at..][..pos], gate);
                }
            }
            chain_gemm::zero_panel_tail(b, g.o, cols);
            chain_gemm::gemm(*a, 0..a.blocks(), b, cols, dcol, ld);
            for (j, img) in images.clone().enumerate() {
                let at = img * g.in_len() + channels.start * hw;
                // SAFETY: tasks cover disjoint (image, channel) sets.
                let dst = unsafe { out.region(at, channels.len() * hw) };
                col2im(dcol, ld, j * pos, g, dst);
            }
        })
    });
    dx
}

/// Gradients of [`conv2d`] with respect to the filter
/// (`sum_n dY_n col_n^T`) and, when `with_bias`, the bias.
///
/// The batch is cut into fixed ranges of images (at most [`FILTER_PARTS`],
/// each over [`FILTER_PART_POSITIONS`] positions or more); each range gives
/// a partial filter gradient in which every element is one in-order chain
/// over the range's positions, and the partials are added in range order.
/// The cut depends on the shapes alone and the chains on nothing else, so
/// the bits do not depend on the number of threads: threads take row blocks
/// of the partials, which any cut leaves unchanged.
pub(super) fn conv2d_backward_filter(
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    p: ConvParams,
    with_bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let cut = FilterCut {
        budget: FILTER_BUDGET,
        part_positions: FILTER_PART_POSITIONS,
    };
    backward_filter_in_groups(x, dy, w_shape, p, with_bias, cut)
}

/// How [`conv2d_backward_filter`] cuts its work, as arguments so the tests
/// can make small shapes take several ranges and slices.
#[derive(Clone, Copy, Debug)]
struct FilterCut {
    /// Values of the column matrix one task holds at a time, and of `dY^T`
    /// all ranges hold at a time.
    budget: usize,
    /// Positions a range of images spans at least.
    part_positions: usize,
}

/// [`conv2d_backward_filter`] with its cut as an argument.
fn backward_filter_in_groups(
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    p: ConvParams,
    with_bias: bool,
    cut: FilterCut,
) -> Result<(Tensor, Option<Tensor>)> {
    let g = Geom::new(x.shape(), w_shape, p)?;
    expect_shape("dy", dy, &[g.n, g.o, g.oh, g.ow])?;
    if !g.is_dense() {
        let dw = super::conv_grouped::backward_filter(x, dy, &g)?;
        let db = with_bias.then(|| bias_grad(dy, &g)).transpose()?;
        return Ok((dw, db));
    }
    let (rows, o) = (g.rows(), g.o);
    let db = with_bias.then(|| bias_grad(dy, &g)).transpose()?;
    if g.n == 0 {
        return Ok((Tensor::zeros(w_shape), db));
    }
    let parts = (g.n * g.positions() / cut.part_positions.max(1)).clamp(1, FILTER_PARTS.min(g.n));
    let per_part = g.n.div_ceil(parts).max(1);
    let ranges: Vec<Range<usize>> = (0..g.n)
        .step_by(per_part)
        .map(|first| first..(first + per_part).min(g.n))
        .collect();
    // Each range's partial is `dW^T` (`rows` padded to whole row blocks,
    // by `ldc`). Ranges run side by side, each over its positions a wave at
    // a time: the wave's `dY^T` is written into panels once, then tasks of
    // whole row blocks (at least two per thread in all, few enough rows
    // that a task's share of the partial, which every slice resumes, stays
    // in the second-level cache) continue their chains over it. The waves
    // of all ranges hold at most `budget` values of `dY^T`, so a large
    // batch needs no second copy of its `dY`.
    let (pos, o_pad) = (g.positions(), o.div_ceil(NR) * NR);
    let row_blocks = rows.div_ceil(MR);
    let ldc = padded_stride(o);
    let part_len = row_blocks * MR * ldc;
    let threads = rayon::current_num_threads().max(1);
    let per_range = (2 * threads).div_ceil(ranges.len()).clamp(1, row_blocks);
    let fit = ((1usize << 16) / (MR * ldc)).max(1);
    let blocks_per_task = row_blocks.div_ceil(per_range).clamp(1, fit);
    let tasks: Vec<Range<usize>> = (0..row_blocks)
        .step_by(blocks_per_task)
        .map(|b0| b0..(b0 + blocks_per_task).min(row_blocks))
        .collect();
    let wave = (cut.budget / (o_pad * ranges.len())).clamp(1, per_part * pos);
    let mut dw = vec![0.0f32; o * rows];
    let lens = [ranges.len() * o_pad * wave, ranges.len() * part_len];
    with_scratch(lens, |[dyts, partials]| {
        partials
            .par_chunks_mut(part_len)
            .zip(dyts.par_chunks_mut(o_pad * wave))
            .zip(&ranges)
            .for_each(|((partial, dyt), images)| {
                let out = SharedOut::new(partial);
                let positions = images.start * pos..images.end * pos;
                for (w, k0) in positions.clone().step_by(wave).enumerate() {
                    let span = k0..(k0 + wave).min(positions.end);
                    dy_panels(dy.data(), &g, span.clone(), dyt);
                    tasks.par_iter().for_each(|blocks| {
                        let r0 = blocks.start * MR;
                        // SAFETY: the tasks of a wave cover disjoint row
                        // blocks.
                        let dst = unsafe { out.region(r0 * ldc, blocks.len() * MR * ldc) };
                        let rows = r0..(blocks.end * MR).min(rows);
                        let (budget, onto) = (cut.budget, w > 0);
                        filter_rows(
                            x.data(),
                            dyt,
                            &g,
                            span.clone(),
                            rows,
                            budget,
                            dst,
                            ldc,
                            onto,
                        );
                    });
                }
            });
        let (first, rest) = partials.split_at_mut(part_len);
        for part in rest.chunks_exact(part_len) {
            first
                .par_chunks_mut(ELEMENTWISE_CHUNK)
                .zip(part.par_chunks(ELEMENTWISE_CHUNK))
                .for_each(|(d, p)| d.iter_mut().zip(p).for_each(|(d, p)| *d += p));
        }
        transpose_rows(first, ldc, rows, o, &mut dw);
    });
    Ok((Tensor::new(w_shape, dw)?, db))
}

/// `dst [cols, rows] = src^T`, `src` being `rows x cols` at row stride
/// `ld`, 16 columns of `dst` per task.
fn transpose_rows(src: &[f32], ld: usize, rows: usize, cols: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(NR * rows)
        .enumerate()
        .for_each(|(q, out)| {
            let width = NR.min(cols - q * NR);
            for r0 in (0..rows).step_by(NR) {
                let height = NR.min(rows - r0);
                transpose_block(
                    &src[r0 * ld + q * NR..],
                    ld,
                    height,
                    width,
                    &mut out[r0..],
                    rows,
                );
            }
        });
}

/// Writes the `h x w` block of `src` (row stride `lds`, `h, w <= 16`)
/// transposed into `dst` (row stride `ldd`) through a local 16 x 16 block:
/// every read and every write runs along a row, so neither side strides
/// through memory a value at a time (that walk, a cache line per value,
/// cost more than the product it fed).
fn transpose_block(src: &[f32], lds: usize, h: usize, w: usize, dst: &mut [f32], ldd: usize) {
    let mut block = [[0.0f32; NR]; NR];
    for (i, row) in src.chunks(lds).take(h).enumerate() {
        for (j, v) in row[..w].iter().enumerate() {
            block[j][i] = *v;
        }
    }
    for (line, out) in block.iter().take(w).zip(dst.chunks_mut(ldd)) {
        out[..h].copy_from_slice(&line[..h]);
    }
}

/// The bias gradient `[O]`: the sum of `dy` over images and positions, in
/// f64 over [`super::norm::channel_sums`]'s fixed lanes (one chain would
/// wait on every add's latency), rounded once.
fn bias_grad(dy: &Tensor, g: &Geom) -> Result<Tensor> {
    let dims = (g.n, g.o, g.positions());
    let sums: Vec<f32> = (0..g.o)
        .into_par_iter()
        .map(|o| {
            let [s] = super::norm::channel_sums(dims, o, |i| [dy.data()[i] as f64]);
            s as f32
        })
        .collect();
    Tensor::new(&[g.o], sums)
}

/// The rows `rows` (whole row blocks from a block boundary) of the
/// transposed filter gradient `dW^T = col dY^T` over the batch's positions
/// `positions` (image by image, `OH*OW` each), on one thread, into `dst`
/// (stride `ldc`, `rows` rounded up to whole blocks): every element's
/// in-order chain over those positions, started from 0 or, when `onto`,
/// continued from `dst` ([`chain_gemm::gemm_rows`], slice after slice).
///
/// The column matrix `col`, written row by row by [`im2col_segment`], is
/// the `A` the kernel reads as it lies; `dY` comes as the panels `dyt` of
/// the same positions ([`dy_panels`]). Positions are taken a slice at a
/// time (at most `budget` values of `col`), so the column matrix of a large
/// batch is never held whole.
#[allow(clippy::too_many_arguments)]
fn filter_rows(
    x: &[f32],
    dyt: &[f32],
    g: &Geom,
    positions: Range<usize>,
    rows: Range<usize>,
    budget: usize,
    dst: &mut [f32],
    ldc: usize,
    onto: bool,
) {
    let (pos, o) = (g.positions(), g.o);
    let rows_pad = rows.len().div_ceil(MR) * MR;
    // About 512 KiB of `col` and `dY` per slice (they stay in the
    // second-level cache while the kernel passes over them), within the
    // budget.
    let slice = ((1usize << 17) / (rows_pad + o.div_ceil(NR) * NR)).clamp(64, 2048) / NR * NR;
    let slice = slice.min(budget / rows_pad).max(1);
    with_scratch([rows_pad * slice], |[col]| {
        // The rows that pad `col` to whole row blocks give rows of `dW^T`
        // that are dropped; zeros keep them from holding stale NaNs.
        col[rows.len() * slice..].fill(0.0);
        for (i, k0) in positions.clone().step_by(slice).enumerate() {
            let kn = slice.min(positions.end - k0);
            for (img, ps, at) in segments(k0..k0 + kn, pos) {
                let x_n = &x[img * g.in_len()..][..g.in_len()];
                im2col_segment(x_n, g, rows.clone(), ps, col, slice, at);
            }
            let a = chain_gemm::AView::row_major(col, rows.len(), kn, slice);
            let (blocks, from) = (0..a.blocks(), k0 - positions.start);
            let depth = positions.len();
            chain_gemm::gemm_rows(a, blocks, dyt, depth, from, o, dst, ldc, onto || i > 0);
        }
    });
}

/// The batch's `dY` (`[N, O, OH*OW]`) at the positions `positions` (image
/// by image) transposed into the panel layout [`chain_gemm::gemm`] reads as
/// its `B`: as deep as the positions, a column per output channel, the last
/// panel's spare columns zero.
fn dy_panels(dy: &[f32], g: &Geom, positions: Range<usize>, dyt: &mut [f32]) {
    let (pos, depth) = (g.positions(), positions.len());
    let panels = g.o.div_ceil(NR);
    dyt[..panels * depth * NR]
        .par_chunks_mut(depth * NR)
        .enumerate()
        .for_each(|(q, panel)| {
            let lanes = NR.min(g.o - q * NR);
            for (img, ps, at) in segments(positions.clone(), pos) {
                let src = &dy[img * g.out_len() + q * NR * pos..];
                for p0 in ps.clone().step_by(NR) {
                    let n = NR.min(ps.end - p0);
                    let dst = &mut panel[(at + p0 - ps.start) * NR..];
                    transpose_block(&src[p0..], pos, lanes, n, dst, NR);
                }
            }
        });
    chain_gemm::zero_panel_tail(dyt, depth, g.o);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    /// A convolution test case: input and filter shapes, stride, padding.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        x: [usize; 4],
        w: [usize; 4],
        stride: usize,
        pad: usize,
    }

    const fn case(x: [usize; 4], w: [usize; 4], stride: usize, pad: usize) -> Case {
        Case { x, w, stride, pad }
    }

    impl Case {
        fn params(&self) -> ConvParams {
            ConvParams::new(self.stride, self.pad)
        }

        fn y_shape(&self) -> [usize; 4] {
            let p = self.params();
            [
                self.x[0],
                self.w[0],
                p.out_len(self.x[2], self.w[2]),
                p.out_len(self.x[3], self.w[3]),
            ]
        }

        /// Random input, filter, bias and output gradient.
        fn data(&self, seed: u64) -> (Tensor, Tensor, Tensor, Tensor) {
            let mut r = rng(seed);
            (
                uniform(&mut r, &self.x, -1.0, 1.0),
                uniform(&mut r, &self.w, -1.0, 1.0),
                uniform(&mut r, &[self.w[0]], -1.0, 1.0),
                uniform(&mut r, &self.y_shape(), -1.0, 1.0),
            )
        }

        /// Calls `f(x index, w index, y index)` for every product term of the
        /// convolution, by its definition: one loop per axis of x, w and y.
        fn for_each_term(&self, mut f: impl FnMut(usize, usize, usize)) {
            let [n, c, h, w] = self.x;
            let [o, _, kh, kw] = self.w;
            let [_, _, oh, ow] = self.y_shape();
            for i in 0..n {
                for oc in 0..o {
                    for yh in 0..oh {
                        for yw in 0..ow {
                            for ic in 0..c {
                                for a in 0..kh {
                                    for b in 0..kw {
                                        let ih =
                                            (yh * self.stride + a) as isize - self.pad as isize;
                                        let iw =
                                            (yw * self.stride + b) as isize - self.pad as isize;
                                        if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize
                                        {
                                            continue;
                                        }
                                        let xi = ((i * c + ic) * h + ih as usize) * w + iw as usize;
                                        let wi = ((oc * c + ic) * kh + a) * kw + b;
                                        let yi = ((i * o + oc) * oh + yh) * ow + yw;
                                        f(xi, wi, yi);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }

        /// Naive direct convolution in f64.
        fn naive_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
            let [_, o, oh, ow] = self.y_shape();
            let mut y: Vec<f64> = (0..y_len(self)).map(|i| b[(i / (oh * ow)) % o]).collect();
            self.for_each_term(|xi, wi, yi| y[yi] += x[xi] * w[wi]);
            y
        }

        /// Naive input gradient in f64 (the adjoint of the forward).
        fn naive_backward_data(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
            let mut dx = vec![0.0; self.x.iter().product()];
            self.for_each_term(|xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
            dx
        }

        /// Naive filter and bias gradients in f64.
        fn naive_backward_filter(&self, x: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
            let [_, o, oh, ow] = self.y_shape();
            let mut dw = vec![0.0; self.w.iter().product()];
            self.for_each_term(|xi, wi, yi| dw[wi] += dy[yi] * x[xi]);
            let mut db = vec![0.0; o];
            for (i, g) in dy.iter().enumerate() {
                db[(i / (oh * ow)) % o] += g;
            }
            (dw, db)
        }
    }

    fn y_len(c: &Case) -> usize {
        c.y_shape().iter().product()
    }

    /// Odd shapes covering every path: non-square images and kernels,
    /// stride 1 and 2, padding 0/1/2/3, 1x1 (pointwise and strided), 3x3
    /// and 7x7 kernels, batch 1, 5 and 7, channel counts 2, 3, 5, 17, 40;
    /// outputs with many positions (gemm along positions) and few
    /// (transposed products); tiny images whose im2col panels span several
    /// output rows and images, padded wider than the kernel's reach.
    const ODD_SHAPES: [Case; 11] = [
        case([7, 2, 2, 3], [3, 2, 3, 3], 1, 2),
        case([1, 3, 7, 9], [5, 3, 3, 3], 1, 1),
        case([5, 5, 9, 6], [17, 5, 3, 3], 2, 1),
        case([5, 17, 8, 8], [3, 17, 1, 1], 1, 0),
        case([1, 3, 11, 13], [5, 3, 7, 7], 2, 3),
        case([5, 3, 7, 7], [5, 3, 1, 1], 2, 0),
        case([1, 5, 6, 10], [17, 5, 2, 3], 1, 0),
        case([5, 3, 12, 13], [5, 3, 3, 3], 1, 1),
        case([5, 17, 4, 4], [40, 17, 3, 3], 1, 1),
        case([2, 40, 3, 3], [50, 40, 1, 1], 1, 0),
        case([5, 5, 13, 11], [3, 5, 7, 7], 1, 3),
    ];

    #[test]
    fn the_forward_over_windows_gives_the_unfolded_forwards_bits() {
        // Every stride-1 odd shape, plus a batch whose panels straddle
        // images and rows at 28 wide, one with more rows of filters than
        // one task's blocks, 1x1 kernels over whole panels (read in place)
        // and not (copied), and planes given zero rows against aliasing
        // (14x14 padded to 16x16, and the 8x8 1x1 above): with bias,
        // residual and ReLU, each output must be the same chain, bit for
        // bit.
        let extra = [
            case([3, 4, 28, 28], [10, 4, 3, 3], 1, 1),
            case([2, 6, 14, 14], [8, 6, 3, 3], 1, 1),
            case([2, 3, 5, 21], [70, 3, 3, 5], 1, 2),
            case([3, 20, 4, 4], [24, 20, 1, 1], 1, 0),
            case([3, 20, 5, 5], [24, 20, 1, 1], 1, 0),
        ];
        let shapes = ODD_SHAPES.iter().chain(&extra);
        let mut tried = 0;
        for (k, c) in shapes.filter(|c| c.stride == 1).enumerate() {
            let (x, w, b, res) = c.data(40 + k as u64);
            let g = Geom::new(&c.x, &c.w, c.params()).unwrap();
            for (bias, residual, relu) in [(None, None, false), (Some(&b), Some(&res), true)] {
                let epi = Epilogue {
                    bias: bias.map(|b| b.data()),
                    residual: residual.map(|r| r.data()),
                    relu,
                };
                let want = forward_dense(x.data(), w.data(), &epi, &g);
                let got = forward_windows(x.data(), w.data(), &epi, &g);
                assert_eq!(got.len(), want.len(), "{c:?}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{c:?} relu={relu} at {i}");
                }
            }
            tried += 1;
        }
        assert!(tried >= 12, "only {tried} shapes");
    }

    #[test]
    fn window_planes_that_would_alias_get_the_fewest_zero_rows_that_stop_it() {
        // 16x16 (1 KiB apart, four cache sets) and 8x8: one row more;
        // 34x34, 30x30 and 10x4 spread already; 32 wide cannot be helped
        // by rows.
        assert_eq!(alias_rows(16, 16), 1);
        assert_eq!(alias_rows(8, 8), 1);
        assert_eq!(alias_rows(34, 34), 0);
        assert_eq!(alias_rows(30, 30), 0);
        assert_eq!(alias_rows(10, 4), 0);
        assert_eq!(alias_rows(32, 32), 0);
        // Whatever the plane, unless it is 32 wide, the rows added stop the
        // aliasing.
        for hp in 1..70 {
            for wp in (1..70).filter(|wp| wp % 32 != 0) {
                assert!(!aliases((hp + alias_rows(hp, wp)) * wp), "{hp}x{wp}");
            }
        }
    }

    #[test]
    fn windows_are_taken_where_few_columns_are_wasted() {
        // 28 wide padded to 30: 1/14 of the columns wasted; 4 wide padded
        // to 6 and rounded to a panel: twice the outputs.
        let geom = |x: [usize; 4], w: [usize; 4], s| Geom::new(&x, &w, ConvParams::new(s, 1));
        assert!(windows_pay(
            &geom([8, 32, 28, 28], [32, 32, 3, 3], 1).unwrap()
        ));
        assert!(!windows_pay(
            &geom([8, 512, 4, 4], [512, 512, 3, 3], 1).unwrap()
        ));
        assert!(!windows_pay(
            &geom([8, 32, 28, 28], [32, 32, 3, 3], 2).unwrap()
        ));
        // 1x1: never with padding (the windows would copy the input as
        // the unfolding does), and without it where the images are whole
        // panels whose planes do not alias (4x4, not 8x8 or 32x32).
        assert!(!windows_pay(
            &geom([8, 32, 28, 28], [32, 32, 1, 1], 1).unwrap()
        ));
        let unpadded = |x: [usize; 4], w: [usize; 4]| Geom::new(&x, &w, ConvParams::new(1, 0));
        for side in [8, 32] {
            assert!(!windows_pay(
                &unpadded([8, 256, side, side], [64, 256, 1, 1]).unwrap()
            ));
        }
        assert!(windows_pay(
            &unpadded([8, 64, 4, 4], [512, 64, 1, 1]).unwrap()
        ));
        assert!(!windows_pay(
            &unpadded([8, 64, 7, 7], [16, 64, 1, 1]).unwrap()
        ));
    }

    #[test]
    fn forward_and_both_backwards_match_a_naive_direct_convolution_on_odd_shapes() {
        for (k, c) in ODD_SHAPES.iter().enumerate() {
            let (x, w, b, dy) = c.data(k as u64);
            let p = c.params();
            let what = format!("{c:?}");

            let y = conv2d(&x, &w, Some(&b), p).unwrap();
            assert_eq!(y.shape(), c.y_shape(), "{what}: output shape");
            let want = c.naive_forward(&f64s(&x), &f64s(&w), &f64s(&b));
            assert_close(&format!("forward {what}"), y.data(), &want, 2e-5);

            let dx = conv2d_backward_data(&dy, &w, &c.x, p).unwrap();
            let want = c.naive_backward_data(&f64s(&dy), &f64s(&w));
            assert_close(&format!("backward_data {what}"), dx.data(), &want, 2e-5);

            let (dw, db) = conv2d_backward_filter(&x, &dy, &c.w, p, true).unwrap();
            let (want_dw, want_db) = c.naive_backward_filter(&f64s(&x), &f64s(&dy));
            assert_close(
                &format!("backward_filter {what}"),
                dw.data(),
                &want_dw,
                2e-5,
            );
            assert_close(
                &format!("bias grad {what}"),
                db.unwrap().data(),
                &want_db,
                2e-5,
            );
        }
    }

    /// Stride-1 3x3 shapes the Winograd path takes: odd and even output
    /// sizes (partial tiles), padding 0, 1 and 2, one tile per image, and
    /// more columns than one task holds.
    const WINOGRAD_SHAPES: [Case; 5] = [
        case([2, 16, 7, 9], [20, 16, 3, 3], 1, 1),
        case([3, 17, 8, 8], [16, 17, 3, 3], 1, 0),
        case([1, 16, 5, 6], [18, 16, 3, 3], 1, 2),
        case([5, 24, 2, 2], [32, 24, 3, 3], 1, 1),
        case([2, 16, 30, 31], [16, 16, 3, 3], 1, 1),
    ];

    #[test]
    fn winograd_and_the_direct_path_both_match_a_naive_convolution_and_dgrad_takes_winograd() {
        // Which variant dgrad and the fused forward took: the shapes must
        // cover both.
        let mut f4_taken = [false; 2];
        let mut forward_f4_taken = [false; 2];
        for (k, c) in WINOGRAD_SHAPES.iter().enumerate() {
            let (x, w, b, dy) = c.data(500 + k as u64);
            let g = Geom::new(&c.x, &c.w, c.params()).unwrap();
            assert!(winograd::applies(&g), "{c:?} should take the Winograd path");
            let what = format!("{c:?}");
            let want_y = c.naive_forward(&f64s(&x), &f64s(&w), &f64s(&b));
            let want_dx = c.naive_backward_data(&f64s(&dy), &f64s(&w));

            let epi = Epilogue {
                bias: Some(b.data()),
                residual: None,
                relu: false,
            };
            let direct = forward_dense(x.data(), w.data(), &epi, &g);
            assert_close(&format!("direct forward {what}"), &direct, &want_y, 2e-5);
            let epi = Epilogue {
                bias: Some(b.data()),
                residual: None,
                relu: false,
            };
            let wino = winograd::forward_with::<winograd::F2>(x.data(), w.data(), &g, &epi);
            assert_close(&format!("winograd forward {what}"), &wino, &want_y, 2e-5);
            let wino4 = winograd::forward_with::<winograd::F4>(x.data(), w.data(), &g, &epi);
            assert_close(
                &format!("winograd F4 forward {what}"),
                &wino4,
                &want_y,
                2e-5,
            );
            // Direct unless the caller asks for Winograd, and then the
            // variant of fewer products, unless the params ask for direct.
            let public = conv2d(&x, &w, Some(&b), c.params()).unwrap();
            assert_bitwise(&format!("conv2d's default {what}"), public.data(), &direct);
            let fast = |p: ConvParams| conv2d_fused(&x, &w, Some(&b), None, false, p, true);
            let f4 = winograd::takes_f4(&winograd::forward_shape(&g));
            forward_f4_taken[usize::from(f4)] = true;
            assert_bitwise(
                &format!("fused forward asked for Winograd {what}"),
                fast(c.params()).unwrap().data(),
                if f4 { &wino4 } else { &wino },
            );
            assert_bitwise(
                &format!("fused forward asked for Winograd and direct {what}"),
                fast(c.params().direct()).unwrap().data(),
                &direct,
            );

            let direct = backward_data_dense(dy.data(), None, w.data(), &g);
            assert_close(
                &format!("direct backward_data {what}"),
                &direct,
                &want_dx,
                2e-5,
            );
            for (tile, wino) in [
                (
                    2,
                    winograd::backward_data_with::<winograd::F2>(dy.data(), None, w.data(), &g),
                ),
                (
                    4,
                    winograd::backward_data_with::<winograd::F4>(dy.data(), None, w.data(), &g),
                ),
            ] {
                assert_close(
                    &format!("winograd F{tile} backward_data {what}"),
                    &wino,
                    &want_dx,
                    2e-5,
                );
            }
            f4_taken[usize::from(winograd::backward_takes_f4(&g))] = true;
            let wino = winograd::backward_data(dy.data(), None, w.data(), &g);
            let public = conv2d_backward_data(&dy, &w, &c.x, c.params()).unwrap();
            assert_bitwise(&format!("dgrad's default {what}"), public.data(), &wino);
            let asked = conv2d_backward_data(&dy, &w, &c.x, c.params().direct()).unwrap();
            assert_bitwise(
                &format!("dgrad asked for direct {what}"),
                asked.data(),
                &direct,
            );
        }
        assert_eq!(f4_taken, [true, true], "dgrad took F(2x2) and F(4x4)");
        assert_eq!(
            forward_f4_taken,
            [true, true],
            "the forward took F(2x2) and F(4x4)"
        );
    }

    #[test]
    fn a_relu_gate_read_with_dy_gives_the_bits_of_masking_dy_first() {
        let grouped = Case {
            x: [3, 4, 6, 6],
            w: [6, 2, 3, 3],
            stride: 1,
            pad: 1,
        };
        let cases = ODD_SHAPES.iter().chain(&WINOGRAD_SHAPES);
        for (k, c) in cases.enumerate() {
            let (_, w, _, dy) = c.data(700 + k as u64);
            // A ReLU's output: zeros, positives, and a NaN or two.
            let mut y = uniform(&mut rng(800 + k as u64), &c.y_shape(), -1.0, 1.0)
                .data()
                .iter()
                .map(|&v| v.max(0.0))
                .collect::<Vec<_>>();
            y[0] = f32::NAN;
            let y = Tensor::new(&c.y_shape(), y).unwrap();
            let masked = super::super::elementwise::relu_backward(&dy, &y).unwrap();
            for p in [c.params(), c.params().direct()] {
                let want = conv2d_backward_data(&masked, &w, &c.x, p).unwrap();
                let got = conv2d_gated_backward_data(&dy, Some(&y), &w, &c.x, p).unwrap();
                assert_bitwise(&format!("{c:?} {p:?}"), got.data(), want.data());
            }
        }
        let (_, _, _, dy) = grouped.data(9);
        let w = uniform(&mut rng(10), &grouped.w, -1.0, 1.0);
        let p = grouped.params().with_groups(2);
        let y = uniform(&mut rng(11), dy.shape(), -1.0, 1.0);
        let masked = super::super::elementwise::relu_backward(&dy, &y).unwrap();
        let want = conv2d_backward_data(&masked, &w, &grouped.x, p).unwrap();
        let got = conv2d_gated_backward_data(&dy, Some(&y), &w, &grouped.x, p).unwrap();
        assert_bitwise("grouped", got.data(), want.data());
        let wrong = Tensor::zeros(&[1, 1, 1, 1]);
        assert!(conv2d_gated_backward_data(&dy, Some(&wrong), &w, &grouped.x, p).is_err());
    }

    #[test]
    fn winograd_is_batch_invariant_and_thread_independent_with_its_epilogue() {
        for (k, c) in WINOGRAD_SHAPES.iter().enumerate() {
            let (x, w, b, dy) = c.data(600 + k as u64);
            let p = c.params();
            let res = uniform(&mut rng(k as u64), &c.y_shape(), -1.0, 1.0);
            let geom = |n: usize| {
                let mut x_shape = c.x;
                x_shape[0] = n;
                Geom::new(&x_shape, &c.w, p).unwrap()
            };
            // Both variants, each through the forward.
            let forward = |x: &Tensor, res: Option<&Tensor>, relu: bool, f4: bool| {
                let g = geom(x.shape()[0]);
                let epi = Epilogue {
                    bias: Some(b.data()),
                    residual: res.map(|r| r.data()),
                    relu,
                };
                let y = if f4 {
                    winograd::forward_with::<winograd::F4>(x.data(), w.data(), &g, &epi)
                } else {
                    winograd::forward_with::<winograd::F2>(x.data(), w.data(), &g, &epi)
                };
                Tensor::new(&[g.n, g.o, g.oh, g.ow], y).unwrap()
            };
            let backward = |dy: &Tensor| {
                let g = geom(dy.shape()[0]);
                let dx = winograd::backward_data(dy.data(), None, w.data(), &g);
                Tensor::new(&[g.n, g.c, g.h, g.w], dx).unwrap()
            };
            for f4 in [false, true] {
                let what = format!("{c:?} F4 {f4}");
                assert_batch_invariant(&format!("forward {what}"), &x, |x| {
                    forward(x, None, false, f4)
                });
                assert_thread_independent(&what, || {
                    flat(&[&forward(&x, Some(&res), true, f4), &backward(&dy)])
                });
                // The epilogue is bias, then residual, then relu, as the
                // direct path's.
                let plain = forward(&x, None, false, f4);
                let want = crate::backend::cpu::elementwise::add(&plain, &res).unwrap();
                let want = crate::backend::cpu::elementwise::relu(&want).unwrap();
                let got = forward(&x, Some(&res), true, f4);
                assert_bitwise(&format!("epilogue {what}"), got.data(), want.data());
            }
            assert_batch_invariant(&format!("backward_data {c:?}"), &dy, backward);
        }
    }

    #[test]
    fn the_batched_product_is_batch_invariant_when_tasks_cut_images_apart() {
        // 3x3 stride 2 and a 5x5 kernel (direct path), with enough columns
        // that tasks start in the middle of an image; wide enough channels
        // that output rows are split between tasks too.
        for (k, c) in [
            case([7, 20, 33, 30], [40, 20, 3, 3], 2, 1),
            case([3, 8, 40, 37], [70, 8, 5, 5], 1, 2),
            case([4, 30, 4, 4], [200, 30, 1, 1], 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let (x, w, b, dy) = c.data(700 + k as u64);
            let p = c.params();
            let g = Geom::new(&c.x, &c.w, p).unwrap();
            assert!(!winograd::applies(&g));
            assert_batch_invariant(&format!("forward {c:?}"), &x, |x| {
                conv2d(x, &w, Some(&b), p).unwrap()
            });
            assert_batch_invariant(&format!("backward_data {c:?}"), &dy, |dy| {
                let mut x_shape = c.x;
                x_shape[0] = dy.shape()[0];
                conv2d_backward_data(dy, &w, &x_shape, p).unwrap()
            });
            let y = conv2d(&x, &w, Some(&b), p).unwrap();
            let want = c.naive_forward(&f64s(&x), &f64s(&w), &f64s(&b));
            assert_close(&format!("forward {c:?}"), y.data(), &want, 2e-5);
        }
    }

    #[test]
    fn a_fully_connected_input_gradient_has_the_bits_of_the_1x1_convolutions() {
        // Batches that are not whole row blocks, widths that are not whole
        // panels or that span several tasks, and smallcnn's fc1 (3136 -> 256
        // at batch 128): the product over `w`'s rows in place must give
        // every element the chain the 1x1 convolution's backward-data gives.
        for (seed, [n, k, o]) in [
            [1, 1, 1],
            [5, 7, 3],
            [6, 16, 10],
            [13, 300, 17],
            [40, 512, 10],
            [128, 3136, 256],
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = rng(seed as u64 + 90);
            let dy = uniform(&mut r, &[n, o], -1.0, 1.0);
            let w = uniform(&mut r, &[o, k], -1.0, 1.0);
            let want = backward_data_dense(dy.data(), None, w.data(), &pointwise(n, k, o));
            let got = fully_connected_backward_data(dy.data(), w.data(), [n, k, o]);
            assert_bitwise(&format!("fc input gradient {n}x{k}<-{o}"), &got, &want);
        }
    }

    #[test]
    fn the_shifted_plane_im2col_writes_the_column_matrix_by_its_definition() {
        // The odd shapes and a few more: stride-1 kernels 2 pad + 1 wide
        // (taken by the shifted copy) and others (row by row), over segments that start and end inside
        // output rows, into a buffer of NaNs: every entry is the input
        // pixel the definition names or a padding zero, whichever path ran.
        let extra = [
            case([1, 2, 4, 14], [1, 2, 3, 3], 1, 1),
            case([1, 2, 6, 6], [1, 2, 5, 5], 1, 2),
            case([1, 2, 5, 4], [1, 2, 1, 3], 1, 1),
            case([1, 1, 1, 1], [1, 1, 3, 3], 1, 1),
        ];
        for (n, c) in ODD_SHAPES.iter().chain(&extra).enumerate() {
            let (x, ..) = c.data(40 + n as u64);
            let g = Geom::new(&c.x, &c.w, c.params()).unwrap();
            let (rows, pos) = (g.rows(), g.positions());
            let at = |r: usize, p: usize| {
                let (ch, kh, kw) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
                let ih = (p / g.ow * g.stride + kh) as isize - g.pad as isize;
                let iw = (p % g.ow * g.stride + kw) as isize - g.pad as isize;
                let inside = (0..g.h as isize).contains(&ih) && (0..g.w as isize).contains(&iw);
                let i = ch * g.h * g.w + (ih * g.w as isize + iw).max(0) as usize;
                if inside {
                    x.data()[i]
                } else {
                    0.0
                }
            };
            // Whole, cut at either end, a middle third, and every single
            // position (a segment can be one column of a slice).
            let ranges = [(0, pos), (1, pos), (0, pos - 1), (pos / 3, pos * 2 / 3 + 1)];
            let singles = (0..pos).map(|p| (p, p + 1));
            for (p0, p1) in ranges.into_iter().chain(singles) {
                if p0 >= p1 {
                    continue;
                }
                let ld = p1 - p0 + 3;
                let mut col = vec![f32::NAN; rows * ld];
                im2col_segment(x.data(), &g, 0..rows, p0..p1, &mut col, ld, 2);
                for r in 0..rows {
                    for p in p0..p1 {
                        let got = col[r * ld + 2 + p - p0];
                        assert_eq!(got.to_bits(), at(r, p).to_bits(), "{c:?} rows {r} at {p}");
                    }
                }
            }
        }
    }

    #[test]
    fn backward_filter_slices_give_the_bits_of_one_chain_and_ranges_add_in_order() {
        let c = case([5, 5, 9, 6], [17, 5, 3, 3], 2, 1);
        let (x, _, _, dy) = c.data(11);
        let (want, _) = c.naive_backward_filter(&f64s(&x), &f64s(&dy));
        let cut = |budget, part_positions| FilterCut {
            budget,
            part_positions,
        };
        let run = |cut| backward_filter_in_groups(&x, &dy, &c.w, c.params(), false, cut).unwrap();
        // One range (the shape is small): a budget of one value takes one
        // position per wave of `dY^T` and per slice of the column matrix, a
        // budget of two images' worth of column matrix two images per slice
        // (and a wave of three images' positions); every element is the
        // same chain.
        let whole = run(cut(FILTER_BUDGET, FILTER_PART_POSITIONS)).0;
        assert_close("one range", whole.data(), &want, 2e-5);
        let two_images = 2 * 15 * (c.w[1] * 9).div_ceil(MR) * MR;
        for budget in [1, two_images] {
            let (dw, _) = run(cut(budget, FILTER_PART_POSITIONS));
            assert_bitwise(&format!("budget {budget}"), dw.data(), whole.data());
        }
        // Three ranges (a third of the positions each: two images, two and
        // one): each range's chain, added in range order, is what a plain
        // loop over the images gives.
        let (dw, _) = run(cut(FILTER_BUDGET, 5 * 15 / 3));
        let (rows, pos) = (c.w[1] * 9, 15);
        let g = Geom::new(x.shape(), &c.w, c.params()).unwrap();
        let mut col = vec![0.0f32; rows * pos];
        let mut sum: Option<Vec<f32>> = None;
        for images in [0..2, 2..4, 4..5] {
            let mut part = vec![0.0f32; c.w[0] * rows];
            for img in images {
                let x_n = &x.data()[img * g.in_len()..][..g.in_len()];
                im2col_segment(x_n, &g, 0..rows, 0..pos, &mut col, pos, 0);
                let dy_n = &dy.data()[img * g.out_len()..][..g.out_len()];
                for (o, dst) in part.chunks_exact_mut(rows).enumerate() {
                    for (r, v) in dst.iter_mut().enumerate() {
                        for p in 0..pos {
                            *v = col[r * pos + p].mul_add(dy_n[o * pos + p], *v);
                        }
                    }
                }
            }
            match sum.as_mut() {
                None => sum = Some(part),
                Some(s) => s.iter_mut().zip(&part).for_each(|(s, p)| *s += p),
            }
        }
        assert_bitwise("three ranges", dw.data(), &sum.unwrap());
        assert_close("three ranges", dw.data(), &want, 2e-5);
    }

    #[test]
    fn gradients_match_central_differences() {
        // Tiny shapes: stride 1 and 2, padding 0 and 1, a non-square
        // kernel, and a case with more output channels than positions.
        let cases = [
            case([2, 2, 5, 4], [3, 2, 3, 3], 1, 0),
            case([2, 2, 5, 6], [3, 2, 3, 3], 2, 1),
            case([1, 2, 4, 5], [2, 2, 2, 3], 1, 1),
            case([1, 2, 3, 3], [5, 2, 2, 2], 1, 0),
        ];
        for (k, c) in cases.iter().enumerate() {
            let (x, w, b, r) = c.data(100 + k as u64);
            let p = c.params();
            let (xd, wd, bd, rd) = (f64s(&x), f64s(&w), f64s(&b), f64s(&r));
            let what = format!("{c:?}");
            let dx = conv2d_backward_data(&r, &w, &c.x, p).unwrap();
            let (dw, db) = conv2d_backward_filter(&x, &r, &c.w, p, true).unwrap();
            let num_dx = numeric_grad(&xd, |x| dot(&c.naive_forward(x, &wd, &bd), &rd));
            let num_dw = numeric_grad(&wd, |w| dot(&c.naive_forward(&xd, w, &bd), &rd));
            let num_db = numeric_grad(&bd, |b| dot(&c.naive_forward(&xd, &wd, b), &rd));
            assert_close(&format!("dx {what}"), dx.data(), &num_dx, 1e-4);
            assert_close(&format!("dw {what}"), dw.data(), &num_dw, 1e-4);
            assert_close(&format!("db {what}"), db.unwrap().data(), &num_db, 1e-4);
        }
    }

    /// Shapes for the bitwise properties: gemm along positions, transposed
    /// products (one with an inner dimension over gemm's 512-deep blocks),
    /// pointwise, and a strided 7x7 stem.
    const INVARIANCE_SHAPES: [Case; 5] = [
        case([6, 3, 12, 12], [8, 3, 3, 3], 1, 1),
        case([6, 16, 4, 4], [40, 16, 3, 3], 1, 1),
        case([6, 64, 6, 6], [96, 64, 3, 3], 1, 1),
        case([6, 24, 5, 5], [32, 24, 1, 1], 1, 0),
        case([6, 3, 15, 15], [8, 3, 7, 7], 2, 3),
    ];

    #[test]
    fn forward_and_backward_data_are_batch_invariant() {
        for (k, c) in INVARIANCE_SHAPES.iter().enumerate() {
            let (x, w, b, dy) = c.data(200 + k as u64);
            let p = c.params();
            assert_batch_invariant(&format!("forward {c:?}"), &x, |x| {
                conv2d(x, &w, Some(&b), p).unwrap()
            });
            assert_batch_invariant(&format!("backward_data {c:?}"), &dy, |dy| {
                let mut x_shape = c.x;
                x_shape[0] = dy.shape()[0];
                conv2d_backward_data(dy, &w, &x_shape, p).unwrap()
            });
        }
    }

    #[test]
    fn the_fused_epilogue_is_bias_then_residual_then_relu_bit_for_bit() {
        use crate::backend::cpu::elementwise::{add, relu};
        for (k, c) in INVARIANCE_SHAPES.iter().enumerate() {
            let (x, w, b, res) = c.data(400 + k as u64);
            let p = c.params();
            let plain = conv2d(&x, &w, Some(&b), p).unwrap();
            let with_res = add(&plain, &res).unwrap();
            for (residual, relu_on, want) in [
                (None, false, plain.clone()),
                (None, true, relu(&plain).unwrap()),
                (Some(&res), false, with_res.clone()),
                (Some(&res), true, relu(&with_res).unwrap()),
            ] {
                let got = conv2d_fused(&x, &w, Some(&b), residual, relu_on, p, false).unwrap();
                assert_bitwise(
                    &format!("{c:?} residual {} relu {relu_on}", residual.is_some()),
                    got.data(),
                    want.data(),
                );
            }
        }
        let c = INVARIANCE_SHAPES[0];
        let (x, w, b, _) = c.data(1);
        let wrong = Tensor::zeros(&[1, 2, 3, 4]);
        let e = conv2d_fused(&x, &w, Some(&b), Some(&wrong), true, c.params(), false).unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
    }

    #[test]
    fn every_conv_op_gives_the_same_bits_on_any_number_of_threads() {
        for (k, c) in INVARIANCE_SHAPES.iter().enumerate() {
            // Nine images: three ranges of three for backward-filter when
            // a range may be one image's positions, sliced a position at a
            // time when the budget is one value.
            let c = Case {
                x: [9, c.x[1], c.x[2], c.x[3]],
                ..*c
            };
            let (x, w, b, dy) = c.data(300 + k as u64);
            let p = c.params();
            let pos = c.y_shape()[2] * c.y_shape()[3];
            let cut = FilterCut {
                budget: 1,
                part_positions: pos,
            };
            assert_thread_independent(&format!("{c:?}"), || {
                let y = conv2d(&x, &w, Some(&b), p).unwrap();
                let dx = conv2d_backward_data(&dy, &w, &c.x, p).unwrap();
                let (dw, db) = conv2d_backward_filter(&x, &dy, &c.w, p, true).unwrap();
                let (dw3, _) = backward_filter_in_groups(&x, &dy, &c.w, p, false, cut).unwrap();
                flat(&[&y, &dx, &dw, &db.unwrap(), &dw3])
            });
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let x = Tensor::zeros(&[2, 3, 5, 5]);
        let w = Tensor::zeros(&[4, 3, 3, 3]);
        let p = ConvParams::new(1, 0);
        let dy = Tensor::zeros(&[2, 4, 3, 3]);
        let wrong_channels = Tensor::zeros(&[4, 2, 3, 3]);
        assert!(conv2d(&x, &wrong_channels, None, p).is_err());
        assert!(conv2d(&Tensor::zeros(&[3, 5, 5]), &w, None, p).is_err());
        assert!(conv2d(&x, &w, Some(&Tensor::zeros(&[3])), p).is_err());
        assert!(conv2d(&x, &Tensor::zeros(&[4, 3, 7, 3]), None, p).is_err());
        assert!(conv2d(&x, &w, None, ConvParams::new(0, 0)).is_err());
        assert!(conv2d(&x, &Tensor::zeros(&[0, 3, 3, 3]), None, p).is_err());
        assert!(conv2d_backward_data(&dy, &w, &[2, 3, 6, 5], p).is_err());
        assert!(conv2d_backward_data(&dy, &wrong_channels, &[2, 3, 5, 5], p).is_err());
        assert!(
            conv2d_backward_filter(&x, &Tensor::zeros(&[2, 4, 3, 2]), &[4, 3, 3, 3], p, true)
                .is_err()
        );
        assert!(conv2d_backward_filter(&x, &dy, &[4, 3, 3], p, true).is_err());
        // The valid call for contrast, and an empty batch.
        assert!(conv2d_backward_filter(&x, &dy, &[4, 3, 3, 3], p, true).is_ok());
        let empty = conv2d(&Tensor::zeros(&[0, 3, 5, 5]), &w, None, p).unwrap();
        assert_eq!(empty.shape(), &[0, 4, 3, 3]);
    }
}
