//! Shape checks and op geometry shared by every backend, so the CPU
//! reference and the GPU path accept and refuse exactly the same inputs,
//! with the same messages.

use super::{ConvParams, PoolParams};
use crate::error::{Error, Result};
use crate::tensor::numel;

/// The four extents of an NCHW tensor, or an error naming it.
pub fn dims4(name: &str, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref s => Err(Error::tensor(
            name,
            format!("expected 4 dimensions [N, C, H, W], got shape {s:?}"),
        )),
    }
}

/// The two extents of an `[N, F]` tensor, or an error naming it.
pub fn dims2(name: &str, shape: &[usize]) -> Result<[usize; 2]> {
    match *shape {
        [n, f] => Ok([n, f]),
        ref s => Err(Error::tensor(
            name,
            format!("expected 2 dimensions [N, F], got shape {s:?}"),
        )),
    }
}

/// `(N, C, plane)` of a `[N, C, ...]` tensor.
pub fn channel_dims(name: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    if shape.len() < 2 {
        return Err(Error::tensor(
            name,
            format!("expected [N, C, ...], got shape {shape:?}"),
        ));
    }
    Ok((shape[0], shape[1], numel(&shape[2..])))
}

/// The extents of one convolution `x [N,C,H,W] * w [O,C/groups,KH,KW]`,
/// checked once.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
    /// Channel groups (`c` and `o` are multiples of it).
    pub groups: usize,
    /// Distance between filter taps.
    pub dilation: usize,
}

impl ConvGeom {
    /// Checks an input and a filter shape against each other and `p`.
    pub fn new(x_shape: &[usize], w_shape: &[usize], p: ConvParams) -> Result<ConvGeom> {
        let [n, c, h, w] = dims4("x", x_shape)?;
        let [o, wc, kh, kw] = dims4("w", w_shape)?;
        if p.groups == 0 || p.dilation == 0 {
            return Err(Error::Msg(format!(
                "conv2d: groups and dilation must be at least 1, got {p:?}"
            )));
        }
        if !c.is_multiple_of(p.groups) || !o.is_multiple_of(p.groups) {
            return Err(Error::Msg(format!(
                "conv2d: {} groups must divide both the {c} input channels and the {o} output channels",
                p.groups
            )));
        }
        if wc != c / p.groups {
            return Err(Error::shape("w", &[o, c / p.groups, kh, kw], w_shape));
        }
        if c == 0 || h == 0 || w == 0 || o == 0 || kh == 0 || kw == 0 {
            return Err(Error::Msg(format!(
                "conv2d: empty extent in input {x_shape:?} or filter {w_shape:?}"
            )));
        }
        if p.stride == 0 {
            return Err(Error::Msg("conv2d: stride must be at least 1".into()));
        }
        let (sh, sw) = (p.span(kh), p.span(kw));
        if h + 2 * p.pad < sh || w + 2 * p.pad < sw {
            return Err(Error::Msg(format!(
                "conv2d: kernel {kh}x{kw} (dilation {}) spans {sh}x{sw}, more than the padded input {}x{}",
                p.dilation,
                h + 2 * p.pad,
                w + 2 * p.pad
            )));
        }
        Ok(ConvGeom {
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
            groups: p.groups,
            dilation: p.dilation,
        })
    }

    /// `[N, O, OH, OW]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }

    /// True for one group without dilation (the GEMM paths).
    pub fn is_dense(&self) -> bool {
        self.groups == 1 && self.dilation == 1
    }

    /// Input channels of one group.
    pub fn c_per_group(&self) -> usize {
        self.c / self.groups
    }

    /// Output channels of one group.
    pub fn o_per_group(&self) -> usize {
        self.o / self.groups
    }
}

/// The extents of one pooling op, checked once.
#[derive(Clone, Copy, Debug)]
pub struct PoolGeom {
    /// Images.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Window, stride, padding.
    pub p: PoolParams,
}

