//! [`GpuBackend`]'s [`Backend`] impl, and the host side of the
//! non-convolution kernels: elementwise.cu, norm.cu, pool.cu, loss.cu,
//! mask.cu and optim.cu (the convolution and linear ops drive conv.rs's
//! launchers). Each op has the one name the trait gives it. Shapes are
//! validated exactly as the CPU reference validates them, so both backends
//! refuse the same inputs.

use super::conv::{check_extents, expect_shape, linear_args, Geom};
use super::{arg, Driver, GpuBackend, GpuBuf, Recording};
use crate::backend::check::{channel_dims, dims2, dims4, pattern_grad_dims, pgd_radius, PoolGeom};
use crate::backend::{Activation, Backend, BnSaved, ConvParams, Pad2d, PoolParams, SgdParams};
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};

/// `EwArgs` of elementwise.cu.
#[repr(C)]
struct EwArgs {
    n: i32,
    c: i32,
    hw: i32,
    pad_: i32,
}

/// `BnArgs` of norm.cu.
#[repr(C)]
struct BnArgs {
    n: i32,
    c: i32,
    plane: i32,
    eps: f32,
    momentum: f32,
    pad_: i32,
}

/// `PoolArgs` of pool.cu.
#[repr(C)]
struct PoolArgs {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    k: i32,
    stride: i32,
    pad: i32,
    /// Average pooling divides by the window clipped to the padded input
    /// (1) or to the input (0).
    count_pad: i32,
}

/// `MaskArgs` of mask.cu.
#[repr(C)]
#[derive(Default)]
struct MaskArgs {
    s: i32,
    b: i32,
    c: i32,
    hw: i32,
    l1_grad: f32,
    n: i32,
    lr: f64,
}

/// `OptimArgs` of optim.cu.
#[repr(C)]
#[derive(Default)]
struct OptimArgs {
    n: i32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    eps: f32,
    pad_: i32,
}

fn pool_args(g: PoolGeom) -> PoolArgs {
    PoolArgs {
        n: g.n as i32,
        c: g.c as i32,
        h: g.h as i32,
        w: g.w as i32,
        oh: g.oh as i32,
        ow: g.ow as i32,
        k: g.p.kernel as i32,
        stride: g.p.stride as i32,
        pad: g.p.pad as i32,
        count_pad: g.p.count_include_pad as i32,
    }
}

/// `(S, B, C, H*W)` of a search's canvas and other images.
fn search_dims<D: Driver>(
    canvas: &GpuBuf<D>,
    others: &GpuBuf<D>,
) -> Result<(usize, usize, usize, usize)> {
    let [s, c, h, w] = dims4("canvas", canvas.shape())?;
    let [n, oc, oh, ow] = dims4("others", others.shape())?;
    if s == 0 {
        return Err(Error::tensor("canvas", "no searches (S = 0)"));
    }
    if (oc, oh, ow) != (c, h, w) || n % s != 0 {
        let b = (n / s).max(1);
        return Err(Error::shape("others", &[s * b, c, h, w], others.shape()));
    }
    Ok((s, n / s, c, h * w))
}

fn check_channel_stat(name: &str, v: &[f32], c: usize, divisor: bool) -> Result<()> {
    if v.len() != c {
        return Err(Error::shape(name, &[c], &[v.len()]));
    }
    if divisor && v.contains(&0.0) {
        return Err(Error::tensor(name, "a standard deviation is zero"));
    }
    Ok(())
}

impl<D: Driver> GpuBackend<D> {
    /// `out = f(a, b)` elementwise (`b` absent: `f(a, a)`), through one of
    /// elementwise.cu's float4 kernels.
    pub(super) fn map2(
        &self,
        kernel: &str,
        a: &GpuBuf<D>,
        b: Option<(&str, &GpuBuf<D>)>,
    ) -> Result<GpuBuf<D>> {
        if let Some((name, b)) = b {
            expect_shape(name, b, a.shape())?;
        }
        let out = self.alloc(a.shape())?;
        let n = a.len();
        let e = EwArgs {
            n: n as i32,
            c: 0,
            hw: 0,
            pad_: 0,
        };
        let (pa, pb, po) = (a.ptr(), b.map_or(a.ptr(), |b| b.1.ptr()), out.ptr());
        let mut args = if b.is_some() {
            vec![arg(&e), arg(&pa), arg(&pb), arg(&po)]
        } else {
            vec![arg(&e), arg(&pa), arg(&po)]
        };
        self.launch_flat(kernel, n.div_ceil(4), &mut args)?;
        Ok(out)
    }

