//! Host side of activation.cu, scale.cu and layout.cu: the activations,
//! `mul`, `affine`, `concat` and `pad2d` with their gradients. Shapes are
//! checked by the same functions as on the CPU (`backend::shape_ops`).

use super::conv::expect_shape;
use super::{arg, Driver, GpuBackend, GpuBuf};
use crate::backend::check::channel_dims;
use crate::backend::shape_ops::{
    affine_params, concat_dims, crop_shape, mul_dims, pad_out_shape, Pad2d,
};
use crate::backend::{Activation, Backend};
use crate::error::{Error, Result};

/// `ActArgs` of activation.cu.
#[repr(C)]
struct ActArgs {
    n: i32,
    kind: i32,
    p: f32,
    q: f32,
}

/// `ScaleArgs` of scale.cu.
#[repr(C)]
struct ScaleArgs {
    n: i32,
    c: i32,
    hw: i32,
    pad_: i32,
}

/// `ChanCopyArgs` of layout.cu.
#[repr(C)]
struct ChanCopyArgs {
    n: i32,
    count: i32,
    plane: i32,
    src_c: i32,
    src_off: i32,
    dst_c: i32,
    dst_off: i32,
    pad_: i32,
}

/// `PadArgs` of layout.cu.
#[repr(C)]
struct PadArgs {
    planes: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    top: i32,
    left: i32,
    pad_: i32,
}

impl<D: Driver> GpuBackend<D> {
    /// `act(x)` (`dy` absent) or `dy * act'(x)`.
    pub(super) fn act_op(
        &self,
        x: &GpuBuf<D>,
        dy: Option<&GpuBuf<D>>,
        act: Activation,
    ) -> Result<GpuBuf<D>> {
        act.check()?;
        let (kind, p, q) = act.kernel_args();
        let a = ActArgs {
            n: x.len() as i32,
            kind,
            p,
            q,
        };
        let out = self.alloc(x.shape())?;
        let (px, po) = (x.ptr(), out.ptr());
        match dy {
            None => self.launch_flat("act_forward", x.len(), &mut [arg(&a), arg(&px), arg(&po)])?,
            Some(dy) => {
                expect_shape("x", x, dy.shape())?;
                let pdy = dy.ptr();
                self.launch_flat(
                    "act_backward",
                    x.len(),
                    &mut [arg(&a), arg(&pdy), arg(&px), arg(&po)],
                )?
            }
        }
        Ok(out)
    }

    /// `a[i] * b[i / hw]` over `a`'s shape.
    fn mul_kernel(&self, a: &GpuBuf<D>, b: &GpuBuf<D>, hw: usize) -> Result<GpuBuf<D>> {
        let out = self.alloc(a.shape())?;
        let s = ScaleArgs {
            n: a.len() as i32,
            c: 0,
            hw: hw as i32,
            pad_: 0,
        };
        let (pa, pb, po) = (a.ptr(), b.ptr(), out.ptr());
        self.launch_flat(
            "scale_mul",
            a.len(),
            &mut [arg(&s), arg(&pa), arg(&pb), arg(&po)],
        )?;
        Ok(out)
    }

    pub(super) fn mul_op(&self, a: &GpuBuf<D>, b: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        let (_, hw) = mul_dims(a.shape(), b.shape())?;
        self.mul_kernel(a, b, hw)
    }

    pub(super) fn mul_backward_op(
        &self,
        dy: &GpuBuf<D>,
        a: &GpuBuf<D>,
        b: &GpuBuf<D>,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>)> {
        let (n, hw) = mul_dims(a.shape(), b.shape())?;
        expect_shape("dy", dy, a.shape())?;
        let da = self.mul_kernel(dy, b, hw)?;
        if hw == 1 {
            let db = self.mul_kernel(dy, a, 1)?;
            return Ok((da, self.reshape_to(db, b.shape())));
        }
        if hw == 0 {
            return Ok((da, self.zeros(b.shape())?));
        }
        let db = self.alloc(b.shape())?;
        let s = ScaleArgs {
            n: n as i32,
            c: 0,
            hw: hw as i32,
            pad_: 0,
        };
        let planes = b.len();
        let (pdy, pa, pdb) = (dy.ptr(), a.ptr(), db.ptr());
        self.launch(
            "scale_mul_grad_b",
            planes,
            [planes.div_ceil(8) as u32, 1, 1],
            [256, 1, 1],
            &mut [arg(&s), arg(&pdy), arg(&pa), arg(&pdb)],
        )?;
        Ok((da, db))
    }

    /// The same memory under `b`'s shape (equal element counts).
    fn reshape_to(&self, x: GpuBuf<D>, shape: &[usize]) -> GpuBuf<D> {
        GpuBuf {
            mem: x.mem,
            shape: shape.to_vec(),
        }
    }