impl PoolGeom {
    /// Checks an input shape against `p`.
    pub fn new(x_shape: &[usize], p: PoolParams) -> Result<PoolGeom> {
        let [n, c, h, w] = dims4("x", x_shape)?;
        if h == 0 || w == 0 {
            return Err(Error::tensor(
                "x",
                format!("pool of an empty plane {x_shape:?}"),
            ));
        }
        if p.kernel == 0 || p.stride == 0 {
            return Err(Error::Msg(format!(
                "pool: kernel and stride must be at least 1, got {p:?}"
            )));
        }
        // As PyTorch requires; it also guarantees that every window holds at
        // least one input pixel.
        if 2 * p.pad > p.kernel {
            return Err(Error::Msg(format!(
                "pool: padding {} is more than half the kernel {}",
                p.pad, p.kernel
            )));
        }
        if h + 2 * p.pad < p.kernel || w + 2 * p.pad < p.kernel {
            return Err(Error::Msg(format!(
                "pool: kernel {} is larger than the padded input {}x{}",
                p.kernel,
                h + 2 * p.pad,
                w + 2 * p.pad
            )));
        }
        Ok(PoolGeom {
            n,
            c,
            h,
            w,
            oh: p.out_len(h),
            ow: p.out_len(w),
            p,
        })
    }

    /// `[N, C, OH, OW]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }
}

/// Checks the arguments of a softmax cross-entropy; returns `[N, K]`.
pub fn cross_entropy_args(
    logits: &[usize],
    labels: &[usize],
    weights: &[f32],
) -> Result<[usize; 2]> {
    let [n, k] = dims2("logits", logits)?;
    for (what, len) in [("labels", labels.len()), ("weights", weights.len())] {
        if len != n {
            return Err(Error::Msg(format!(
                "softmax_cross_entropy: {len} {what} for {n} rows of logits"
            )));
        }
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= k) {
        return Err(Error::Msg(format!(
            "softmax_cross_entropy: label {l} of sample {i} is out of range for {k} classes"
        )));
    }
    Ok([n, k])
}

/// A PGD radius must be a number >= 0.
pub fn pgd_radius(eps: f32) -> Result<()> {
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::arg(
            "eps",
            format!("PGD radius must be >= 0, got {eps}"),
        ));
    }
    Ok(())
}

/// Checks the arguments of a pattern gradient, `dx [S*B,C,H,W]` against
/// `mask [S,H,W]`; returns `(S, B, C, H*W)`.
pub fn pattern_grad_dims(dx: &[usize], mask: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let [n, c, h, w] = dims4("dx", dx)?;
    let [s, mh, mw] = match *mask {
        [s, mh, mw] => [s, mh, mw],
        ref m => {
            return Err(Error::tensor(
                "mask",
                format!("expected 3 dimensions [S, H, W], got shape {m:?}"),
            ))
        }
    };
    if s == 0 || c * h * w == 0 {
        return Err(Error::tensor(
            "mask",
            format!(
                "needs at least one search of a non-empty image, got mask {mask:?} and dx {dx:?}"
            ),
        ));
    }
    if (mh, mw) != (h, w) {
        return Err(Error::shape("mask", &[s, h, w], mask));
    }
    if n % s != 0 {
        let b = (n / s).max(1);
        return Err(Error::shape("dx", &[s * b, c, h, w], dx));
    }
    Ok((s, n / s, c, h * w))
}

/// Rows of `dst` (its first axis) once each holds as many values as `src`.
pub fn row_count(dst: &[usize], src_len: usize) -> Result<usize> {
    let rows = dst.first().copied().unwrap_or(0);
    let per_row = dst.iter().skip(1).product::<usize>();
    if per_row != src_len {
        return Err(Error::tensor(
            "window row",
            format!("{src_len} values written into rows of {per_row} (window {dst:?})"),
        ));
    }
    Ok(rows)
}

/// The row width of `counts [rows, width]`, checked against `slot`.
pub fn counts_width(shape: &[usize], slot: usize) -> Result<usize> {
    match shape {
        [_, width] if slot < *width => Ok(*width),
        _ => Err(Error::tensor(
            "non-finite counts",
            format!("slot {slot} of counts shaped {shape:?} (need [steps, width > slot])"),
        )),
    }
}

/// `(rows, values per row)` of a gather's source, its rows along the first axis.
pub fn gather_source(shape: &[usize]) -> Result<(usize, usize)> {
    let rows = *shape
        .first()
        .ok_or_else(|| Error::tensor("gather source", "has no rows (a scalar)"))?;
    Ok((rows, numel(shape) / rows.max(1)))
}
