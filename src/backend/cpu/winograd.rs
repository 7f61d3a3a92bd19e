//! Winograd F(2x2, 3x3) and F(4x4, 3x3) for dense stride-1 3x3
//! convolutions: each TxT block of outputs (a tile) takes `(T+2)^2`
//! products per channel pair instead of `9 T^2` (16 instead of 36 for
//! T = 2, 36 instead of 144 for T = 4).
//!
//! The input tile `d` (`(T+2)x(T+2)`) becomes `V = B^T d B`, the filter `g`
//! becomes `U = G g G^T`, and the products `M[xi] = sum_c U[xi][o][c]
//! V[xi][c]` are `(T+2)^2` matrix products over the tiles of every image
//! side by side ([`chain_gemm`], one in-order chain per element); the
//! outputs are `A^T M A`. Every tile is computed from its own input patch
//! with a fixed sequence of operations, so an image gets the same bits
//! alone or in a batch, on any number of threads.
//!
//! Backward-data of a stride-1 3x3 convolution with padding `p` is itself
//! such a convolution: of `dy` with the filter flipped and its channel axes
//! swapped, padding `2 - p`. It takes the variant with fewer products for
//! its shape (F(4x4) unless the image is smaller than about two tiles);
//! the forward, used only where asked (see `conv::WINOGRAD_FORWARD`), is
//! F(2x2), the more accurate.

use std::mem::MaybeUninit;
use std::sync::Arc;

use rayon::prelude::*;

use super::chain_gemm::{self, padded_stride, PackedA, CUT, MR, NR};
use super::conv::SharedOut;
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

/// One Winograd algorithm F(TxT, 3x3), as its three 1-D transforms: each is
/// applied along rows, then along columns. Arrays hold `A = T + 2` inputs
/// (or `T` outputs) from the front; the rest is unused.
pub(super) trait Variant: Sync {
    /// Outputs along one side of a tile.
    const T: usize;
    /// Inputs along one side of a tile.
    const A: usize = Self::T + 2;
    /// `B^T d`.
    fn input(d: &[f32; 6]) -> [f32; 6];
    /// `A^T m`.
    fn output(m: &[f32; 6]) -> [f32; 4];
    /// `G g`, in f64: the filter transform is rounded once, at the end.
    fn filter(g: [f64; 3]) -> [f64; 6];
}

/// F(2x2, 3x3): points 0, 1, -1 and infinity.
pub(super) struct F2;

impl Variant for F2 {
    const T: usize = 2;

    // B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]].
    #[inline(always)]
    fn input(d: &[f32; 6]) -> [f32; 6] {
        [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3], 0.0, 0.0]
    }

    // A^T = [[1,1,1,0],[0,1,-1,-1]].
    #[inline(always)]
    fn output(m: &[f32; 6]) -> [f32; 4] {
        [m[0] + m[1] + m[2], m[1] - m[2] - m[3], 0.0, 0.0]
    }

    // G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]].
    #[inline(always)]
    fn filter(g: [f64; 3]) -> [f64; 6] {
        [
            g[0],
            0.5 * (g[0] + g[1] + g[2]),
            0.5 * (g[0] - g[1] + g[2]),
            g[2],
            0.0,
            0.0,
        ]
    }
}

/// F(4x4, 3x3): points 0, 1, -1, 2, -2 and infinity (Lavin and Gray,
/// 2016), with the shared sums of their paper's transforms.
pub(super) struct F4;

impl Variant for F4 {
    const T: usize = 4;

    // B^T = [[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],
    //        [0,-2,-1,2,1,0],[0,2,-1,-2,1,0],[0,4,0,-5,0,1]].
    #[inline(always)]
    fn input(d: &[f32; 6]) -> [f32; 6] {
        let (s12, d12) = (d[1] + d[2], d[1] - d[2]);
        let (s34, d43) = (d[3] + d[4], d[4] - d[3]);
        let (d42, d31) = (d[4] - d[2], d[3] - d[1]);
        [
            4.0 * d[0] - 5.0 * d[2] + d[4],
            s34 - 4.0 * s12,
            d43 + 4.0 * d12,
            d42 + 2.0 * d31,
            d42 - 2.0 * d31,
            4.0 * d[1] - 5.0 * d[3] + d[5],
        ]
    }