    /// `(x - mean[c]) / std[c]` (with `mean`), or `dy / std[c]` (without).
    pub(super) fn normalize_op(
        &self,
        x: &GpuBuf<D>,
        mean: Option<&[f32]>,
        std: &[f32],
    ) -> Result<GpuBuf<D>> {
        let name = if mean.is_some() { "x" } else { "dy" };
        let (_, c, plane) = channel_dims(name, x.shape())?;
        if let Some(m) = mean {
            check_channel_stat("mean", m, c, false)?;
        }
        check_channel_stat("std", std, c, true)?;
        let mut stats = mean.map_or_else(|| vec![0.0; c], |m| m.to_vec());
        stats.extend_from_slice(std);
        let stats = self.upload_raw(&stats)?;
        let out = self.alloc(x.shape())?;
        let e = EwArgs {
            n: x.len() as i32,
            c: c as i32,
            hw: plane as i32,
            pad_: 0,
        };
        let (px, ps, po) = (x.ptr(), stats.ptr(), out.ptr());
        let kernel = if mean.is_some() {
            "ew_normalize"
        } else {
            "ew_normalize_backward"
        };
        self.launch_flat(
            kernel,
            x.len(),
            &mut [arg(&e), arg(&px), arg(&ps), arg(&po)],
        )?;
        Ok(out)
    }

    /// Max or average pooling forward.
    pub(super) fn pool_forward(
        &self,
        kernel: &str,
        x: &GpuBuf<D>,
        p: PoolParams,
    ) -> Result<GpuBuf<D>> {
        let g = PoolGeom::new(x.shape(), p)?;
        let y = self.alloc(&g.out_shape())?;
        let a = pool_args(g);
        let (px, py) = (x.ptr(), y.ptr());
        self.launch_flat(kernel, y.len(), &mut [arg(&a), arg(&px), arg(&py)])?;
        Ok(y)
    }
}

fn bn_args(n: usize, c: usize, plane: usize, eps: f32, momentum: f32) -> BnArgs {
    BnArgs {
        n: n as i32,
        c: c as i32,
        plane: plane as i32,
        eps,
        momentum,
        pad_: 0,
    }
}

/// A step cursor is one entry.
fn check_cursor<D: Driver>(cursor: &GpuBuf<D>) -> Result<()> {
    if cursor.len() != 1 {
        return Err(Error::tensor(
            "step cursor",
            format!("has {} entries, not 1", cursor.len()),
        ));
    }
    Ok(())
}

impl<D: Driver> Backend for GpuBackend<D> {
    type Buf = GpuBuf<D>;
    type Index = GpuBuf<D>;
    type Recording = Recording<D>;

    fn name(&self) -> String {
        self.drv.name()
    }

    fn numerics(&self) -> String {
        format!("{} {}", self.drv.arch(), self.precision)
    }

    fn upload(&self, t: &Tensor) -> Result<GpuBuf<D>> {
        let b = self.alloc(t.shape())?;
        if !t.is_empty() {
            self.drv.htod(b.ptr(), bytemuck::cast_slice(t.data()))?;
        }
        Ok(b)
    }

    fn download(&self, b: &GpuBuf<D>) -> Result<Tensor> {
        let mut v = vec![0f32; b.len()];
        if !v.is_empty() {
            self.drv.dtoh(b.ptr(), bytemuck::cast_slice_mut(&mut v))?;
        }
        Tensor::new(&b.shape, v)
    }

    fn upload_index(&self, v: &[u32]) -> Result<GpuBuf<D>> {
        if let Some(&big) = v.iter().find(|&&i| i > i32::MAX as u32) {
            return Err(Error::tensor(
                "index",
                format!("{big} is beyond the kernels' 32-bit signed indices"),
            ));
        }
        let mut b = self.upload_raw(v)?;
        b.shape = vec![v.len()];
        Ok(b)
    }