    /// `x * scale[c] + shift[c]` (with `shift`) or `dy * scale[c]`.
    pub(super) fn affine_op(
        &self,
        x: &GpuBuf<D>,
        scale: &[f32],
        shift: Option<&[f32]>,
    ) -> Result<GpuBuf<D>> {
        let name = if shift.is_some() { "x" } else { "dy" };
        let (_, c, plane) = channel_dims(name, x.shape())?;
        let (mut ss, b) = affine_params(scale, shift.unwrap_or(&[0.0]), c)?;
        ss.extend(b);
        let out = self.alloc(x.shape())?;
        if x.is_empty() {
            return Ok(out);
        }
        let ss = self.upload_raw(&ss)?;
        let s = ScaleArgs {
            n: x.len() as i32,
            c: c as i32,
            hw: plane as i32,
            pad_: 0,
        };
        let kernel = if shift.is_some() {
            "scale_affine"
        } else {
            "scale_affine_backward"
        };
        let (px, ps, po) = (x.ptr(), ss.ptr(), out.ptr());
        self.launch_flat(
            kernel,
            x.len(),
            &mut [arg(&s), arg(&px), arg(&ps), arg(&po)],
        )?;
        Ok(out)
    }

    /// Copies `count` channels from `src` (channel `src_off` of `src_c`)
    /// to `dst` (channel `dst_off` of `dst_c`), `n` images of `plane` values.
    #[allow(clippy::too_many_arguments)]
    fn copy_channels(
        &self,
        src: &GpuBuf<D>,
        dst: &GpuBuf<D>,
        n: usize,
        plane: usize,
        count: usize,
        (src_c, src_off): (usize, usize),
        (dst_c, dst_off): (usize, usize),
    ) -> Result<()> {
        let a = ChanCopyArgs {
            n: n as i32,
            count: count as i32,
            plane: plane as i32,
            src_c: src_c as i32,
            src_off: src_off as i32,
            dst_c: dst_c as i32,
            dst_off: dst_off as i32,
            pad_: 0,
        };
        let (ps, pd) = (src.ptr(), dst.ptr());
        self.launch_flat(
            "layout_copy_channels",
            n * count * plane,
            &mut [arg(&a), arg(&ps), arg(&pd)],
        )
    }

    pub(super) fn concat_op(&self, xs: &[&GpuBuf<D>]) -> Result<GpuBuf<D>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape()).collect();
        let (n, plane, cs) = concat_dims(&shapes)?;
        let total: usize = cs.iter().sum();
        let mut shape = xs[0].shape().to_vec();
        shape[1] = total;
        let out = self.alloc(&shape)?;
        let mut at = 0;
        for (x, &c) in xs.iter().zip(&cs) {
            self.copy_channels(x, &out, n, plane, c, (c, 0), (total, at))?;
            at += c;
        }
        Ok(out)
    }

    pub(super) fn concat_backward_op(
        &self,
        dy: &GpuBuf<D>,
        channels: &[usize],
    ) -> Result<Vec<GpuBuf<D>>> {
        let s = dy.shape();
        let total: usize = channels.iter().sum();
        if s.len() < 2 || s[1] != total || channels.len() < 2 {
            return Err(Error::tensor(
                "dy",
                format!("concat_backward: shape {s:?} cannot split into {channels:?} channels"),
            ));
        }
        let plane: usize = s[2..].iter().product();
        let mut at = 0;
        let mut parts = Vec::with_capacity(channels.len());
        for &c in channels {
            let mut shape = s.to_vec();
            shape[1] = c;
            let part = self.alloc(&shape)?;
            self.copy_channels(dy, &part, s[0], plane, c, (total, at), (c, 0))?;
            parts.push(part);
            at += c;
        }
        Ok(parts)
    }

    fn pad_args(&self, x_shape: [usize; 4], p: Pad2d) -> PadArgs {
        let [n, c, h, w] = x_shape;
        let (oh, ow) = p.out_hw(h, w);
        PadArgs {
            planes: (n * c) as i32,
            h: h as i32,
            w: w as i32,
            oh: oh as i32,
            ow: ow as i32,
            top: p.top as i32,
            left: p.left as i32,
            pad_: 0,
        }
    }

    pub(super) fn pad_op(&self, x: &GpuBuf<D>, p: Pad2d) -> Result<GpuBuf<D>> {
        let out_shape = pad_out_shape(x.shape(), p)?;
        let y = self.alloc(&out_shape)?;
        let s = x.shape();
        let a = self.pad_args([s[0], s[1], s[2], s[3]], p);
        let (px, py) = (x.ptr(), y.ptr());
        self.launch_flat("layout_pad", y.len(), &mut [arg(&a), arg(&px), arg(&py)])?;
        Ok(y)
    }

    pub(super) fn crop_op(&self, dy: &GpuBuf<D>, p: Pad2d) -> Result<GpuBuf<D>> {
        let x_shape = crop_shape(dy.shape(), p)?;
        let dx = self.alloc(&x_shape)?;
        let a = self.pad_args(x_shape, p);
        let (pdy, pdx) = (dy.ptr(), dx.ptr());
        self.launch_flat(
            "layout_crop",
            dx.len(),
            &mut [arg(&a), arg(&pdy), arg(&pdx)],
        )?;
        Ok(dx)
    }
}