    // A^T = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]].
    #[inline(always)]
    fn output(m: &[f32; 6]) -> [f32; 4] {
        let (s12, d12) = (m[1] + m[2], m[1] - m[2]);
        let (s34, d34) = (m[3] + m[4], m[3] - m[4]);
        [
            m[0] + s12 + s34,
            d12 + 2.0 * d34,
            s12 + 4.0 * s34,
            d12 + 8.0 * d34 + m[5],
        ]
    }

    // G = [[1/4,0,0],[-1/6,-1/6,-1/6],[-1/6,1/6,-1/6],
    //      [1/24,1/12,1/6],[1/24,-1/12,1/6],[0,0,1]].
    // Multiplied by the reciprocals, not divided: in training the filters
    // are transformed every step, and 63 f64 divisions per filter took 10%
    // of a resnet18 step. The f64 results differ by an ulp or two, far
    // below the f32 rounding that follows.
    #[inline(always)]
    fn filter(g: [f64; 3]) -> [f64; 6] {
        const SIXTH: f64 = 1.0 / 6.0;
        const TWELFTH: f64 = 1.0 / 12.0;
        const TWENTY_FOURTH: f64 = 1.0 / 24.0;
        [
            g[0] * 0.25,
            -(g[0] + g[1] + g[2]) * SIXTH,
            -(g[0] - g[1] + g[2]) * SIXTH,
            g[0] * TWENTY_FOURTH + g[1] * TWELFTH + g[2] * SIXTH,
            g[0] * TWENTY_FOURTH - g[1] * TWELFTH + g[2] * SIXTH,
            g[2],
        ]
    }
}

/// The extents of one Winograd convolution: `x [n, c, h, w]` with
/// `w [o, c, 3, 3]`, zero padding `pad`, output `[n, o, oh, ow]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
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
    /// Tile rows and columns of one image, for tiles of side `t`.
    fn tiles(&self, t: usize) -> (usize, usize) {
        (self.oh.div_ceil(t), self.ow.div_ceil(t))
    }

    /// Products per channel pair of one image with tiles of side `t`.
    fn products(&self, t: usize) -> usize {
        let (th, tw) = self.tiles(t);
        th * tw * (t + 2) * (t + 2)
    }
}

/// What to add to each output before it is stored: `relu?(y + bias +
/// residual)`, in that order (as the direct path's epilogue).
pub(super) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

const NO_EPILOGUE: Epilogue<'static> = Epilogue {
    bias: None,
    residual: None,
    relu: false,
};

/// The shape of [`forward`]'s convolution.
pub(super) fn forward_shape(g: &ConvGeom) -> Shape {
    Shape {
        n: g.n,
        c: g.c,
        h: g.h,
        w: g.w,
        o: g.o,
        pad: g.pad,
        oh: g.oh,
        ow: g.ow,
    }
}

/// Whether F(4x4) takes fewer products than F(2x2) on `s` (it does not on
/// images of 6x6 and less, whose partial tiles waste most of it).
pub(super) fn takes_f4(s: &Shape) -> bool {
    s.products(F4::T) < s.products(F2::T)
}

/// The forward convolution of `x` by `w` (see [`applies`]) with its
/// epilogue, with the variant of fewer products.
pub(super) fn forward(x: &[f32], w: &[f32], g: &ConvGeom, epi: &Epilogue<'_>) -> Vec<f32> {
    if takes_f4(&forward_shape(g)) {
        forward_with::<F4>(x, w, g, epi)
    } else {
        forward_with::<F2>(x, w, g, epi)
    }
}

/// [`forward`] with the variant `V`.
pub(super) fn forward_with<V: Variant>(
    x: &[f32],
    w: &[f32],
    g: &ConvGeom,
    epi: &Epilogue<'_>,
) -> Vec<f32> {
    let s = forward_shape(g);
    let u = transformed_filters::<V>(w, s.o, s.c, false);
    conv::<V>(x, None, &u, &s, epi)
}

/// The shape of [`backward_data`]'s convolution.
fn adjoint_shape(g: &ConvGeom) -> Shape {
    Shape {
        n: g.n,
        c: g.o,
        h: g.oh,
        w: g.ow,
        o: g.c,
        pad: 2 - g.pad,
        oh: g.h,
        ow: g.w,
    }
}

/// Whether [`backward_data`] takes F(4x4) (see [`takes_f4`]).
pub(super) fn backward_takes_f4(g: &ConvGeom) -> bool {
    takes_f4(&adjoint_shape(g))
}

