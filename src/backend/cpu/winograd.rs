//! Winograd F(2x2, 3x3) for dense stride-1 3x3 convolutions: each 2x2 block
//! of outputs (a tile) takes 16 products per channel pair instead of 36.
//!
//! The input tile `d` (4x4) becomes `V = B^T d B`, the filter `g` becomes
//! `U = G g G^T`, and the 16 products `M[xi] = sum_c U[xi][o][c] V[xi][c]`
//! are 16 matrix products over the tiles of every image side by side
//! ([`chain_gemm`], one in-order chain per element); the outputs are
//! `A^T M A`. Every tile is computed from its own input patch with a fixed
//! sequence of operations, so an image gets the same bits alone or in a
//! batch, on any number of threads.
//!
//! Backward-data of a stride-1 3x3 convolution with padding `p` is itself
//! such a convolution: of `dy` with the filter flipped and its channel axes
//! swapped, padding `2 - p`.

use std::sync::Arc;

use rayon::prelude::*;

use super::chain_gemm::{self, padded_stride, PackedA, CUT, MR, NR};
use super::filter_cache::{self, Packing};
use super::with_scratch;
use crate::backend::check::ConvGeom;

/// Smallest channel counts (in and out) at which the transforms pay for
/// themselves: below them the products are too thin to save much.
const MIN_CHANNELS: usize = 16;

/// Whether a convolution takes the Winograd path: decided by its shape
/// alone, so results never depend on timing.
pub(super) fn applies(g: &ConvGeom) -> bool {
    g.is_dense()
        && g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.pad <= 2
        && g.c >= MIN_CHANNELS
        && g.o >= MIN_CHANNELS
}

/// The extents of one Winograd convolution: `x [n, c, h, w]` with
/// `w [o, c, 3, 3]`, zero padding `pad`, output `[n, o, oh, ow]`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Shape {
    /// Tile rows and columns of one image.
    fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(2), self.ow.div_ceil(2))
    }
}

/// What to add to each output before it is stored: `relu?(y + bias +
/// residual)`, in that order (as the direct path's epilogue).
pub(super) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

/// The forward convolution of `x` by `w` (see [`applies`]).
pub(super) fn forward(x: &[f32], w: &[f32], g: &ConvGeom, epi: &Epilogue<'_>) -> Vec<f32> {
    let s = Shape {
        n: g.n,
        c: g.c,
        h: g.h,
        w: g.w,
        o: g.o,
        pad: g.pad,
        oh: g.oh,
        ow: g.ow,
    };
    let u = transformed_filters(w, s.o, s.c, false);
    conv(x, &u, &s, epi)
}

/// The input gradient of the forward convolution (see [`applies`]): a
/// Winograd convolution of `dy` by the flipped, channel-swapped filter.
pub(super) fn backward_data(dy: &[f32], w: &[f32], g: &ConvGeom) -> Vec<f32> {
    let s = Shape {
        n: g.n,
        c: g.o,
        h: g.oh,
        w: g.ow,
        o: g.c,
        pad: 2 - g.pad,
        oh: g.h,
        ow: g.w,
    };
    let u = transformed_filters(w, g.o, g.c, true);
    let none = Epilogue {
        bias: None,
        residual: None,
        relu: false,
    };
    conv(dy, &u, &s, &none)
}

/// [`filter_transform`] through the filter cache.
fn transformed_filters(w: &[f32], o: usize, c: usize, adjoint: bool) -> Arc<Vec<PackedA>> {
    filter_cache::packed(Packing::Winograd { adjoint }, [o, c, 3, 3], w, || {
        filter_transform(w, o, c, adjoint)
    })
}

/// `U = G g G^T` for every filter, as 16 packed `[out, in]` matrices (one
/// per element of the 4x4 transform). `w` is `[o, c, 3, 3]`; with `adjoint`
/// the result is for the filter `w'[c][o] = flip(w[o][c])`, whose outputs
/// are `w`'s input channels. Computed in f64 and rounded once.
fn filter_transform(w: &[f32], o: usize, c: usize, adjoint: bool) -> Vec<PackedA> {
    let (rows, inner) = if adjoint { (c, o) } else { (o, c) };
    let mut u = vec![0.0f32; 16 * rows * inner];
    for oi in 0..o {
        for ci in 0..c {
            let f = &w[(oi * c + ci) * 9..][..9];
            let g = |a: usize, b: usize| -> f64 {
                if adjoint {
                    f[(2 - a) * 3 + (2 - b)] as f64
                } else {
                    f[a * 3 + b] as f64
                }
            };
            // G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]].
            let gm = |i: usize, b: usize| -> f64 {
                match i {
                    0 => g(0, b),
                    1 => 0.5 * (g(0, b) + g(1, b) + g(2, b)),
                    2 => 0.5 * (g(0, b) - g(1, b) + g(2, b)),
                    _ => g(2, b),
                }
            };
            let (r, k) = if adjoint { (ci, oi) } else { (oi, ci) };
            for i in 0..4 {
                let row = [gm(i, 0), gm(i, 1), gm(i, 2)];
                let t = [
                    row[0],
                    0.5 * (row[0] + row[1] + row[2]),
                    0.5 * (row[0] - row[1] + row[2]),
                    row[2],
                ];
                for (j, v) in t.iter().enumerate() {
                    u[((i * 4 + j) * rows + r) * inner + k] = *v as f32;
                }
            }
        }
    }
    u.chunks_exact(rows * inner)
        .map(|m| PackedA::new(m, rows, inner, inner, 1))
        .collect()
}

