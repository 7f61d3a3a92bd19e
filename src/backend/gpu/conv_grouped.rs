//! Host side of `kernels/conv_grouped.cu`: grouped and dilated convolution
//! (depthwise included) forward with conv.cu's epilogue, backward-data with
//! the optional ReLU mask, and backward-filter in ordered chunks. conv.rs
//! and ops.rs send every convolution that is not dense and undilated here.

use super::conv::{check_extents, Geom};
use super::{arg, Driver, GpuBackend, GpuBuf};
use crate::error::{Error, Result};

/// Argument struct of the grouped kernels (C twin `GConvArgs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GConvArgs {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    k: i32,
    r: i32,
    s: i32,
    p: i32,
    q: i32,
    stride: i32,
    pad: i32,
    dil: i32,
    cpg: i32,
    kpg: i32,
    flags: i32,
    chunk: i32,
}

const GCONV_BIAS: i32 = 1;
const GCONV_RELU: i32 = 2;
const GCONV_RESIDUAL: i32 = 4;
const GCONV_DY_MASK: i32 = 8;

/// Filter floats the kernels stage in shared memory (`GCONV_SMEM`).
const GCONV_SMEM: usize = 4096;

/// The wgrad kernel's block size (its `block_sum<256>`).
const WGRAD_THREADS: u32 = 256;

/// Positions the wgrad blocks of one filter value share at least: below
/// this a chunk's block would mostly wait on its own reduction.
const WGRAD_MIN_CHUNK: usize = 4096;

/// Blocks a wgrad launch aims for (a few waves of a large GPU).
const WGRAD_TARGET_BLOCKS: usize = 1024;

fn args(g: &Geom) -> Result<GConvArgs> {
    let taps = g.kh * g.kw;
    if taps > GCONV_SMEM {
        return Err(Error::Backend(format!(
            "grouped conv2d: a {}x{} filter has more than the {GCONV_SMEM} taps the GPU kernels stage",
            g.kh, g.kw
        )));
    }
    check_extents(
        "grouped conv2d",
        &[
            g.n * g.c * g.h * g.w,
            g.n * g.o * g.oh * g.ow,
            g.o * g.c_per_group() * taps,
        ],
    )?;
    Ok(GConvArgs {
        n: g.n as i32,
        c: g.c as i32,
        h: g.h as i32,
        w: g.w as i32,
        k: g.o as i32,
        r: g.kh as i32,
        s: g.kw as i32,
        p: g.oh as i32,
        q: g.ow as i32,
        stride: g.stride as i32,
        pad: g.pad as i32,
        dil: g.dilation as i32,
        cpg: g.c_per_group() as i32,
        kpg: g.o_per_group() as i32,
        flags: 0,
        chunk: 0,
    })
}

/// Grid and block of a plane-per-block launch: `planes` planes of `len`
/// values each, blocks no wider than the plane (down to 64 threads) so
/// small late-layer planes do not leave most threads idle.
fn plane_launch(planes: usize, len: usize) -> Result<([u32; 3], [u32; 3])> {
    let threads = if len <= 64 {
        64
    } else if len <= 128 {
        128
    } else {
        256
    };
    let tiles = len.div_ceil(threads);
    if tiles > 65535 {
        return Err(Error::Backend(format!(
            "grouped conv2d: a plane of {len} values is too large for the GPU kernels"
        )));
    }
    Ok(([planes as u32, tiles as u32, 1], [threads as u32, 1, 1]))
}

/// `(splits, chunk)` of the N*P*Q axis of a wgrad with `values` filter
/// values: depends on the shape only, so the sum order is the same on every
/// device.
fn wgrad_chunks(values: usize, total: usize) -> (usize, usize) {
    let want = WGRAD_TARGET_BLOCKS.div_ceil(values.max(1));
    let by_len = total.div_ceil(WGRAD_MIN_CHUNK).max(1);
    let splits = want.min(by_len).max(1);
    let chunk = total.div_ceil(splits).max(1);
    (total.div_ceil(chunk).max(1), chunk)
}