/// The input gradient of the forward convolution (see [`applies`]): a
/// Winograd convolution of `dy` by the flipped, channel-swapped filter,
/// with the variant of fewer products. With a `gate` (a ReLU's output,
/// shaped as `dy`), `dy` passes it as the input transform reads it.
pub(super) fn backward_data(dy: &[f32], gate: Option<&[f32]>, w: &[f32], g: &ConvGeom) -> Vec<f32> {
    if backward_takes_f4(g) {
        backward_data_with::<F4>(dy, gate, w, g)
    } else {
        backward_data_with::<F2>(dy, gate, w, g)
    }
}

/// [`backward_data`] with the variant `V`.
pub(super) fn backward_data_with<V: Variant>(
    dy: &[f32],
    gate: Option<&[f32]>,
    w: &[f32],
    g: &ConvGeom,
) -> Vec<f32> {
    let s = adjoint_shape(g);
    let u = transformed_filters::<V>(w, g.o, g.c, true);
    conv::<V>(dy, gate, &u, &s, &NO_EPILOGUE)
}

/// [`filter_transform`] through the filter cache.
fn transformed_filters<V: Variant>(
    w: &[f32],
    o: usize,
    c: usize,
    adjoint: bool,
) -> Arc<Vec<PackedA>> {
    let packing = Packing::Winograd {
        adjoint,
        tile: V::T,
    };
    filter_cache::packed(packing, [o, c, 3, 3], w, || {
        filter_transform::<V>(w, o, c, adjoint)
    })
}

/// `U = G g G^T` for every filter, as `A^2` packed `[out, in]` matrices
/// (one per element of the transform). `w` is `[o, c, 3, 3]`; with
/// `adjoint` the result is for the filter `w'[c][o] = flip(w[o][c])`, whose
/// outputs are `w`'s input channels. Computed in f64 and rounded once,
/// written straight into the packed layout, a block of rows per task (in
/// training the filters change every step, and one thread writing a
/// layer's matrices and packing them afterwards took a tenth of the step).
fn filter_transform<V: Variant>(w: &[f32], o: usize, c: usize, adjoint: bool) -> Vec<PackedA> {
    let a = V::A;
    let (rows, inner) = if adjoint { (c, o) } else { (o, c) };
    let block = inner * MR;
    let mut mats: Vec<Vec<f32>> = (0..a * a)
        .map(|_| vec![0.0f32; rows.div_ceil(MR) * block])
        .collect();
    let outs: Vec<SharedOut<'_>> = mats.iter_mut().map(|m| SharedOut::new(m)).collect();
    (0..rows.div_ceil(MR)).into_par_iter().for_each(|blk| {
        // SAFETY: row block `blk` of every matrix is this task's alone.
        let mut dst: Vec<&mut [f32]> = outs
            .iter()
            .map(|m| unsafe { m.region(blk * block, block) })
            .collect();
        let live = MR.min(rows - blk * MR);
        for k in 0..inner {
            // `g[r][b][lane]`: tap `(r, b)` of the filter of the block's
            // row `lane` (the rows past `live` stay zero and are not
            // written). The block's rows go side by side through each
            // transform, which the compiler runs as vectors; each
            // element's arithmetic is the same as one row at a time.
            let filter = |rr: usize| -> Option<&[f32; 9]> {
                let r = blk * MR + rr;
                let (oi, ci) = if adjoint { (k, r) } else { (r, k) };
                (rr < live).then(|| w[(oi * c + ci) * 9..][..9].try_into().expect("9 taps"))
            };
            let filters: [Option<&[f32; 9]>; MR] = std::array::from_fn(filter);
            // The flipped filter's tap `(r, b)` is tap `(2 - r, 2 - b)`, at
            // `8 - (3 r + b)`.
            let tap = |t: usize| -> [f64; MR] {
                std::array::from_fn(|rr| {
                    filters[rr].map_or(0.0, |f| (if adjoint { f[8 - t] } else { f[t] }) as f64)
                })
            };
            let g: [[[f64; MR]; 3]; 3] =
                std::array::from_fn(|r| std::array::from_fn(|b| tap(3 * r + b)));
            // `G g` column by column, then `(G g) G^T` row by row.
            let cols: [[[f64; MR]; 6]; 3] =
                std::array::from_fn(|b| lanewise(&[g[0][b], g[1][b], g[2][b]], V::filter));
            for i in 0..a {
                let t = lanewise(&[cols[0][i], cols[1][i], cols[2][i]], V::filter);
                for (j, tj) in t[..a].iter().enumerate() {
                    let out = &mut dst[i * a + j][k * MR..][..live];
                    for (o, v) in out.iter_mut().zip(tj) {
                        *o = *v as f32;
                    }
                }
            }
        }
    });
    drop(outs);
    mats.into_iter()
        .map(|m| PackedA::from_packed(m, rows, inner))
        .collect()
}

