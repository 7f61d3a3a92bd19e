//! Max, average and global average pooling with their gradients. Each
//! (image, channel) plane is independent and computed sequentially, one
//! plane per task.

use rayon::prelude::*;

use super::{dims2, dims4, expect_shape};
use crate::backend::PoolParams;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The extents of one pooling op, checked once.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    p: PoolParams,
}

impl Geom {
    fn new(x_shape: &[usize], p: PoolParams) -> Result<Geom> {
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
        Ok(Geom {
            n,
            c,
            h,
            w,
            oh: p.out_len(h),
            ow: p.out_len(w),
            p,
        })
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }

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
    per_plane(x.data(), g.h * g.w, &mut y, g.oh * g.ow, |xp, yp| {
        for oh in 0..g.oh {
            for ow in 0..g.ow {
                yp[oh * g.ow + ow] = g.argmax(xp, oh, ow).1;
            }
        }
    });
    Tensor::new(&g.out_shape(), y)
}

/// Gradient of [`max_pool2d`], routed to the first maximum of each window.
pub(super) fn max_pool2d_backward(x: &Tensor, dy: &Tensor, p: PoolParams) -> Result<Tensor> {
    let g = Geom::new(x.shape(), p)?;
    expect_shape("dy", dy, &g.out_shape())?;
    let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![0.0f32; x.len()];
    if out_plane > 0 {
        dx.par_chunks_mut(in_plane)
            .zip(x.data().par_chunks(in_plane))
            .zip(dy.data().par_chunks(out_plane))
            .for_each(|((dxp, xp), dyp)| {
                for oh in 0..g.oh {
                    for ow in 0..g.ow {
                        dxp[g.argmax(xp, oh, ow).0] += dyp[oh * g.ow + ow];
                    }
                }
            });
    }
    Tensor::new(x.shape(), dx)
}

/// The divisor of every average-pooling window. With `count_include_pad`
/// and floor-mode output sizes no window reaches past the padding, so every
/// window counts `kernel^2` positions, as in PyTorch.
fn avg_divisor(p: PoolParams) -> f32 {
    (p.kernel * p.kernel) as f32
}

/// Average pooling (padded zeros counted in the divisor).
pub(super) fn avg_pool2d(x: &Tensor, p: PoolParams) -> Result<Tensor> {
    let g = Geom::new(x.shape(), p)?;
    let div = avg_divisor(p);
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
                yp[oh * g.ow + ow] = s / div;
            }
        }
    });
    Tensor::new(&g.out_shape(), y)
}

/// Gradient of [`avg_pool2d`] for an input of shape `x_shape`.
pub(super) fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], p: PoolParams) -> Result<Tensor> {
    let g = Geom::new(x_shape, p)?;
    expect_shape("dy", dy, &g.out_shape())?;
    let div = avg_divisor(p);
    let mut dx = vec![0.0f32; g.n * g.c * g.h * g.w];
    per_plane(dy.data(), g.oh * g.ow, &mut dx, g.h * g.w, |dyp, dxp| {
        for oh in 0..g.oh {
            let (h0, h1) = g.window(oh, g.h);
            for ow in 0..g.ow {
                let (w0, w1) = g.window(ow, g.w);
                let share = dyp[oh * g.ow + ow] / div;
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