    fn gather_rows(
        &self,
        src: &GpuBuf<D>,
        index: &GpuBuf<D>,
        cursor: &GpuBuf<D>,
        n: usize,
    ) -> Result<GpuBuf<D>> {
        let (rows, row_len) = crate::backend::check::gather_source(&src.shape)?;
        check_cursor(cursor)?;
        let mut shape = src.shape.clone();
        shape[0] = n;
        let out = self.alloc(&shape)?;
        #[repr(C)]
        struct GatherArgs {
            n: i32,
            row_len: i32,
            src_rows: i32,
            entries: i32,
        }
        let a = GatherArgs {
            n: n as i32,
            row_len: row_len as i32,
            src_rows: rows as i32,
            entries: index.len() as i32,
        };
        let p = [src.ptr(), index.ptr(), cursor.ptr(), out.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("rows_gather", out.len(), &mut args)?;
        Ok(out)
    }

    fn write_row(&self, dst: &mut GpuBuf<D>, cursor: &GpuBuf<D>, src: &GpuBuf<D>) -> Result<()> {
        let rows = crate::backend::check::row_count(&dst.shape, src.len())?;
        check_cursor(cursor)?;
        self.make_unique(dst)?;
        #[repr(C)]
        struct WriteArgs {
            n: i32,
            rows: i32,
        }
        let a = WriteArgs {
            n: src.len() as i32,
            rows: rows as i32,
        };
        let p = [cursor.ptr(), src.ptr(), dst.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("rows_write", src.len(), &mut args)
    }

    fn count_nonfinite(
        &self,
        x: &GpuBuf<D>,
        counts: &mut GpuBuf<D>,
        cursor: &GpuBuf<D>,
        slot: usize,
    ) -> Result<()> {
        let width = crate::backend::check::counts_width(&counts.shape, slot)?;
        check_cursor(cursor)?;
        self.make_unique(counts)?;
        #[repr(C)]
        struct CountArgs {
            n: i32,
            width: i32,
            rows: i32,
            slot: i32,
        }
        let a = CountArgs {
            n: x.len() as i32,
            width: width as i32,
            rows: counts.shape[0] as i32,
            slot: slot as i32,
        };
        let p = [x.ptr(), cursor.ptr(), counts.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        // Launched even for an empty x: it adds the zero the CPU adds.
        self.launch("rows_count_nonfinite", 1, [1, 1, 1], [256, 1, 1], &mut args)
    }

    fn advance_cursor(&self, cursor: &mut GpuBuf<D>) -> Result<()> {
        check_cursor(cursor)?;
        self.make_unique(cursor)?;
        let a: i32 = 0;
        let p = cursor.ptr();
        self.launch(
            "rows_next",
            1,
            [1, 1, 1],
            [32, 1, 1],
            &mut [arg(&a), arg(&p)],
        )
    }

    fn record(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Recording<D>>> {
        self.drv.begin_capture()?;
        let ran = f();
        let graph = self.drv.end_capture().map(|graph| Recording {
            graph,
            drv: self.drv.clone(),
        });
        // A graph of a failed `f` is destroyed as it drops here.
        ran?;
        let graph = graph?;
        // Nothing recorded has run yet.
        self.replay(&graph)?;
        Ok(Some(graph))
    }

    fn replay(&self, r: &Recording<D>) -> Result<()> {
        self.drv.launch_graph(r.graph)
    }

    fn shape<'a>(&self, b: &'a GpuBuf<D>) -> &'a [usize] {
        &b.shape
    }

    fn zeros(&self, shape: &[usize]) -> Result<GpuBuf<D>> {
        let b = self.alloc(shape)?;
        if b.mem.bytes > 0 {
            self.drv.memset_zero(b.ptr(), b.mem.bytes)?;
        }
        Ok(b)
    }

    fn reshape(&self, x: &GpuBuf<D>, shape: &[usize]) -> Result<GpuBuf<D>> {
        if numel(shape) != x.len() {
            return Err(Error::Msg(format!(
                "reshape: cannot view {:?} ({} values) as {shape:?} ({} values)",
                x.shape,
                x.len(),
                numel(shape)
            )));
        }
        Ok(GpuBuf {
            mem: x.mem.clone(),
            shape: shape.to_vec(),
        })
    }

    fn conv2d(
        &self,
        x: &GpuBuf<D>,
        w: &GpuBuf<D>,
        bias: Option<&GpuBuf<D>>,
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        self.conv_forward(x, w, bias, None, false, p)
    }

    fn conv2d_fused(
        &self,
        x: &GpuBuf<D>,
        w: &GpuBuf<D>,
        bias: Option<&GpuBuf<D>>,
        residual: Option<&GpuBuf<D>>,
        relu: bool,
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        self.conv_forward(x, w, bias, residual, relu, p)
    }

    fn conv2d_fused_backward_data(
        &self,
        dy: &GpuBuf<D>,
        w: &GpuBuf<D>,
        relu_y: Option<&GpuBuf<D>>,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        self.conv_dgrad(dy, w, relu_y, x_shape, p)
    }

    fn fold_bn(
        &self,
        w: &GpuBuf<D>,
        b: Option<&GpuBuf<D>>,
        gamma: &GpuBuf<D>,
        beta: &GpuBuf<D>,
        mean: &GpuBuf<D>,
        var: &GpuBuf<D>,
        eps: f32,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>)> {
        self.fold_bn_kernel(w, b, gamma, beta, mean, var, eps)
    }

    fn conv2d_backward_data(
        &self,
        dy: &GpuBuf<D>,
        w: &GpuBuf<D>,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        self.conv_dgrad(dy, w, None, x_shape, p)
    }

    /// Filter gradient (and bias gradient) of a convolution.
    fn conv2d_backward_filter(
        &self,
        x: &GpuBuf<D>,
        dy: &GpuBuf<D>,
        w_shape: &[usize],
        p: ConvParams,
        with_bias: bool,
    ) -> Result<(GpuBuf<D>, Option<GpuBuf<D>>)> {
        let g = Geom::new(x.shape(), w_shape, p)?;
        expect_shape("dy", dy, &g.out_shape())?;
        let dw = if g.is_dense() {
            let mut a = g.args();
            let gk = g.n * g.oh * g.ow;
            check_extents("conv2d_backward_filter", &[gk])?;
            a.gm = g.o as i32;
            a.gn = (g.c * g.kh * g.kw) as i32;
            a.gk = gk as i32;
            self.wgrad_gemm(&mut a, x.ptr(), dy.ptr(), w_shape)?
        } else {
            self.gconv_wgrad(&g, x, dy)?
        };
        let db = if with_bias {
            Some(self.bias_grad(dy, g.n, g.o, g.oh * g.ow)?)
        } else {
            None
        };
        Ok((dw, db))
    }

    fn batch_norm_eval(
        &self,
        x: &GpuBuf<D>,
        gamma: &GpuBuf<D>,
        beta: &GpuBuf<D>,
        mean: &GpuBuf<D>,
        var: &GpuBuf<D>,
        eps: f32,
    ) -> Result<GpuBuf<D>> {
        let (n, c, plane) = channel_dims("x", x.shape())?;
        for (name, t) in [
            ("gamma", gamma),
            ("beta", beta),
            ("mean", mean),
            ("var", var),
        ] {
            expect_shape(name, t, &[c])?;
        }
        let y = self.alloc(x.shape())?;
        let a = bn_args(n, c, plane, eps, 0.0);
        let p = [
            x.ptr(),
            gamma.ptr(),
            beta.ptr(),
            mean.ptr(),
            var.ptr(),
            y.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("bn_eval", x.len(), &mut args)?;
        Ok(y)
    }

    fn batch_norm_eval_backward(
        &self,
        dy: &GpuBuf<D>,
        gamma: &GpuBuf<D>,
        var: &GpuBuf<D>,
        eps: f32,
    ) -> Result<GpuBuf<D>> {
        let (n, c, plane) = channel_dims("dy", dy.shape())?;
        expect_shape("gamma", gamma, &[c])?;
        expect_shape("var", var, &[c])?;
        let dx = self.alloc(dy.shape())?;
        let a = bn_args(n, c, plane, eps, 0.0);
        let p = [dy.ptr(), gamma.ptr(), var.ptr(), dx.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("bn_eval_backward", dy.len(), &mut args)?;
        Ok(dx)
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train(
        &self,
        x: &GpuBuf<D>,
        gamma: &GpuBuf<D>,
        beta: &GpuBuf<D>,
        running_mean: &mut GpuBuf<D>,
        running_var: &mut GpuBuf<D>,
        momentum: f32,
        eps: f32,
    ) -> Result<(GpuBuf<D>, BnSaved<GpuBuf<D>>)> {
        let (n, c, plane) = channel_dims("x", x.shape())?;
        expect_shape("gamma", gamma, &[c])?;
        expect_shape("beta", beta, &[c])?;
        expect_shape("running_mean", running_mean, &[c])?;
        expect_shape("running_var", running_var, &[c])?;
        if n * plane < 2 {
            return Err(Error::Msg(format!(
                "batch_norm_train: needs more than one value per channel, got input shape {:?}",
                x.shape()
            )));
        }
        self.make_unique(running_mean)?;
        self.make_unique(running_var)?;
        let mean = self.alloc(&[c])?;
        let invstd = self.alloc(&[c])?;
        let a = bn_args(n, c, plane, eps, momentum);
        let p = [
            x.ptr(),
            running_mean.ptr(),
            running_var.ptr(),
            mean.ptr(),
            invstd.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch(
            "bn_train_stats",
            c,
            [c as u32, 1, 1],
            [256, 1, 1],
            &mut args,
        )?;
        let y = self.alloc(x.shape())?;
        let p = [
            x.ptr(),
            mean.ptr(),
            invstd.ptr(),
            gamma.ptr(),
            beta.ptr(),
            y.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("bn_train_apply", x.len(), &mut args)?;
        Ok((y, BnSaved { mean, invstd }))
    }

    fn batch_norm_train_backward(
        &self,
        dy: &GpuBuf<D>,
        x: &GpuBuf<D>,
        gamma: &GpuBuf<D>,
        saved: &BnSaved<GpuBuf<D>>,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>, GpuBuf<D>)> {
        let (n, c, plane) = channel_dims("x", x.shape())?;
        expect_shape("dy", dy, x.shape())?;
        expect_shape("gamma", gamma, &[c])?;
        expect_shape("saved mean", &saved.mean, &[c])?;
        expect_shape("saved invstd", &saved.invstd, &[c])?;
        let dgamma = self.alloc(&[c])?;
        let dbeta = self.alloc(&[c])?;
        let scratch = self.alloc(&[2 * c])?;
        let a = bn_args(n, c, plane, 0.0, 0.0);
        let p = [
            dy.ptr(),
            x.ptr(),
            saved.mean.ptr(),
            saved.invstd.ptr(),
            dgamma.ptr(),
            dbeta.ptr(),
            scratch.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch(
            "bn_train_backward_reduce",
            c,
            [c as u32, 1, 1],
            [256, 1, 1],
            &mut args,
        )?;
        let dx = self.alloc(x.shape())?;
        let p = [
            dy.ptr(),
            x.ptr(),
            saved.mean.ptr(),
            saved.invstd.ptr(),
            gamma.ptr(),
            scratch.ptr(),
            dx.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("bn_train_backward_apply", x.len(), &mut args)?;
        Ok((dx, dgamma, dbeta))
    }

    fn relu(&self, x: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        self.map2("ew_relu", x, None)
    }

    fn relu_backward(&self, dy: &GpuBuf<D>, y: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        self.map2("ew_relu_backward", dy, Some(("y", y)))
    }

    fn add(&self, a: &GpuBuf<D>, b: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        self.map2("ew_add", a, Some(("b", b)))
    }

    fn add_assign(&self, a: &mut GpuBuf<D>, b: &GpuBuf<D>) -> Result<()> {
        expect_shape("b", b, a.shape())?;
        self.make_unique(a)?;
        let n = a.len();
        let e = EwArgs {
            n: n as i32,
            c: 0,
            hw: 0,
            pad_: 0,
        };
        let (pa, pb) = (a.ptr(), b.ptr());
        self.launch_flat(
            "ew_add_assign",
            n.div_ceil(4),
            &mut [arg(&e), arg(&pa), arg(&pb)],
        )
    }

    fn max_pool2d(&self, x: &GpuBuf<D>, p: PoolParams) -> Result<GpuBuf<D>> {
        self.pool_forward("max_pool_fwd", x, p)
    }

    fn max_pool2d_backward(
        &self,
        x: &GpuBuf<D>,
        dy: &GpuBuf<D>,
        p: PoolParams,
    ) -> Result<GpuBuf<D>> {
        let g = PoolGeom::new(x.shape(), p)?;
        expect_shape("dy", dy, &g.out_shape())?;
        let dx = self.alloc(x.shape())?;
        let a = pool_args(g);
        let (px, pdy, pdx) = (x.ptr(), dy.ptr(), dx.ptr());
        self.launch_flat(
            "max_pool_bwd",
            dx.len(),
            &mut [arg(&a), arg(&px), arg(&pdy), arg(&pdx)],
        )?;
        Ok(dx)
    }

    fn avg_pool2d(&self, x: &GpuBuf<D>, p: PoolParams) -> Result<GpuBuf<D>> {
        self.pool_forward("avg_pool_fwd", x, p)
    }

    fn avg_pool2d_backward(
        &self,
        dy: &GpuBuf<D>,
        x_shape: &[usize],
        p: PoolParams,
    ) -> Result<GpuBuf<D>> {
        let g = PoolGeom::new(x_shape, p)?;
        expect_shape("dy", dy, &g.out_shape())?;
        let dx = self.alloc(x_shape)?;
        let a = pool_args(g);
        let (pdy, pdx) = (dy.ptr(), dx.ptr());
        self.launch_flat(
            "avg_pool_bwd",
            dx.len(),
            &mut [arg(&a), arg(&pdy), arg(&pdx)],
        )?;
        Ok(dx)
    }

    fn global_avg_pool(&self, x: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        let [n, c, h, w] = dims4("x", x.shape())?;
        if h * w == 0 {
            return Err(Error::tensor("x", "global_avg_pool of an empty plane"));
        }
        let y = self.alloc(&[n, c])?;
        let a = pool_args(PoolGeom {
            n,
            c,
            h,
            w,
            oh: 1,
            ow: 1,
            p: PoolParams::new(h, 1, 0),
        });
        let (px, py) = (x.ptr(), y.ptr());
        let planes = n * c;
        self.launch(
            "global_avg_fwd",
            planes,
            [planes.div_ceil(8) as u32, 1, 1],
            [256, 1, 1],
            &mut [arg(&a), arg(&px), arg(&py)],
        )?;
        Ok(y)
    }

    fn global_avg_pool_backward(&self, dy: &GpuBuf<D>, x_shape: &[usize]) -> Result<GpuBuf<D>> {
        let [n, c, h, w] = dims4("x", x_shape)?;
        if dims2("dy", dy.shape())? != [n, c] {
            return Err(Error::shape("dy", &[n, c], dy.shape()));
        }
        let dx = self.alloc(x_shape)?;
        let a = pool_args(PoolGeom {
            n,
            c,
            h,
            w,
            oh: 1,
            ow: 1,
            p: PoolParams::new(h.max(1), 1, 0),
        });
        let (pdy, pdx) = (dy.ptr(), dx.ptr());
        self.launch_flat(
            "global_avg_bwd",
            dx.len(),
            &mut [arg(&a), arg(&pdy), arg(&pdx)],
        )?;
        Ok(dx)
    }

    /// `x [N,K] * w[O,K]^T + bias`: the forward GEMM of a 1x1 convolution.
    fn linear(&self, x: &GpuBuf<D>, w: &GpuBuf<D>, bias: Option<&GpuBuf<D>>) -> Result<GpuBuf<D>> {
        let [n, k] = dims2("x", x.shape())?;
        let [o, wk] = dims2("w", w.shape())?;
        if wk != k {
            return Err(Error::shape("w", &[o, k], w.shape()));
        }
        if let Some(b) = bias {
            expect_shape("bias", b, &[o])?;
        }
        let y = self.alloc(&[n, o])?;
        let a = linear_args(n, k, o, bias.is_some());
        self.launch_fwd(
            &a,
            x.ptr(),
            w.ptr(),
            bias.map_or(0, |b| b.ptr()),
            0,
            y.ptr(),
        )?;
        Ok(y)
    }

    /// Input gradient of a linear layer: `dy [N,O] * w [O,K]`.
    fn linear_backward_data(&self, dy: &GpuBuf<D>, w: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        let [n, o] = dims2("dy", dy.shape())?;
        let [wo, k] = dims2("w", w.shape())?;
        if wo != o {
            return Err(Error::shape("w", &[o, k], w.shape()));
        }
        let dx = self.alloc(&[n, k])?;
        let mut a = linear_args(n, k, o, false);
        a.gm = k as i32;
        a.gn = n as i32;
        a.gk = o as i32;
        self.launch_dgrad(&a, dy.ptr(), w.ptr(), 0, dx.ptr())?;
        Ok(dx)
    }

    /// Weight (and bias) gradient of a linear layer.
    fn linear_backward_weight(
        &self,
        x: &GpuBuf<D>,
        dy: &GpuBuf<D>,
        with_bias: bool,
    ) -> Result<(GpuBuf<D>, Option<GpuBuf<D>>)> {
        let [n, k] = dims2("x", x.shape())?;
        let [dn, o] = dims2("dy", dy.shape())?;
        if dn != n {
            return Err(Error::shape("dy", &[n, o], dy.shape()));
        }
        let mut a = linear_args(n, k, o, false);
        a.gm = o as i32;
        a.gn = k as i32;
        a.gk = n as i32;
        let dw = self.wgrad_gemm(&mut a, x.ptr(), dy.ptr(), &[o, k])?;
        let db = if with_bias {
            Some(self.bias_grad(dy, n, o, 1)?)
        } else {
            None
        };
        Ok((dw, db))
    }

    fn normalize(&self, x: &GpuBuf<D>, mean: &[f32], std: &[f32]) -> Result<GpuBuf<D>> {
        self.normalize_op(x, Some(mean), std)
    }

    fn normalize_backward(&self, dy: &GpuBuf<D>, std: &[f32]) -> Result<GpuBuf<D>> {
        self.normalize_op(dy, None, std)
    }

    fn softmax_cross_entropy_on_device(
        &self,
        logits: &GpuBuf<D>,
        labels: &GpuBuf<D>,
        weights: &GpuBuf<D>,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>)> {
        let [n, k] = dims2("logits", logits.shape())?;
        for (what, b) in [("labels", labels), ("weights", weights)] {
            if b.len() != n {
                return Err(Error::Msg(format!(
                    "softmax_cross_entropy: {} {what} for {n} rows of logits",
                    b.len()
                )));
            }
        }
        let dlogits = self.alloc(&[n, k])?;
        let loss = self.alloc(&[n])?;
        if k == 0 || n == 0 {
            return Ok((loss, dlogits));
        }
        #[repr(C)]
        struct LossArgs {
            n: i32,
            k: i32,
        }
        let a = LossArgs {
            n: n as i32,
            k: k as i32,
        };
        let p = [
            logits.ptr(),
            labels.ptr(),
            weights.ptr(),
            loss.ptr(),
            dlogits.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch("softmax_xent", n, [n as u32, 1, 1], [128, 1, 1], &mut args)?;
        Ok((loss, dlogits))
    }

    fn composite(
        &self,
        canvas: &GpuBuf<D>,
        mask: &GpuBuf<D>,
        others: &GpuBuf<D>,
    ) -> Result<GpuBuf<D>> {
        let (s, b, c, hw) = search_dims(canvas, others)?;
        let [_, _, h, w] = dims4("canvas", canvas.shape())?;
        expect_shape("mask", mask, &[s, h, w])?;
        let out = self.alloc(others.shape())?;
        let a = MaskArgs {
            s: s as i32,
            b: b as i32,
            c: c as i32,
            hw: hw as i32,
            ..MaskArgs::default()
        };
        let p = [canvas.ptr(), mask.ptr(), others.ptr(), out.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("mask_composite", out.len(), &mut args)?;
        Ok(out)
    }

    fn mask_grad(
        &self,
        dx: &GpuBuf<D>,
        canvas: &GpuBuf<D>,
        others: &GpuBuf<D>,
        l1_grad: f32,
    ) -> Result<GpuBuf<D>> {
        let (s, b, c, hw) = search_dims(canvas, others)?;
        expect_shape("dx", dx, others.shape())?;
        let [_, _, h, w] = dims4("canvas", canvas.shape())?;
        let grad = self.alloc(&[s, h, w])?;
        let a = MaskArgs {
            s: s as i32,
            b: b as i32,
            c: c as i32,
            hw: hw as i32,
            l1_grad,
            ..MaskArgs::default()
        };
        let p = [dx.ptr(), canvas.ptr(), others.ptr(), grad.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("mask_grad", s * hw, &mut args)?;
        Ok(grad)
    }

    fn pattern_grad(&self, dx: &GpuBuf<D>, mask: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        let (s, b, c, hw) = pattern_grad_dims(dx.shape(), mask.shape())?;
        let [_, _, h, w] = dims4("dx", dx.shape())?;
        let grad = self.alloc(&[s, c, h, w])?;
        let a = MaskArgs {
            s: s as i32,
            b: b as i32,
            c: c as i32,
            hw: hw as i32,
            ..MaskArgs::default()
        };
        let p = [dx.ptr(), mask.ptr(), grad.ptr()];
        let mut args = vec![arg(&a)];
        args.extend(p.iter().map(arg));
        self.launch_flat("mask_pattern_grad", grad.len(), &mut args)?;
        Ok(grad)
    }

    fn sign_step_clamp(&self, mask: &mut GpuBuf<D>, grad: &GpuBuf<D>, lr: f64) -> Result<()> {
        expect_shape("grad", grad, mask.shape())?;
        self.make_unique(mask)?;
        let a = MaskArgs {
            lr,
            n: mask.len() as i32,
            ..MaskArgs::default()
        };
        let (pm, pg) = (mask.ptr(), grad.ptr());
        self.launch_flat(
            "mask_sign_step",
            mask.len(),
            &mut [arg(&a), arg(&pm), arg(&pg)],
        )
    }

    fn sgd_step(
        &self,
        param: &mut GpuBuf<D>,
        grad: &GpuBuf<D>,
        velocity: &mut GpuBuf<D>,
        p: SgdParams,
    ) -> Result<()> {
        expect_shape("grad", grad, param.shape())?;
        expect_shape("velocity", velocity, param.shape())?;
        self.make_unique(param)?;
        self.make_unique(velocity)?;
        let a = OptimArgs {
            n: param.len() as i32,
            lr: p.lr,
            momentum: p.momentum,
            weight_decay: p.weight_decay,
            ..OptimArgs::default()
        };
        let (pp, pg, pv) = (param.ptr(), grad.ptr(), velocity.ptr());
        self.launch_flat(
            "sgd_step",
            param.len(),
            &mut [arg(&a), arg(&pp), arg(&pg), arg(&pv)],
        )
    }

    fn pgd_step(
        &self,
        x: &mut GpuBuf<D>,
        grad: &GpuBuf<D>,
        x0: &GpuBuf<D>,
        step: f32,
        eps: f32,
    ) -> Result<()> {
        expect_shape("grad", grad, x.shape())?;
        expect_shape("x0", x0, x.shape())?;
        pgd_radius(eps)?;
        self.make_unique(x)?;
        let a = OptimArgs {
            n: x.len() as i32,
            lr: step,
            eps,
            ..OptimArgs::default()
        };
        let (px, pg, p0) = (x.ptr(), grad.ptr(), x0.ptr());
        self.launch_flat(
            "pgd_step",
            x.len(),
            &mut [arg(&a), arg(&px), arg(&pg), arg(&p0)],
        )
    }

    fn activation(&self, x: &GpuBuf<D>, act: Activation) -> Result<GpuBuf<D>> {
        self.act_op(x, None, act)
    }

    fn activation_backward(
        &self,
        dy: &GpuBuf<D>,
        x: &GpuBuf<D>,
        act: Activation,
    ) -> Result<GpuBuf<D>> {
        self.act_op(x, Some(dy), act)
    }

    fn mul(&self, a: &GpuBuf<D>, b: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        self.mul_op(a, b)
    }

    fn mul_backward(
        &self,
        dy: &GpuBuf<D>,
        a: &GpuBuf<D>,
        b: &GpuBuf<D>,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>)> {
        self.mul_backward_op(dy, a, b)
    }

    fn affine(&self, x: &GpuBuf<D>, scale: &[f32], shift: &[f32]) -> Result<GpuBuf<D>> {
        self.affine_op(x, scale, Some(shift))
    }

    fn affine_backward(&self, dy: &GpuBuf<D>, scale: &[f32]) -> Result<GpuBuf<D>> {
        self.affine_op(dy, scale, None)
    }

    fn concat(&self, xs: &[&GpuBuf<D>]) -> Result<GpuBuf<D>> {
        self.concat_op(xs)
    }

    fn concat_backward(&self, dy: &GpuBuf<D>, channels: &[usize]) -> Result<Vec<GpuBuf<D>>> {
        self.concat_backward_op(dy, channels)
    }

    fn pad2d(&self, x: &GpuBuf<D>, p: Pad2d) -> Result<GpuBuf<D>> {
        self.pad_op(x, p)
    }

    fn pad2d_backward(&self, dy: &GpuBuf<D>, p: Pad2d) -> Result<GpuBuf<D>> {
        self.crop_op(dy, p)
    }
}