/// Runs the convolution of `x` by the transformed filters `u`: tasks take a
/// range of tiles (of all images, side by side) and a range of output
/// channels.
/// `x` passes `gate` (see [`backward_data`]) where one is given.
fn conv<V: Variant>(
    x: &[f32],
    gate: Option<&[f32]>,
    u: &[PackedA],
    s: &Shape,
    epi: &Epilogue<'_>,
) -> Vec<f32> {
    let aa = V::A * V::A;
    let (th, tw) = s.tiles(V::T);
    let per_image = th * tw;
    let cols = s.n * per_image;
    let threads = rayon::current_num_threads().max(1);
    let blocks = s.o.div_ceil(MR);
    // One task's transformed inputs and products stay within about 4 MiB.
    let max_chunk = ((1usize << 20) / (aa * (s.c + s.o))).clamp(CUT, 512) / CUT * CUT;
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
    let fill = |y: &mut [MaybeUninit<f32>]| {
        let out = SharedOut::uninit(y);
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
            with_scratch([aa * s.c * width, aa * prows * ld], |[v, m]| {
                input_transform::<V>(x, gate, s, tiles.clone(), v);
                for xi in 0..aa {
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
                    let mo = |xi: usize| &m[(xi * prows + o - o0) * ld..][..width];
                    output_transform::<V>(s, o, tiles.clone(), mo, epi, &out);
                }
            })
        });
    };
    // SAFETY: the tasks cover every (channel, tile), and
    // `output_transform` writes every output of its tiles that lies inside
    // the image (the unit tests' NaN fill would show a miss).
    unsafe { super::filled_by(s.n * out_len, fill) }
}

/// One value of each of [`NR`] tiles side by side (a panel's row): the
/// transforms run along the tiles, as one vector.
type Lane = [f32; NR];

/// `V = B^T d B` for every input channel and every tile of `tiles`, into
/// `v`: `A^2` matrices `[c][tiles]` (tile `j` of the range in column `j`),
/// each in the panel layout [`chain_gemm::gemm`] reads, with the padding
/// columns up to a whole panel set to 0.
///
/// The row step runs along whole padded input rows of a tile row; the
/// column step gathers a panel's [`NR`] tiles into lanes and stores each
/// result as one whole panel row.
/// With a `gate` (shaped as `x`), each input passes
/// [`relu_gate`](super::elementwise::relu_gate) as it is read.
fn input_transform<V: Variant>(
    x: &[f32],
    gate: Option<&[f32]>,
    s: &Shape,
    tiles: std::ops::Range<usize>,
    v: &mut [f32],
) {
    let (a, tt) = (V::A, V::T);
    let (th, tw) = s.tiles(tt);
    let per_image = th * tw;
    let width = tiles.len().div_ceil(NR) * NR;
    // A padded input row: `pad` zeros, the row, then zeros up to the last
    // tile's reach (`T * tw + 2` columns), rounded up to whole lanes.
    let span = (tt * tw + 2).div_ceil(NR) * NR;
    let mut rows = vec![0.0f32; a * span];
    let mut t = vec![0.0f32; a * span];
    for ci in 0..s.c {
        // `g[i][k][lane]`: column `k` of row `i` of the row step, of the
        // tile in `lane`.
        let mut g = [[[0.0f32; NR]; 6]; 6];
        let (mut lane, mut panel) = (0, 0);
        let flush = |g: &[[Lane; 6]; 6], panel: usize, v: &mut [f32]| {
            let at = chain_gemm::panel_index(ci, panel * NR, s.c);
            for (i, gi) in g.iter().enumerate().take(a) {
                let r = lanes::<V, 6>(gi, V::input);
                for (q, rq) in r.iter().enumerate().take(a) {
                    v[(a * i + q) * s.c * width + at..][..NR].copy_from_slice(rq);
                }
            }
        };
        let mut tile = tiles.start;
        while tile < tiles.end {
            let (img, r) = (tile / per_image, tile % per_image);
            let (ty, tx0) = (r / tw, r % tw);
            let tx1 = tw.min(tx0 + tiles.end - tile);
            let at = (img * s.c + ci) * s.h * s.w;
            let plane = &x[at..][..s.h * s.w];
            let gate = gate.map(|y| &y[at..][..s.h * s.w]);
            for (k, row) in rows.chunks_exact_mut(span).enumerate() {
                row.fill(0.0);
                let ih = (tt * ty + k) as isize - s.pad as isize;
                if ih < 0 || ih >= s.h as isize {
                    continue;
                }
                let src = &plane[ih as usize * s.w..][..s.w];
                // Columns of the padded row: input column `iw` sits at
                // `iw + pad`; columns past `span` are never read.
                let n = s.w.min(span.saturating_sub(s.pad));
                let gate = gate.map(|y| &y[ih as usize * s.w..][..n]);
                super::elementwise::copy_gated(&mut row[s.pad..s.pad + n], &src[..n], gate);
            }
            row_step::<V>(&rows, &mut t, span);
            for tx in tx0..tx1 {
                for (i, gi) in g.iter_mut().enumerate().take(a) {
                    let ti = &t[i * span + tt * tx..][..a];
                    for (gk, tk) in gi.iter_mut().zip(ti) {
                        gk[lane] = *tk;
                    }
                }
                lane += 1;
                if lane == NR {
                    flush(&g, panel, v);
                    (lane, panel) = (0, panel + 1);
                }
            }
            tile += tx1 - tx0;
        }
        if lane > 0 {
            // The padding columns: transforms of zeros, which are zeros.
            for gk in g.iter_mut().flatten() {
                gk[lane..].fill(0.0);
            }
            flush(&g, panel, v);
        }
    }
}

