//! 2-D convolution by im2col + GEMM: forward, backward-data (GEMM `W^T dY`
//! then col2im) and backward-filter (GEMM `dY col^T`, plus the bias sum).
//!
//! Every image goes through GEMMs of the same shape whatever the batch size,
//! which is what makes the forward and backward-data results batch
//! invariant. 1x1 stride-1 unpadded convolutions read the input as the
//! column matrix directly.

use rayon::prelude::*;

use super::{dims4, expect_shape, matmul, MatRef};
use crate::backend::ConvParams;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Upper bound, in values, of the column buffer backward-filter keeps for a
/// group of images (32 MiB): enough images per group to keep both cores
/// busy, bounded so that large batches do not need gigabytes.
const FILTER_COL_BUDGET: usize = 1 << 23;

/// Output channels per backward-filter task. Fixed, so the GEMM shapes (and
/// thereby the bits) do not depend on the number of threads.
const FILTER_ROWS: usize = 16;

/// The extents of one convolution, checked once.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
}

impl Geom {
    fn new(x_shape: &[usize], w_shape: &[usize], p: ConvParams) -> Result<Geom> {
        let [n, c, h, w] = dims4("x", x_shape)?;
        let [o, wc, kh, kw] = dims4("w", w_shape)?;
        if wc != c {
            return Err(Error::shape("w", &[o, c, kh, kw], w_shape));
        }
        if c == 0 || h == 0 || w == 0 || o == 0 || kh == 0 || kw == 0 {
            return Err(Error::Msg(format!(
                "conv2d: empty extent in input {x_shape:?} or filter {w_shape:?}"
            )));
        }
        if p.stride == 0 {
            return Err(Error::Msg("conv2d: stride must be at least 1".into()));
        }
        if h + 2 * p.pad < kh || w + 2 * p.pad < kw {
            return Err(Error::Msg(format!(
                "conv2d: kernel {kh}x{kw} is larger than the padded input {}x{}",
                h + 2 * p.pad,
                w + 2 * p.pad
            )));
        }
        Ok(Geom {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh: p.out_len(h, kh),
            ow: p.out_len(w, kw),
            stride: p.stride,
            pad: p.pad,
        })
    }

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

    /// A 1x1 stride-1 unpadded convolution, whose input already is its
    /// column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Values of the column matrix of one image (0 when none is needed).
    fn col_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.rows() * self.positions()
        }
    }
}