/// Runs the convolution of `x` by the transformed filters `u`: tasks take a
/// range of tiles (of all images, side by side) and a range of output
/// channels.
fn conv(x: &[f32], u: &[PackedA], s: &Shape, epi: &Epilogue<'_>) -> Vec<f32> {
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let cols = s.n * per_image;
    let threads = rayon::current_num_threads().max(1);
    let blocks = s.o.div_ceil(MR);
    // One task's transformed inputs and products stay within about 4 MiB.
    let max_chunk = ((1usize << 20) / (16 * (s.c + s.o))).clamp(CUT, 512) / CUT * CUT;
    let chunk = (cols.div_ceil(threads).div_ceil(CUT) * CUT).clamp(CUT, max_chunk);
    let col_tasks = cols.div_ceil(chunk).max(1);
    let parts = if col_tasks >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(col_tasks)
            .min(blocks.div_ceil(4))
            .max(1)
    };
    let per_part = blocks.div_ceil(parts);
    let out_len = s.o * s.oh * s.ow;
    let mut y = vec![0.0f32; s.n * out_len];
    let out = super::conv::SharedOut::new(&mut y);
    (0..col_tasks * parts).into_par_iter().for_each(|t| {
        let t0 = t / parts * chunk;
        let tiles = t0..(t0 + chunk).min(cols);
        let part = (t % parts) * per_part..((t % parts + 1) * per_part).min(blocks);
        if part.is_empty() {
            return;
        }
        let ld = padded_stride(tiles.len());
        let width = tiles.len().div_ceil(NR) * NR;
        let prows = part.len() * MR;
        with_scratch([16 * s.c * width, 16 * prows * ld], |[v, m]| {
            input_transform(x, s, tiles.clone(), v);
            for xi in 0..16 {
                chain_gemm::gemm(
                    &u[xi],
                    part.clone(),
                    &v[xi * s.c * width..][..s.c * width],
                    tiles.len(),
                    &mut m[xi * prows * ld..][..prows * ld],
                    ld,
                );
            }
            let o0 = part.start * MR;
            for o in o0..(part.end * MR).min(s.o) {
                let mo = |xi: usize| &m[(xi * prows + o - o0) * ld..][..tiles.len()];
                output_transform(s, o, tiles.clone(), mo, epi, &out);
            }
        })
    });
    y
}

/// `V = B^T d B` for every input channel and every tile of `tiles`, into
/// `v`: 16 matrices `[c][tiles]` (tile `j` of the range in column `j`), each
/// in the panel layout [`chain_gemm::gemm`] reads, with the padding
/// columns up to a whole panel set to 0.
///
/// `B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`; the row step runs
/// along whole padded input rows, the column step per tile.
fn input_transform(x: &[f32], s: &Shape, tiles: std::ops::Range<usize>, v: &mut [f32]) {
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let width = tiles.len().div_ceil(NR) * NR;
    // A padded input row: `pad` zeros, the row, then zeros up to the last
    // tile's reach (2 * tw + 2 columns).
    let span = 2 * tw + 2;
    let mut rows = vec![0.0f32; 4 * span];
    let mut t = vec![0.0f32; 4 * span];
    for ci in 0..s.c {
        let mut j = 0;
        let mut tile = tiles.start;
        while tile < tiles.end {
            let (img, r) = (tile / per_image, tile % per_image);
            let (ty, tx0) = (r / tw, r % tw);
            let tx1 = tw.min(tx0 + tiles.end - tile);
            let plane = &x[(img * s.c + ci) * s.h * s.w..][..s.h * s.w];
            for (k, row) in rows.chunks_exact_mut(span).enumerate() {
                row.fill(0.0);
                let ih = (2 * ty + k) as isize - s.pad as isize;
                if ih < 0 || ih >= s.h as isize {
                    continue;
                }
                let src = &plane[ih as usize * s.w..][..s.w];
                // Columns of the padded row: input column `iw` sits at
                // `iw + pad`; columns past `span` are never read.
                let n = s.w.min(span.saturating_sub(s.pad));
                row[s.pad..s.pad + n].copy_from_slice(&src[..n]);
            }
            let (d0, rest) = rows.split_at(span);
            let (d1, rest) = rest.split_at(span);
            let (d2, d3) = rest.split_at(span);
            let (t0, rest) = t.split_at_mut(span);
            let (t1, rest) = rest.split_at_mut(span);
            let (t2, t3) = rest.split_at_mut(span);
            for q in 0..span {
                t0[q] = d0[q] - d2[q];
                t1[q] = d1[q] + d2[q];
                t2[q] = d2[q] - d1[q];
                t3[q] = d1[q] - d3[q];
            }
            // The column step, a panel's share of the tiles at a time: each
            // of the 16 outputs is then one contiguous run of its panel.
            let mut done = 0;
            while done < tx1 - tx0 {
                let col = j + done;
                let len = (NR - col % NR).min(tx1 - tx0 - done);
                let at = chain_gemm::panel_index(ci, col, s.c);
                for (i, ti) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                    let ti = &ti[2 * (tx0 + done)..][..2 * len + 2];
                    let o = |q: usize| (4 * i + q) * s.c * width + at;
                    fill(&mut v[o(0)..][..len], |e| ti[e] - ti[e + 2]);
                    fill(&mut v[o(1)..][..len], |e| ti[e + 1] + ti[e + 2]);
                    fill(&mut v[o(2)..][..len], |e| ti[e + 2] - ti[e + 1]);
                    fill(&mut v[o(3)..][..len], |e| ti[e + 1] - ti[e + 3]);
                }
                done += len;
            }
            j += tx1 - tx0;
            tile += tx1 - tx0;
        }
    }
    for m in v.chunks_exact_mut(s.c * width).take(16) {
        chain_gemm::zero_panel_tail(m, s.c, tiles.len());
    }
}