/// The row step of the input transform: `t[i] = (B^T d)[i]` along the
/// `A` padded rows `d` of `span` columns each (whole lanes).
fn row_step<V: Variant>(rows: &[f32], t: &mut [f32], span: usize) {
    let a = V::A;
    for q0 in (0..span).step_by(NR) {
        let d: [Lane; 6] = std::array::from_fn(|k| lane_at(rows, k.min(a - 1) * span + q0));
        let r = lanes::<V, 6>(&d, V::input);
        for (i, ri) in r.iter().enumerate().take(a) {
            t[i * span + q0..][..NR].copy_from_slice(ri);
        }
    }
}

/// The lane of `src` from `at`.
#[inline(always)]
fn lane_at(src: &[f32], at: usize) -> Lane {
    src[at..at + NR].try_into().expect("a lane is NR long")
}

/// `f` applied lane by lane over the [`NR`] tiles of a panel, the inputs
/// past `V::A` zero (see [`lanewise`]).
#[inline(always)]
fn lanes<V: Variant, const R: usize>(d: &[Lane; 6], f: fn(&[f32; 6]) -> [f32; R]) -> [Lane; R] {
    lanewise(d, |x| {
        f(&std::array::from_fn(|k| if k < V::A { x[k] } else { 0.0 }))
    })
}

/// `f` applied lane by lane: `out[.][e] = f(d[.][e])` for each lane `e`
/// (a panel's tiles, or a block's filters), written so that the compiler
/// runs the lanes as one vector.
#[inline(always)]
fn lanewise<T: Copy + Default, const L: usize, const I: usize, const R: usize>(
    d: &[[T; L]; I],
    f: impl Fn([T; I]) -> [T; R],
) -> [[T; L]; R] {
    let mut out = [[T::default(); L]; R];
    for e in 0..L {
        let r = f(std::array::from_fn(|k| d[k][e]));
        for (o, rv) in out.iter_mut().zip(r) {
            o[e] = rv;
        }
    }
    out
}