impl<D: Driver> GpuBackend<D> {
    /// Grouped forward: `y = relu?(conv(x, w) + bias + residual)`, shapes
    /// already checked by the caller.
    pub(super) fn gconv_forward(
        &self,
        g: &Geom,
        x: &GpuBuf<D>,
        w: &GpuBuf<D>,
        bias: Option<&GpuBuf<D>>,
        residual: Option<&GpuBuf<D>>,
        relu: bool,
    ) -> Result<GpuBuf<D>> {
        let mut a = args(g)?;
        a.flags = if bias.is_some() { GCONV_BIAS } else { 0 }
            | if residual.is_some() {
                GCONV_RESIDUAL
            } else {
                0
            }
            | if relu { GCONV_RELU } else { 0 };
        let y = self.alloc(&g.out_shape())?;
        let (grid, block) = plane_launch(g.n * g.o, g.oh * g.ow)?;
        let ptrs = [
            x.ptr(),
            w.ptr(),
            bias.map_or(0, |b| b.ptr()),
            residual.map_or(0, |r| r.ptr()),
            y.ptr(),
        ];
        let mut list = vec![arg(&a)];
        list.extend(ptrs.iter().map(arg));
        self.launch("gconv_fwd", y.len(), grid, block, &mut list)?;
        Ok(y)
    }

    /// Grouped input gradient, `dy` masked by `relu_y > 0` when given;
    /// shapes already checked by the caller.
    pub(super) fn gconv_dgrad(
        &self,
        g: &Geom,
        dy: &GpuBuf<D>,
        w: &GpuBuf<D>,
        relu_y: Option<&GpuBuf<D>>,
    ) -> Result<GpuBuf<D>> {
        let mut a = args(g)?;
        a.flags = if relu_y.is_some() { GCONV_DY_MASK } else { 0 };
        let dx = self.alloc(&[g.n, g.c, g.h, g.w])?;
        let (grid, block) = plane_launch(g.n * g.c, g.h * g.w)?;
        let ptrs = [dy.ptr(), w.ptr(), relu_y.map_or(0, |y| y.ptr()), dx.ptr()];
        let mut list = vec![arg(&a)];
        list.extend(ptrs.iter().map(arg));
        self.launch("gconv_dgrad", dx.len(), grid, block, &mut list)?;
        Ok(dx)
    }

    /// Grouped filter gradient `[O, C/groups, KH, KW]`: chunk sums, then
    /// their ordered sum.
    pub(super) fn gconv_wgrad(&self, g: &Geom, x: &GpuBuf<D>, dy: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        let mut a = args(g)?;
        let values = g.o * g.c_per_group() * g.kh * g.kw;
        let total = g.n * g.oh * g.ow;
        let (splits, chunk) = wgrad_chunks(values, total);
        a.chunk = chunk as i32;
        let dw = self.alloc(&[g.o, g.c_per_group(), g.kh, g.kw])?;
        if total == 0 {
            if dw.mem.bytes > 0 {
                self.drv.memset_zero(dw.ptr(), dw.mem.bytes)?;
            }
            return Ok(dw);
        }
        let grid = [values as u32, splits as u32, 1];
        let block = [WGRAD_THREADS, 1, 1];
        if splits == 1 {
            let (px, pdy, pdw) = (x.ptr(), dy.ptr(), dw.ptr());
            self.launch(
                "gconv_wgrad",
                values,
                grid,
                block,
                &mut [arg(&a), arg(&px), arg(&pdy), arg(&pdw)],
            )?;
            return Ok(dw);
        }
        let partial = self.alloc(&[splits, values])?;
        let (px, pdy, pp) = (x.ptr(), dy.ptr(), partial.ptr());
        self.launch(
            "gconv_wgrad",
            values,
            grid,
            block,
            &mut [arg(&a), arg(&px), arg(&pdy), arg(&pp)],
        )?;
        #[repr(C)]
        struct ReduceArgs {
            total: i32,
            splits: i32,
        }
        let r = ReduceArgs {
            total: values as i32,
            splits: splits as i32,
        };
        let out = dw.ptr();
        self.launch_flat(
            "conv_wgrad_reduce",
            values,
            &mut [arg(&r), arg(&pp), arg(&out)],
        )?;
        Ok(dw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgrad_chunks_cover_every_position_exactly_once() {
        for &(values, total) in &[
            (1usize, 1usize),
            (9, 100),
            (144, 256 * 112 * 112),
            (32 * 9, 7),
            (4096, 1 << 20),
        ] {
            let (splits, chunk) = wgrad_chunks(values, total);
            assert!(splits >= 1 && chunk >= 1);
            assert!(splits * chunk >= total, "{values} {total}");
            assert!((splits - 1) * chunk < total, "every chunk has work");
        }
    }
}