/// `dst[e] = f(2 e)`: one output of the column step for consecutive tiles
/// (tile `e`'s 4 columns start at `2 e`).
#[inline(always)]
fn fill(dst: &mut [f32], f: impl Fn(usize) -> f32) {
    for (e, d) in dst.iter_mut().enumerate() {
        *d = f(2 * e);
    }
}

/// `Y = A^T M A` for output channel `o` over the tiles `tiles`
/// (`m(xi)` the products of that channel, one column per tile), with the
/// epilogue, written to the outputs that lie inside the image.
///
/// `A^T = [[1,1,1,0],[0,1,-1,-1]]`.
fn output_transform<'m>(
    s: &Shape,
    o: usize,
    tiles: std::ops::Range<usize>,
    m: impl Fn(usize) -> &'m [f32],
    epi: &Epilogue<'_>,
    out: &super::conv::SharedOut<'_>,
) {
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let plane = s.oh * s.ow;
    let ms: [&[f32]; 16] = std::array::from_fn(&m);
    let bias = epi.bias.map(|b| b[o]);
    // Tiles go a tile row of one image at a time, so each output row is
    // one slice.
    let (mut j, mut tile) = (0, tiles.start);
    while tile < tiles.end {
        let (img, r) = (tile / per_image, tile % per_image);
        let (ty, tx0) = (r / tw, r % tw);
        let n = (tw - tx0).min(tiles.end - tile);
        let base = (img * s.o + o) * plane;
        for dy in 0..2 {
            let oh = 2 * ty + dy;
            if oh >= s.oh {
                continue;
            }
            let at = base + oh * s.ow + 2 * tx0;
            let len = (2 * (tx0 + n)).min(s.ow) - 2 * tx0;
            // SAFETY: tasks cover disjoint (channel, tile) sets, and tiles
            // do not overlap, so each output has one writer.
            let dst = unsafe { out.region(at, len) };
            // Row `dy` of `A^T M` takes rows `dy..dy + 3` of `M`: `m0 + m1 +
            // m2` for the first, `m1 - m2 - m3` for the second; then `A`.
            let src: [&[f32]; 12] =
                std::array::from_fn(|q| &ms[(q / 4 + dy) * 4 + q % 4][j..j + n]);
            let sign = if dy == 0 { 1.0 } else { -1.0 };
            for (t, pair) in dst.chunks_mut(2).enumerate() {
                // `x - y` is `x + (-1) * y` exactly, so one expression
                // serves both rows with the same roundings.
                let a0 = src[0][t] + sign * src[4][t] + sign * src[8][t];
                let a1 = src[1][t] + sign * src[5][t] + sign * src[9][t];
                let a2 = src[2][t] + sign * src[6][t] + sign * src[10][t];
                let a3 = src[3][t] + sign * src[7][t] + sign * src[11][t];
                pair[0] = a0 + a1 + a2;
                if let Some(v) = pair.get_mut(1) {
                    *v = a1 - a2 - a3;
                }
            }
            let res = epi.residual.map(|r| &r[at..at + len]);
            super::conv::epilogue(dst, bias, res, epi.relu);
        }
        j += n;
        tile += n;
    }
}