/// `Y = A^T M A` for output channel `o` over the tiles `tiles` (`m(xi)`
/// the products of that channel, one column per tile, in whole panels),
/// with the epilogue, written to the outputs that lie inside the image.
#[inline(always)]
fn output_transform<'m, V: Variant>(
    s: &Shape,
    o: usize,
    tiles: std::ops::Range<usize>,
    m: impl Fn(usize) -> &'m [f32],
    epi: &Epilogue<'_>,
    out: &SharedOut<'_>,
) {
    let (a, tt) = (V::A, V::T);
    let (th, tw) = s.tiles(tt);
    let per_image = th * tw;
    let plane = s.oh * s.ow;
    let bias = epi.bias.map(|b| b[o]);
    for p in 0..tiles.len().div_ceil(NR) {
        // A panel of tiles at a time: `A^T M` column by column, then
        // `(A^T M) A` row by row, each along the tiles as one vector.
        let zero = [[0.0f32; NR]; 4];
        let cols: [[Lane; 4]; 6] = std::array::from_fn(|q| {
            if q < a {
                let d = std::array::from_fn(|i| lane_at(m(i.min(a - 1) * a + q), p * NR));
                lanes::<V, 4>(&d, V::output)
            } else {
                zero
            }
        });
        let ys: [[Lane; 4]; 4] = std::array::from_fn(|dy| {
            let d = std::array::from_fn(|q| cols[q][dy]);
            lanes::<V, 4>(&d, V::output)
        });
        for (e, tile) in (tiles.start + p * NR..tiles.end).take(NR).enumerate() {
            let (img, r) = (tile / per_image, tile % per_image);
            let (ty, tx) = (r / tw, r % tw);
            let base = (img * s.o + o) * plane;
            let w = tt.min(s.ow - tt * tx);
            for (dy, y) in ys.iter().enumerate().take(tt.min(s.oh - tt * ty)) {
                let at = base + (tt * ty + dy) * s.ow + tt * tx;
                let row: [f32; 4] = std::array::from_fn(|dx| y[dx][e]);
                // SAFETY: tasks cover disjoint (channel, tile) sets, and
                // tiles do not overlap, so each output has one writer.
                let dst = unsafe { out.put4(at, row, w) };
                let res = epi.residual.map(|r| &r[at..at + w]);
                super::conv::epilogue(dst, bias, res, epi.relu);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    /// `G g G^T` of one 3x3 filter, one element at a time: `G g` column by
    /// column, then row by row, in f64, rounded once.
    fn one_filter<V: Variant>(f: &[f32], adjoint: bool) -> Vec<f32> {
        let g = |r: usize, b: usize| -> f64 {
            let at = if adjoint {
                (2 - r) * 3 + 2 - b
            } else {
                r * 3 + b
            };
            f[at] as f64
        };
        let cols: [[f64; 6]; 3] = std::array::from_fn(|b| V::filter([g(0, b), g(1, b), g(2, b)]));
        (0..V::A)
            .flat_map(|i| {
                let t = V::filter([cols[0][i], cols[1][i], cols[2][i]]);
                t.into_iter().take(V::A).map(|v| v as f32)
            })
            .collect()
    }

    fn check<V: Variant>(o: usize, c: usize, adjoint: bool) {
        let w = uniform(&mut rng((o * 31 + c) as u64), &[o, c, 3, 3], -1.0, 1.0);
        let got = filter_transform::<V>(w.data(), o, c, adjoint);
        let (rows, inner) = if adjoint { (c, o) } else { (o, c) };
        let per: Vec<Vec<f32>> = (0..rows * inner)
            .map(|at| {
                let (r, k) = (at / inner, at % inner);
                let (oi, ci) = if adjoint { (k, r) } else { (r, k) };
                one_filter::<V>(&w.data()[(oi * c + ci) * 9..][..9], adjoint)
            })
            .collect();
        for (m, packed) in got.iter().enumerate() {
            let matrix: Vec<f32> = per.iter().map(|u| u[m]).collect();
            let want = PackedA::new(&matrix, rows, inner, inner, 1);
            let what = format!(
                "F({0}x{0}) element {m} of {o}x{c} (adjoint {adjoint})",
                V::T
            );
            assert_bitwise(&what, packed.data(), want.data());
        }
    }

    #[test]
    fn the_filter_transform_packs_g_g_gt_of_every_filter_bit_for_bit() {
        // Row counts that leave a partial block, both variants, both
        // directions: every packed element (padding rows zero) is the
        // transform of its own filter, computed one filter at a time.
        for (o, c) in [(1, 1), (7, 5), (13, 16), (16, 6)] {
            for adjoint in [false, true] {
                check::<F2>(o, c, adjoint);
                check::<F4>(o, c, adjoint);
            }
        }
    }
}