/// The output indices `lo..hi` along one axis whose input index
/// `o * stride + k - pad` lies inside `0..len` (the others read padding).
fn valid_outputs(k: usize, pad: usize, stride: usize, len: usize, out: usize) -> (usize, usize) {
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

/// Unfolds one image `[C, H, W]` into its column matrix
/// `[C*KH*KW, OH*OW]`: row `(c, kh, kw)`, column `(oh, ow)` holds
/// `x[c, oh*s + kh - pad, ow*s + kw - pad]`, or 0 in the padding.
fn im2col(x: &[f32], g: &Geom, col: &mut [f32]) {
    let (hw, ow) = (g.h * g.w, g.ow);
    let mut rows = col.chunks_exact_mut(g.positions());
    for plane in x.chunks_exact(hw) {
        for kh in 0..g.kh {
            let (oh_lo, oh_hi) = valid_outputs(kh, g.pad, g.stride, g.h, g.oh);
            for kw in 0..g.kw {
                let (ow_lo, ow_hi) = valid_outputs(kw, g.pad, g.stride, g.w, g.ow);
                let Some(row) = rows.next() else { return };
                row[..oh_lo * ow].fill(0.0);
                row[oh_hi * ow..].fill(0.0);
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.stride + kh - g.pad;
                    let src = &plane[ih * g.w..(ih + 1) * g.w];
                    let dst = &mut row[oh * ow..(oh + 1) * ow];
                    dst[..ow_lo].fill(0.0);
                    dst[ow_hi..].fill(0.0);
                    let dst = &mut dst[ow_lo..ow_hi];
                    let iw0 = ow_lo * g.stride + kw - g.pad;
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
    }
}

/// The adjoint of [`im2col`]: folds a column matrix back into one image,
/// summing the entries that came from the same input pixel (in row order,
/// so the sum order is fixed).
fn col2im(col: &[f32], g: &Geom, x: &mut [f32]) {
    x.fill(0.0);
    let (hw, ow) = (g.h * g.w, g.ow);
    let mut rows = col.chunks_exact(g.positions());
    for plane in x.chunks_exact_mut(hw) {
        for kh in 0..g.kh {
            let (oh_lo, oh_hi) = valid_outputs(kh, g.pad, g.stride, g.h, g.oh);
            for kw in 0..g.kw {
                let (ow_lo, ow_hi) = valid_outputs(kw, g.pad, g.stride, g.w, g.ow);
                let Some(row) = rows.next() else { return };
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

/// Cross-correlation of `x [N,C,H,W]` with `w [O,C,KH,KW]`, plus `bias [O]`.
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> Result<Tensor> {
    let g = Geom::new(x.shape(), w.shape(), p)?;
    if let Some(b) = bias {
        expect_shape("bias", b, &[g.o])?;
    }
    let wm = MatRef::row_major(w.data(), g.o, g.rows());
    let mut y = vec![0.0f32; g.n * g.out_len()];
    y.par_chunks_mut(g.out_len())
        .zip(x.data().par_chunks(g.in_len()))
        .for_each_init(
            || vec![0.0f32; g.col_len()],
            |col, (y_n, x_n)| {
                let cols: &[f32] = if g.pointwise() {
                    x_n
                } else {
                    im2col(x_n, &g, col);
                    col
                };
                matmul(
                    y_n,
                    wm,
                    MatRef::row_major(cols, g.rows(), g.positions()),
                    false,
                );
                if let Some(b) = bias {
                    for (row, &b_o) in y_n.chunks_exact_mut(g.positions()).zip(b.data()) {
                        row.iter_mut().for_each(|v| *v += b_o);
                    }
                }
            },
        );
    Tensor::new(&[g.n, g.o, g.oh, g.ow], y)
}

/// Gradient of [`conv2d`] with respect to its input: per image, the column
/// gradient `W^T dY` folded back by [`col2im`].
pub(super) fn conv2d_backward_data(
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    p: ConvParams,
) -> Result<Tensor> {
    let g = Geom::new(x_shape, w.shape(), p)?;
    expect_shape("dy", dy, &[g.n, g.o, g.oh, g.ow])?;
    let wt = MatRef::row_major(w.data(), g.o, g.rows()).t();
    let mut dx = vec![0.0f32; g.n * g.in_len()];
    dx.par_chunks_mut(g.in_len())
        .zip(dy.data().par_chunks(g.out_len()))
        .for_each_init(
            || vec![0.0f32; g.col_len()],
            |dcol, (dx_n, dy_n)| {
                let dym = MatRef::row_major(dy_n, g.o, g.positions());
                if g.pointwise() {
                    matmul(dx_n, wt, dym, false);
                } else {
                    matmul(dcol, wt, dym, false);
                    col2im(dcol, &g, dx_n);
                }
            },
        );
    Tensor::new(x_shape, dx)
}

/// Gradients of [`conv2d`] with respect to the filter (`sum_n dY_n col_n^T`)
/// and, when `with_bias`, the bias.
///
/// Images are unfolded a group at a time; each task owns
/// [`FILTER_ROWS`] output channels and adds the images' products in image
/// order, so the sum order is fixed by the shapes alone.
pub(super) fn conv2d_backward_filter(
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    p: ConvParams,
    with_bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let g = Geom::new(x.shape(), w_shape, p)?;
    expect_shape("dy", dy, &[g.n, g.o, g.oh, g.ow])?;
    let (rows, pos) = (g.rows(), g.positions());
    let group = if g.pointwise() {
        g.n.max(1)
    } else {
        (FILTER_COL_BUDGET / g.col_len()).clamp(1, g.n.max(1))
    };
    let mut cols = vec![0.0f32; group * g.col_len()];
    let mut dw = vec![0.0f32; g.o * rows];
    for start in (0..g.n).step_by(group) {
        let end = (start + group).min(g.n);
        if !g.pointwise() {
            cols[..(end - start) * g.col_len()]
                .par_chunks_mut(g.col_len())
                .zip(x.data()[start * g.in_len()..end * g.in_len()].par_chunks(g.in_len()))
                .for_each(|(col, x_n)| im2col(x_n, &g, col));
        }
        dw.par_chunks_mut(FILTER_ROWS * rows)
            .enumerate()
            .for_each(|(chunk, dw_rows)| {
                let o0 = chunk * FILTER_ROWS;
                let m = dw_rows.len() / rows;
                for img in start..end {
                    let col_n = if g.pointwise() {
                        &x.data()[img * g.in_len()..(img + 1) * g.in_len()]
                    } else {
                        &cols[(img - start) * g.col_len()..(img - start + 1) * g.col_len()]
                    };
                    let dy_rows = &dy.data()[img * g.out_len() + o0 * pos..][..m * pos];
                    matmul(
                        dw_rows,
                        MatRef::row_major(dy_rows, m, pos),
                        MatRef::row_major(col_n, rows, pos).t(),
                        img > 0,
                    );
                }
            });
    }
    let db = if with_bias {
        let sums: Vec<f32> = (0..g.o)
            .into_par_iter()
            .map(|o| {
                let mut s = 0.0f64;
                for img in 0..g.n {
                    let plane = &dy.data()[img * g.out_len() + o * pos..][..pos];
                    s += plane.iter().map(|&v| v as f64).sum::<f64>();
                }
                s as f32
            })
            .collect();
        Some(Tensor::new(&[g.o], sums)?)
    } else {
        None
    };
    Ok((Tensor::new(w_shape, dw)?, db))
}
