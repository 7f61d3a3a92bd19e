//! The GPU-against-CPU equivalence suite: every op of [`Backend`] on random
//! shapes (odd ones included), every zoo model's forward and input gradient,
//! one search step and one training step, each compared with the CPU
//! reference under a bound derived from the arithmetic.
//!
//! It runs on any driver: CI runs it through the emulated driver
//! (`tests/gpu_emu_*.rs`), `cwp selftest --device cuda` on a real GPU.
//!
//! # Tolerances
//! With `u = 2^-24` (f32 unit roundoff) and `γ(k) = k·u / (1 - k·u)`, a sum
//! of `k` products computed in any order, with or without fused
//! multiply-adds, is within `γ(k+1)·Σ|terms|` of the exact sum (Higham,
//! *Accuracy and Stability of Numerical Algorithms*, §3.1). Two such
//! implementations are therefore within `2·γ(k+2)·Σ|terms|` of each other.
//! The suite computes `Σ|terms|` per output element by running the CPU
//! reference on absolute values (`conv(|x|, |w|)`), so each element gets its
//! own bound. A wrong index makes errors of the size of the terms
//! themselves, orders of magnitude above these bounds.
//! Ops whose two implementations perform the same f32 operations in the same
//! order are held to a few ulps (FMA contraction on the GPU may round a
//! product once less); the reductions done in f64 on both sides are held to
//! a few ulps of the result. Model-level checks use the golden-fixture
//! tolerances of `shared/fixtures/README.md` (f32 against f64 PyTorch):
//! logits within `1e-4·max(1, max|ref|)` (deep nets `1e-3`), input gradients
//! within relative L2 `1e-3` (deep nets `5e-3`).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Driver, GpuBackend, GpuBuf};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, ConvParams, PoolParams, SgdParams};
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::graph::{Graph, ParamKind};
use crate::search::optimize::{step as search_step, MaskConfig};
use crate::tensor::{numel, rel_l2, Tensor};
use crate::zoo::{build, ModelSpec};

/// f32 unit roundoff.
pub const U: f64 = 1.0 / 16_777_216.0;

/// `γ(k) = k·u / (1 - k·u)`: the relative error bound of a k-term sum.
pub fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

/// One comparison of the suite.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// Op family or model.
    pub group: String,
    /// What was compared, with its shape.
    pub name: String,
    /// Largest absolute difference GPU - CPU (or the model-level metric).
    pub max_err: f64,
    /// Largest ratio of an error to its bound: the check passes at <= 1.
    pub ratio: f64,
    /// Whether it passed.
    pub pass: bool,
}

/// The op families of [`check_ops`].
pub const OP_FAMILIES: &[&str] = &[
    "buffers",
    "elementwise",
    "conv",
    "linear",
    "norm",
    "pool",
    "loss",
    "mask",
    "optim",
    "errors",
];

/// `(n, c, h, w, o, k, params)` of a convolution case.
type ConvCase = (usize, usize, usize, usize, usize, usize, ConvParams);

struct Suite<'a, D: Driver> {
    gpu: &'a GpuBackend<D>,
    cpu: CpuBackend,
    rng: ChaCha8Rng,
    group: String,
    out: Vec<Check>,
}

fn abs(t: &Tensor) -> Tensor {
    Tensor::from_fn(t.shape(), |i| t.data()[i].abs())
}

fn conv_shape(s: &[usize], o: usize, k: usize, p: ConvParams) -> Vec<usize> {
    vec![s[0], o, p.out_len(s[2], k), p.out_len(s[3], k)]
}

impl<'a, D: Driver> Suite<'a, D> {
    fn new(gpu: &'a GpuBackend<D>, group: &str, seed: u64) -> Self {
        Suite {
            gpu,
            cpu: CpuBackend,
            rng: ChaCha8Rng::seed_from_u64(seed),
            group: group.to_string(),
            out: Vec::new(),
        }
    }

    /// A random tensor, uniform in `[lo, hi)`.
    fn rand(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = numel(shape);
        let v = (0..n).map(|_| self.rng.random_range(lo..hi)).collect();
        Tensor::new(shape, v).expect("shape and data agree")
    }

    fn up(&self, t: &Tensor) -> Result<GpuBuf<D>> {
        self.gpu.upload(t)
    }

    fn down(&self, b: &GpuBuf<D>) -> Result<Tensor> {
        self.gpu.download(b)
    }

    /// Records `got` against `want` with the per-element bound `bound(i)`.
    /// NaN must meet NaN; shapes must agree.
    fn cmp(&mut self, name: &str, got: &Tensor, want: &Tensor, bound: impl Fn(usize) -> f64) {
        let name = format!("{name} {:?}", want.shape());
        if got.shape() != want.shape() {
            self.out.push(Check {
                group: self.group.clone(),
                name: format!("{name}: GPU shape {:?}", got.shape()),
                max_err: f64::INFINITY,
                ratio: f64::INFINITY,
                pass: false,
            });
            return;
        }
        let (mut max_err, mut ratio) = (0.0f64, 0.0f64);
        for (i, (&g, &w)) in got.data().iter().zip(want.data()).enumerate() {
            let (e, r) = if w.is_nan() || g.is_nan() {
                if w.is_nan() && g.is_nan() {
                    (0.0, 0.0)
                } else {
                    (f64::INFINITY, f64::INFINITY)
                }
            } else {
                let e = (g as f64 - w as f64).abs();
                let b = bound(i);
                (
                    e,
                    if e == 0.0 {
                        0.0
                    } else if b > 0.0 {
                        e / b
                    } else {
                        f64::INFINITY
                    },
                )
            };
            max_err = max_err.max(e);
            ratio = ratio.max(r);
        }
        self.out.push(Check {
            group: self.group.clone(),
            name,
            max_err,
            ratio,
            pass: ratio <= 1.0,
        });
    }

    /// Records a metric against a tolerance.
    fn metric(&mut self, name: String, value: f64, tol: f64) {
        self.out.push(Check {
            group: self.group.clone(),
            name,
            max_err: value,
            ratio: if value == 0.0 { 0.0 } else { value / tol },
            pass: value <= tol,
        });
    }

    /// Records a yes/no property.
    fn property(&mut self, name: &str, holds: bool) {
        self.out.push(Check {
            group: self.group.clone(),
            name: name.to_string(),
            max_err: if holds { 0.0 } else { f64::INFINITY },
            ratio: if holds { 0.0 } else { f64::INFINITY },
            pass: holds,
        });
    }

    // ---- families ------------------------------------------------------------

    fn buffers(&mut self) -> Result<()> {
        let t = self.rand(&[2, 3, 5, 7], -4.0, 4.0);
        let b = self.up(&t)?;
        let back = self.down(&b)?;
        self.cmp("upload/download", &back, &t, |_| 0.0);
        let z = self.down(&self.gpu.zeros(&[3, 129])?)?;
        self.cmp("zeros", &z, &Tensor::zeros(&[3, 129]), |_| 0.0);
        // reshape shares memory; writing through one handle must not change
        // the other (copy on write).
        let flat = self.gpu.reshape(&b, &[2, 105])?;
        let mut acc = self.gpu.reshape(&b, &[2, 105])?;
        self.gpu.add_assign(&mut acc, &flat)?;
        let doubled = Tensor::from_fn(&[2, 105], |i| 2.0 * t.data()[i]);
        self.cmp(
            "add_assign on a shared buffer",
            &self.down(&acc)?,
            &doubled,
            |_| 0.0,
        );
        let still = self.down(&b)?;
        self.cmp("the sharing buffer is unchanged", &still, &t, |_| 0.0);
        let empty = self.up(&Tensor::zeros(&[0, 3]))?;
        self.property(
            "empty tensors round-trip",
            self.down(&empty)?.shape() == [0, 3],
        );
        Ok(())
    }

    fn elementwise(&mut self) -> Result<()> {
        for shape in [vec![1usize], vec![7], vec![2, 3, 5, 5], vec![4, 1031]] {
            let mut x = self.rand(&shape, -1.0, 1.0);
            if x.len() > 3 {
                x.data_mut()[1] = 0.0;
                x.data_mut()[2] = -0.0;
            }
            let y = self.rand(&shape, -1.0, 1.0);
            let (gx, gy) = (self.up(&x)?, self.up(&y)?);
            let want = self.cpu.relu(&x)?;
            self.cmp("relu", &self.down(&self.gpu.relu(&gx)?)?, &want, |_| 0.0);
            let want = self.cpu.relu_backward(&y, &x)?;
            self.cmp(
                "relu_backward",
                &self.down(&self.gpu.relu_backward(&gy, &gx)?)?,
                &want,
                |_| 0.0,
            );
            // One rounding each, same operation: identical.
            let want = self.cpu.add(&x, &y)?;
            self.cmp("add", &self.down(&self.gpu.add(&gx, &gy)?)?, &want, |_| 0.0);
            let mut acc = self.up(&x)?;
            self.gpu.add_assign(&mut acc, &gy)?;
            self.cmp("add_assign", &self.down(&acc)?, &want, |_| 0.0);
        }
        // NaN propagates through relu as on the CPU.
        let x = Tensor::new(&[3], vec![f32::NAN, -1.0, 2.0])?;
        let want = self.cpu.relu(&x)?;
        self.cmp(
            "relu of NaN",
            &self.down(&self.gpu.relu(&self.up(&x)?)?)?,
            &want,
            |_| 0.0,
        );
        for shape in [vec![2usize, 3, 4, 5], vec![1, 1, 7, 3], vec![3, 2]] {
            let c = shape[1];
            let x = self.rand(&shape, 0.0, 1.0);
            let mean: Vec<f32> = (0..c).map(|i| 0.4 + 0.05 * i as f32).collect();
            let std: Vec<f32> = (0..c).map(|i| 0.2 + 0.03 * i as f32).collect();
            let gx = self.up(&x)?;
            // (x - m) / s: the same two roundings on both sides.
            let want = self.cpu.normalize(&x, &mean, &std)?;
            self.cmp(
                "normalize",
                &self.down(&self.gpu.normalize(&gx, &mean, &std)?)?,
                &want,
                |_| 0.0,
            );
            let want = self.cpu.normalize_backward(&x, &std)?;
            self.cmp(
                "normalize_backward",
                &self.down(&self.gpu.normalize_backward(&gx, &std)?)?,
                &want,
                |_| 0.0,
            );
        }
        Ok(())
    }

    /// One convolution shape: `(n, c, h, w, o, k, params)`.
    fn conv_case(&mut self, (n, c, h, w, o, k, p): ConvCase) -> Result<()> {
        let x = self.rand(&[n, c, h, w], -1.0, 1.0);
        let wt = self.rand(&[o, c, k, k], -0.5, 0.5);
        let b = self.rand(&[o], -0.5, 0.5);
        let (gx, gw, gb) = (self.up(&x)?, self.up(&wt)?, self.up(&b)?);
        let tag = format!("k{k} s{} p{}", p.stride, p.pad);
        let kf = c * k * k;
        let bound_f = 2.0 * gamma(kf + 2);

        // forward, with and without bias
        let absref = self.cpu.conv2d(&abs(&x), &abs(&wt), Some(&abs(&b)), p)?;
        let want = self.cpu.conv2d(&x, &wt, Some(&b), p)?;
        let got = self.down(&self.gpu.conv2d(&gx, &gw, Some(&gb), p)?)?;
        self.cmp(&format!("conv2d {tag}"), &got, &want, |i| {
            bound_f * absref.data()[i] as f64
        });
        let want = self.cpu.conv2d(&x, &wt, None, p)?;
        let got = self.down(&self.gpu.conv2d(&gx, &gw, None, p)?)?;
        self.cmp(&format!("conv2d no bias {tag}"), &got, &want, |i| {
            bound_f * absref.data()[i] as f64
        });

        // fused epilogue: relu(conv + bias + residual)
        let yshape = conv_shape(&[n, c, h, w], o, k, p);
        let res = self.rand(&yshape, -1.0, 1.0);
        let want = self.cpu.relu(
            &self
                .cpu
                .add(&self.cpu.conv2d(&x, &wt, Some(&b), p)?, &res)?,
        )?;
        let got = self.down(&self.gpu.conv_forward(
            &gx,
            &gw,
            Some(&gb),
            Some(&self.up(&res)?),
            true,
            p,
        )?)?;
        let absres = abs(&res);
        self.cmp(
            &format!("conv2d+bias+residual+relu {tag}"),
            &got,
            &want,
            |i| bound_f * (absref.data()[i] + absres.data()[i]) as f64,
        );

        // backward data, plain and through a fused ReLU's mask
        let dy = self.rand(&yshape, -1.0, 1.0);
        let kd = o * k * k;
        let bound_d = 2.0 * gamma(kd + 2);
        let absref = self
            .cpu
            .conv2d_backward_data(&abs(&dy), &abs(&wt), x.shape(), p)?;
        let want = self.cpu.conv2d_backward_data(&dy, &wt, x.shape(), p)?;
        let gdy = self.up(&dy)?;
        let got = self.down(&self.gpu.conv2d_backward_data(&gdy, &gw, x.shape(), p)?)?;
        self.cmp(&format!("conv2d_backward_data {tag}"), &got, &want, |i| {
            bound_d * absref.data()[i] as f64
        });
        let y = self.rand(&yshape, -1.0, 1.0);
        let masked = self.cpu.relu_backward(&dy, &y)?;
        let want = self.cpu.conv2d_backward_data(&masked, &wt, x.shape(), p)?;
        let absref = self
            .cpu
            .conv2d_backward_data(&abs(&masked), &abs(&wt), x.shape(), p)?;
        let got =
            self.down(
                &self
                    .gpu
                    .conv_dgrad(&gdy, &gw, Some(&self.up(&y)?), x.shape(), p)?,
            )?;
        self.cmp(
            &format!("conv2d_backward_data relu-masked {tag}"),
            &got,
            &want,
            |i| bound_d * absref.data()[i] as f64,
        );

        // backward filter and bias
        let kw_ = n * yshape[2] * yshape[3];
        let bound_w = 2.0 * gamma(kw_ + 2);
        let (want_w, want_b) = self
            .cpu
            .conv2d_backward_filter(&x, &dy, wt.shape(), p, true)?;
        let (abs_w, abs_b) =
            self.cpu
                .conv2d_backward_filter(&abs(&x), &abs(&dy), wt.shape(), p, true)?;
        let (gw2, gb2) = self
            .gpu
            .conv2d_backward_filter(&gx, &gdy, wt.shape(), p, true)?;
        self.cmp(
            &format!("conv2d_backward_filter {tag}"),
            &self.down(&gw2)?,
            &want_w,
            |i| bound_w * abs_w.data()[i] as f64,
        );
        let (want_b, abs_b) = (want_b.expect("bias"), abs_b.expect("bias"));
        // f64 sums on both sides, rounded once to f32.
        let got_b = self.down(
            gb2.as_ref()
                .ok_or_else(|| Error::Backend("no bias gradient".into()))?,
        )?;
        self.cmp(
            &format!("conv2d bias gradient {tag}"),
            &got_b,
            &want_b,
            |i| 4.0 * U * abs_b.data()[i] as f64,
        );
        // The GPU's wgrad (split-K) is deterministic: a second run is identical.
        let (again, _) = self
            .gpu
            .conv2d_backward_filter(&gx, &gdy, wt.shape(), p, false)?;
        self.property(
            &format!(
                "conv2d_backward_filter bitwise reproducible {tag} {:?}",
                wt.shape()
            ),
            self.down(&again)?.data() == self.down(&gw2)?.data(),
        );
        Ok(())
    }

    fn conv(&mut self) -> Result<()> {
        let cp = |stride, pad| ConvParams { stride, pad };
        // (n, c, h, w, o, k, stride, pad): batch 1, non-square, 1x1, 3x3, 5x5,
        // 7x7, stride 2, padding 0/1/3, channel counts off the tile sizes,
        // and enough output columns for the wide tiles.
        let cases = [
            (1, 3, 7, 5, 5, 3, cp(1, 1)),
            (2, 4, 9, 9, 6, 1, cp(1, 0)),
            (2, 3, 11, 8, 7, 7, cp(2, 3)),
            (3, 5, 8, 8, 130, 3, cp(2, 1)),
            (2, 33, 6, 7, 65, 3, cp(1, 0)),
            (1, 16, 12, 12, 16, 1, cp(2, 0)),
            (2, 2, 5, 6, 3, 5, cp(1, 2)),
            (4, 8, 16, 16, 40, 3, cp(1, 1)),
            (2, 6, 12, 12, 100, 3, cp(1, 1)),
            (3, 3, 14, 14, 9, 3, cp(1, 1)),
        ];
        for case in cases {
            self.conv_case(case)?;
        }
        // A few random shapes.
        for _ in 0..3 {
            let k = [1usize, 3, 5][self.rng.random_range(0..3)];
            let stride = self.rng.random_range(1..3usize);
            let pad = self.rng.random_range(0..(k / 2 + 1));
            let (h, w) = (
                self.rng.random_range(k..k + 9),
                self.rng.random_range(k..k + 9),
            );
            let (n, c, o) = (
                self.rng.random_range(1..4usize),
                self.rng.random_range(1..20usize),
                self.rng.random_range(1..70usize),
            );
            self.conv_case((n, c, h, w, o, k, cp(stride, pad)))?;
        }
        // Batch invariance: image 1 alone gives the same bits as in a batch.
        let p = cp(1, 1);
        let x = self.rand(&[3, 5, 9, 9], -1.0, 1.0);
        let wt = self.rand(&[12, 5, 3, 3], -0.5, 0.5);
        let gw = self.up(&wt)?;
        let all = self.down(&self.gpu.conv2d(&self.up(&x)?, &gw, None, p)?)?;
        let one = self.down(
            &self
                .gpu
                .conv2d(&self.up(&x.slice_rows(1, 2))?, &gw, None, p)?,
        )?;
        self.property(
            "conv2d batch invariant (bitwise)",
            all.slice_rows(1, 2).data() == one.data(),
        );
        Ok(())
    }

    fn linear(&mut self) -> Result<()> {
        for (n, k, o) in [
            (1usize, 7usize, 3usize),
            (5, 130, 33),
            (130, 20, 10),
            (2, 512, 1000),
            (3, 1, 2),
        ] {
            let x = self.rand(&[n, k], -1.0, 1.0);
            let w = self.rand(&[o, k], -0.5, 0.5);
            let b = self.rand(&[o], -0.5, 0.5);
            let dy = self.rand(&[n, o], -1.0, 1.0);
            let (gx, gw, gb, gdy) = (self.up(&x)?, self.up(&w)?, self.up(&b)?, self.up(&dy)?);
            let want = self.cpu.linear(&x, &w, Some(&b))?;
            let absref = self.cpu.linear(&abs(&x), &abs(&w), Some(&abs(&b)))?;
            let bound = 2.0 * gamma(k + 2);
            self.cmp(
                "linear",
                &self.down(&self.gpu.linear(&gx, &gw, Some(&gb))?)?,
                &want,
                |i| bound * absref.data()[i] as f64,
            );
            let want = self.cpu.linear_backward_data(&dy, &w)?;
            let absref = self.cpu.linear_backward_data(&abs(&dy), &abs(&w))?;
            let bound = 2.0 * gamma(o + 2);
            self.cmp(
                "linear_backward_data",
                &self.down(&self.gpu.linear_backward_data(&gdy, &gw)?)?,
                &want,
                |i| bound * absref.data()[i] as f64,
            );
            let (ww, wb) = self.cpu.linear_backward_weight(&x, &dy, true)?;
            let (aw, ab) = self.cpu.linear_backward_weight(&abs(&x), &abs(&dy), true)?;
            let (gw2, gb2) = self.gpu.linear_backward_weight(&gx, &gdy, true)?;
            let bound = 2.0 * gamma(n + 2);
            self.cmp("linear_backward_weight", &self.down(&gw2)?, &ww, |i| {
                bound * aw.data()[i] as f64
            });
            let (wb, ab) = (wb.expect("bias"), ab.expect("bias"));
            let got = self.down(
                gb2.as_ref()
                    .ok_or_else(|| Error::Backend("no bias gradient".into()))?,
            )?;
            self.cmp("linear bias gradient", &got, &wb, |i| {
                4.0 * U * ab.data()[i] as f64
            });
        }
        Ok(())
    }

    fn norm(&mut self) -> Result<()> {
        for shape in [
            vec![2usize, 3, 4, 5],
            vec![1, 5, 3, 1],
            vec![7, 4],
            vec![3, 70, 2, 3],
        ] {
            let c = shape[1];
            let x = self.rand(&shape, -2.0, 3.0);
            let gamma_ = self.rand(&[c], 0.5, 1.5);
            let beta = self.rand(&[c], -0.5, 0.5);
            let mean = self.rand(&[c], -0.5, 0.5);
            let var = self.rand(&[c], 0.5, 2.0);
            let dy = self.rand(&shape, -1.0, 1.0);
            let g = |t: &Tensor| self.up(t);
            let (gx, gg, gbt, gm, gv, gdy) =
                (g(&x)?, g(&gamma_)?, g(&beta)?, g(&mean)?, g(&var)?, g(&dy)?);
            let eps = 1e-5;
            let plane = numel(&shape[2..]);
            let ch = |i: usize| (i / plane) % c;
            let scale: Vec<f64> = (0..c)
                .map(|j| {
                    (gamma_.data()[j] as f64 / (var.data()[j] as f64 + eps as f64).sqrt()).abs()
                })
                .collect();
            // (x - m) * s + b, s computed identically: at most the rounding of
            // one fused product differs: a few ulps of the terms.
            let want = self
                .cpu
                .batch_norm_eval(&x, &gamma_, &beta, &mean, &var, eps)?;
            let got = self.down(&self.gpu.batch_norm_eval(&gx, &gg, &gbt, &gm, &gv, eps)?)?;
            self.cmp("batch_norm_eval", &got, &want, |i| {
                8.0 * U
                    * ((x.data()[i] - mean.data()[ch(i)]).abs() as f64 * scale[ch(i)]
                        + beta.data()[ch(i)].abs() as f64)
            });
            let want = self.cpu.batch_norm_eval_backward(&dy, &gamma_, &var, eps)?;
            let got = self.down(&self.gpu.batch_norm_eval_backward(&gdy, &gg, &gv, eps)?)?;
            self.cmp("batch_norm_eval_backward", &got, &want, |i| {
                4.0 * U * (dy.data()[i].abs() as f64) * scale[ch(i)]
            });

            // Train mode: statistics in f64 on both sides, each rounded once.
            let (mut crm, mut crv) = (mean.clone(), var.clone());
            let (want_y, saved) = self
                .cpu
                .batch_norm_train(&x, &gamma_, &beta, &mut crm, &mut crv, 0.1, eps)?;
            let (mut grm, mut grv) = (self.up(&mean)?, self.up(&var)?);
            let (got_y, gsaved) = self
                .gpu
                .batch_norm_train(&gx, &gg, &gbt, &mut grm, &mut grv, 0.1, eps)?;
            let (sm, si) = (saved.mean.clone(), saved.invstd.clone());
            self.cmp(
                "batch_norm_train saved mean",
                &self.down(&gsaved.mean)?,
                &sm,
                |i| 4.0 * U * sm.data()[i].abs() as f64 + 1e-12,
            );
            self.cmp(
                "batch_norm_train saved invstd",
                &self.down(&gsaved.invstd)?,
                &si,
                |i| 4.0 * U * si.data()[i].abs() as f64,
            );
            self.cmp(
                "batch_norm_train running mean",
                &self.down(&grm)?,
                &crm,
                |i| 4.0 * U * crm.data()[i].abs() as f64 + 1e-12,
            );
            self.cmp(
                "batch_norm_train running var",
                &self.down(&grv)?,
                &crv,
                |i| 4.0 * U * crv.data()[i].abs() as f64,
            );
            // y = (x - m)*(inv*g) + b with m, inv possibly one ulp apart.
            let s = |i: usize| (si.data()[ch(i)] * gamma_.data()[ch(i)]).abs() as f64;
            let got_y = self.down(&got_y)?;
            self.cmp("batch_norm_train", &got_y, &want_y, |i| {
                let xm = (x.data()[i] - sm.data()[ch(i)]).abs() as f64;
                16.0 * U
                    * ((xm + sm.data()[ch(i)].abs() as f64) * s(i)
                        + beta.data()[ch(i)].abs() as f64)
            });
            let (wdx, wdg, wdb) = self
                .cpu
                .batch_norm_train_backward(&dy, &x, &gamma_, &saved)?;
            let (gdx, gdg, gdb) = self
                .gpu
                .batch_norm_train_backward(&gdy, &gx, &gg, &gsaved)?;
            // Per channel: sum |dy| and sum |dy * xhat| bound the f64 sums.
            let count = (shape[0] * plane) as f64;
            let mut sdy = vec![0f64; c];
            let mut sdx = vec![0f64; c];
            for (i, (&d, &v)) in dy.data().iter().zip(x.data()).enumerate() {
                let j = ch(i);
                sdy[j] += (d as f64).abs();
                sdx[j] += (d as f64 * (v - sm.data()[j]) as f64 * si.data()[j] as f64).abs();
            }
            self.cmp("batch_norm_train dbeta", &self.down(&gdb)?, &wdb, |j| {
                4.0 * U * sdy[j]
            });
            self.cmp("batch_norm_train dgamma", &self.down(&gdg)?, &wdg, |j| {
                4.0 * U * sdx[j] + 1e-12
            });
            self.cmp(
                "batch_norm_train_backward dx",
                &self.down(&gdx)?,
                &wdx,
                |i| {
                    let j = ch(i);
                    let k = (gamma_.data()[j] * si.data()[j]).abs() as f64;
                    let xhat = ((x.data()[i] - sm.data()[j]) * si.data()[j]).abs() as f64;
                    16.0 * U
                        * k
                        * (dy.data()[i].abs() as f64 + sdy[j] / count + xhat * sdx[j] / count)
                },
            );
        }
        Ok(())
    }

    fn pool(&mut self) -> Result<()> {
        let pp = |kernel, stride, pad| PoolParams {
            kernel,
            stride,
            pad,
        };
        for (shape, p) in [
            ([2usize, 3, 9, 7], pp(3, 2, 1)),
            ([1, 2, 8, 8], pp(2, 2, 0)),
            ([2, 2, 7, 6], pp(3, 1, 1)),
            ([1, 3, 10, 9], pp(5, 3, 2)),
        ] {
            let mut x = self.rand(&shape, -1.0, 1.0);
            // Ties: the first maximum of a window wins on both sides.
            x.data_mut()[5] = x.data()[4];
            let gx = self.up(&x)?;
            let tag = format!("k{} s{} p{}", p.kernel, p.stride, p.pad);
            // Selection and equal-order sums: identical.
            let want = self.cpu.max_pool2d(&x, p)?;
            let y = self.gpu.max_pool2d(&gx, p)?;
            self.cmp(&format!("max_pool2d {tag}"), &self.down(&y)?, &want, |_| {
                0.0
            });
            let dy = self.rand(want.shape(), -1.0, 1.0);
            let gdy = self.up(&dy)?;
            let want = self.cpu.max_pool2d_backward(&x, &dy, p)?;
            self.cmp(
                &format!("max_pool2d_backward {tag}"),
                &self.down(&self.gpu.max_pool2d_backward(&gx, &gdy, p)?)?,
                &want,
                |_| 0.0,
            );
            let kk = p.kernel * p.kernel;
            let want = self.cpu.avg_pool2d(&x, p)?;
            self.cmp(
                &format!("avg_pool2d {tag}"),
                &self.down(&self.gpu.avg_pool2d(&gx, p)?)?,
                &want,
                |_| 2.0 * gamma(kk + 1),
            );
            let want = self.cpu.avg_pool2d_backward(&dy, &shape, p)?;
            self.cmp(
                &format!("avg_pool2d_backward {tag}"),
                &self.down(&self.gpu.avg_pool2d_backward(&gdy, &shape, p)?)?,
                &want,
                |_| 2.0 * gamma(kk + 1),
            );
        }
        // NaN wins a max-pool window, as on the CPU.
        let mut x = self.rand(&[1, 1, 4, 4], -1.0, 1.0);
        x.data_mut()[5] = f32::NAN;
        let p = pp(2, 2, 0);
        let want = self.cpu.max_pool2d(&x, p)?;
        self.cmp(
            "max_pool2d with NaN",
            &self.down(&self.gpu.max_pool2d(&self.up(&x)?, p)?)?,
            &want,
            |_| 0.0,
        );
        for shape in [[2usize, 5, 7, 3], [3, 4, 1, 1], [1, 70, 8, 8]] {
            let x = self.rand(&shape, -1.0, 1.0);
            // f64 sums on both sides: one f32 rounding each.
            let want = self.cpu.global_avg_pool(&x)?;
            self.cmp(
                "global_avg_pool",
                &self.down(&self.gpu.global_avg_pool(&self.up(&x)?)?)?,
                &want,
                |_| 4.0 * U,
            );
            let dy = self.rand(&[shape[0], shape[1]], -1.0, 1.0);
            let want = self.cpu.global_avg_pool_backward(&dy, &shape)?;
            self.cmp(
                "global_avg_pool_backward",
                &self.down(&self.gpu.global_avg_pool_backward(&self.up(&dy)?, &shape)?)?,
                &want,
                |_| 0.0,
            );
        }
        Ok(())
    }

    fn loss(&mut self) -> Result<()> {
        for (n, k) in [(3usize, 10usize), (2, 1000), (1, 1), (5, 7)] {
            let logits = self.rand(&[n, k], -8.0, 8.0);
            let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % k).collect();
            let weights: Vec<f32> = (0..n).map(|i| 0.1 + 0.2 * i as f32).collect();
            let (wl, wd) = self.cpu.softmax_cross_entropy(&logits, &labels, &weights)?;
            let (gl, gd) = self
                .gpu
                .softmax_cross_entropy(&self.up(&logits)?, &labels, &weights)?;
            // Computed in f64 on both sides (sums in another order), each
            // rounded once to f32.
            let wl = Tensor::new(&[n], wl)?;
            let gl = Tensor::new(&[n], gl)?;
            self.cmp("softmax_cross_entropy loss", &gl, &wl, |i| {
                4.0 * U * (wl.data()[i].abs() as f64 + 1.0)
            });
            self.cmp(
                "softmax_cross_entropy dlogits",
                &self.down(&gd)?,
                &wd,
                |i| 4.0 * U * weights[i / k] as f64 + 1e-30,
            );
        }
        Ok(())
    }

    fn mask(&mut self) -> Result<()> {
        for (s, b, c, h, w) in [
            (2usize, 3usize, 3usize, 5usize, 4usize),
            (1, 1, 1, 6, 6),
            (3, 4, 1, 7, 9),
        ] {
            let canvas = self.rand(&[s, c, h, w], 0.0, 1.0);
            let mut mask = self.rand(&[s, h, w], 0.0, 1.0);
            mask.data_mut()[0] = 0.0;
            mask.data_mut()[1] = 1.0;
            let others = self.rand(&[s * b, c, h, w], 0.0, 1.0);
            let (gc, gm, go) = (self.up(&canvas)?, self.up(&mask)?, self.up(&others)?);
            let hw = h * w;
            let want = self.cpu.composite(&canvas, &mask, &others)?;
            // m*cv + (1-m)*x: a fused product may round once less.
            self.cmp(
                "composite",
                &self.down(&self.gpu.composite(&gc, &gm, &go)?)?,
                &want,
                |_| 8.0 * U,
            );
            let dx = self.rand(&[s * b, c, h, w], -1.0, 1.0);
            let l1 = 0.8 / (hw as f32 / 2.0);
            let want = self.cpu.mask_grad(&dx, &canvas, &others, l1)?;
            let mut absref = vec![l1 as f64; s * hw];
            for (i, (&d, &x)) in dx.data().iter().zip(others.data()).enumerate() {
                let (img, j) = (i / (c * hw), i % hw);
                let si = img / b;
                let cv = canvas.data()[(si * c + (i / hw) % c) * hw + j];
                absref[si * hw + j] += (d as f64 * (cv - x) as f64).abs();
            }
            let bound = 2.0 * gamma(b * c + 2);
            let got = self.down(&self.gpu.mask_grad(&self.up(&dx)?, &gc, &go, l1)?)?;
            self.cmp("mask_grad", &got, &want, |i| bound * absref[i]);
            // m - lr*sign(g) is exact-product arithmetic: identical.
            let mut grad = self.rand(&[s, h, w], -1.0, 1.0);
            grad.data_mut()[2] = 0.0;
            let mut cm = mask.clone();
            self.cpu.sign_step_clamp(&mut cm, &grad, 0.02)?;
            let mut gm2 = self.up(&mask)?;
            self.gpu.sign_step_clamp(&mut gm2, &self.up(&grad)?, 0.02)?;
            self.cmp("sign_step_clamp", &self.down(&gm2)?, &cm, |_| 0.0);
        }
        Ok(())
    }

    fn optim(&mut self) -> Result<()> {
        for n in [1usize, 5, 1000] {
            let p = self.rand(&[n], -1.0, 1.0);
            let g = self.rand(&[n], -1.0, 1.0);
            let v = self.rand(&[n], -1.0, 1.0);
            let sp = SgdParams {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
            };
            let (mut cp, mut cv) = (p.clone(), v.clone());
            self.cpu.sgd_step(&mut cp, &g, &mut cv, sp)?;
            let (mut gp, mut gv) = (self.up(&p)?, self.up(&v)?);
            self.gpu.sgd_step(&mut gp, &self.up(&g)?, &mut gv, sp)?;
            // Three multiply-adds, each possibly fused on the GPU.
            let mag = |i: usize| (g.data()[i].abs() + v.data()[i].abs() + p.data()[i].abs()) as f64;
            self.cmp("sgd_step velocity", &self.down(&gv)?, &cv, |i| {
                8.0 * U * mag(i)
            });
            self.cmp("sgd_step param", &self.down(&gp)?, &cp, |i| {
                8.0 * U * mag(i)
            });
            let x0 = self.rand(&[n], 0.0, 1.0);
            let x = Tensor::from_fn(&[n], |i| {
                (x0.data()[i] + 0.01 * ((i % 5) as f32 - 2.0)).clamp(0.0, 1.0)
            });
            let mut grad = g.clone();
            grad.data_mut()[0] = 0.0;
            let mut cx = x.clone();
            self.cpu
                .pgd_step(&mut cx, &grad, &x0, 2.0 / 255.0, 8.0 / 255.0)?;
            let mut gx = self.up(&x)?;
            self.gpu.pgd_step(
                &mut gx,
                &self.up(&grad)?,
                &self.up(&x0)?,
                2.0 / 255.0,
                8.0 / 255.0,
            )?;
            self.cmp("pgd_step", &self.down(&gx)?, &cx, |_| 0.0);
        }
        Ok(())
    }

    /// Both backends refuse the same invalid inputs.
    fn errors(&mut self) -> Result<()> {
        let t = |s: &[usize]| Tensor::zeros(s);
        let cp = ConvParams { stride: 1, pad: 0 };
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            (
                "conv2d channel mismatch",
                t(&[1, 3, 5, 5]),
                t(&[2, 4, 3, 3]),
            ),
            (
                "conv2d kernel larger than input",
                t(&[1, 1, 2, 2]),
                t(&[1, 1, 3, 3]),
            ),
            ("conv2d 3-D input", t(&[3, 5, 5]), t(&[1, 3, 3, 3])),
        ];
        for (name, x, w) in cases {
            let c = self.cpu.conv2d(&x, &w, None, cp).is_err();
            let g = self
                .gpu
                .conv2d(&self.up(&x)?, &self.up(&w)?, None, cp)
                .is_err();
            self.property(&format!("{name}: both refuse"), c && g);
        }
        let a = self.up(&t(&[2, 3]))?;
        let b = self.up(&t(&[3, 2]))?;
        self.property(
            "add of different shapes refused",
            self.gpu.add(&a, &b).is_err(),
        );
        let l = self.up(&t(&[2, 4]))?;
        self.property(
            "cross-entropy label out of range refused",
            self.gpu
                .softmax_cross_entropy(&l, &[0, 4], &[0.5, 0.5])
                .is_err(),
        );
        self.property(
            "pool larger than the padded input refused",
            self.gpu
                .max_pool2d(
                    &self.up(&t(&[1, 1, 2, 2]))?,
                    PoolParams {
                        kernel: 3,
                        stride: 1,
                        pad: 0,
                    },
                )
                .is_err(),
        );
        Ok(())
    }
}

/// Runs one op family of the suite (see [`OP_FAMILIES`]) on `gpu`.
pub fn check_ops<D: Driver>(gpu: &GpuBackend<D>, family: &str, seed: u64) -> Result<Vec<Check>> {
    let mut s = Suite::new(gpu, family, seed);
    match family {
        "buffers" => s.buffers()?,
        "elementwise" => s.elementwise()?,
        "conv" => s.conv()?,
        "linear" => s.linear()?,
        "norm" => s.norm()?,
        "pool" => s.pool()?,
        "loss" => s.loss()?,
        "mask" => s.mask()?,
        "optim" => s.optim()?,
        "errors" => s.errors()?,
        other => {
            return Err(Error::arg(
                "family",
                format!("unknown op family `{other}` ({})", OP_FAMILIES.join(", ")),
            ))
        }
    }
    Ok(s.out)
}

/// The formula weights of `shared/fixtures/README.md` for one parameter.
pub fn formula_tensor(name: &str, shape: &[usize], kind: ParamKind) -> Tensor {
    let s = (name.bytes().map(|b| b as u64).sum::<u64>() % 997) as f64;
    let n = numel(shape);
    let fan_in = if shape.is_empty() {
        1
    } else {
        n / shape[0].max(1)
    };
    Tensor::from_fn(shape, |i| {
        let u = (0.731 * i as f64 + 0.1 * s).sin();
        let v = match kind {
            ParamKind::ConvWeight | ParamKind::LinearWeight => {
                u * (2.0 / fan_in as f64).sqrt() * 0.8
            }
            ParamKind::Bias => 0.05 * u,
            ParamKind::BnWeight => 1.0 + 0.2 * u,
            ParamKind::BnBias | ParamKind::BnMean => 0.1 * u,
            ParamKind::BnVar => 1.0 + 0.25 * (u + 1.0),
        };
        v as f32
    })
}

/// Formula weights for every parameter of a graph.
pub fn formula_params(graph: &Graph) -> Vec<Tensor> {
    graph
        .params
        .iter()
        .map(|p| formula_tensor(&p.name, &p.shape, p.kind))
        .collect()
}

/// The formula input batch of the fixtures README.
pub fn formula_input(shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |j| {
        (0.5 + 0.45 * (0.917 * j as f64 + 0.3).sin()) as f32
    })
}

/// One model of the model-level suite.
#[derive(Clone, Debug)]
pub struct ModelCase {
    /// Architecture.
    pub arch: &'static str,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Classes.
    pub classes: usize,
    /// Images per batch.
    pub batch: usize,
    /// A deep net (looser tolerances).
    pub deep: bool,
}

/// Every zoo model at small batches (`resnet50_imagenet` at one image).
pub fn zoo_cases() -> Vec<ModelCase> {
    let m = |arch, input, classes, batch, deep| ModelCase {
        arch,
        input,
        classes,
        batch,
        deep,
    };
    vec![
        m("smallcnn", [1, 28, 28], 10, 2, false),
        m("smallcnn", [3, 32, 32], 10, 2, false),
        m("resnet18", [3, 32, 32], 10, 2, true),
        m("resnet18", [1, 28, 28], 10, 2, true),
        m("resnet34", [3, 32, 32], 10, 2, true),
        m("resnet50", [3, 32, 32], 10, 2, true),
        m("preact_resnet18", [3, 32, 32], 10, 2, true),
        m("vgg16", [3, 32, 32], 10, 2, true),
        m("wrn28_10", [3, 32, 32], 10, 2, true),
        m("resnet50_imagenet", [3, 224, 224], 1000, 1, true),
    ]
}

/// Eval-mode logits and input gradient of the mean cross-entropy (labels
/// `(3n + 1) mod classes`) of `graph` on a backend.
pub fn logits_and_input_grad<B: Backend>(
    be: &B,
    graph: &Graph,
    params: &[Tensor],
    x: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let n = x.shape()[0];
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % graph.num_classes).collect();
    let p = params
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<Vec<_>>>()?;
    let trace = graph.forward_trace(be, &p, be.upload(x)?)?;
    let (_, dlogits) =
        be.softmax_cross_entropy(trace.logits(), &labels, &vec![1.0 / n as f32; n])?;
    let logits = be.download(trace.logits())?;
    let grads = graph.backward(be, &p, &trace, dlogits, false)?;
    Ok((logits, be.download(&grads.dx)?))
}

/// Logit and input-gradient tolerances of a model case (fixtures README).
pub fn model_tolerances(deep: bool) -> (f64, f64) {
    if deep {
        (1e-3, 5e-3)
    } else {
        (1e-4, 1e-3)
    }
}

/// Max |a - b| / max(1, max|b|).
pub fn scaled_max_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    crate::tensor::max_abs_diff(a, b) as f64 / scale
}

/// Max-pool windows of the CPU forward pass whose two largest values are
/// within `rel` of each other (the top one positive), per image: where the
/// input gradient is a discontinuous function of the activations. Two
/// correct f32 implementations may route such a window's gradient to
/// different pixels (first maximum of slightly different values).
pub fn maxpool_near_ties(
    graph: &Graph,
    params: &[Tensor],
    x: &Tensor,
    rel: f32,
) -> Result<Vec<usize>> {
    let n = x.shape()[0];
    let mut ties = vec![0usize; n];
    let p = params
        .iter()
        .map(|t| CpuBackend.upload(t))
        .collect::<Result<Vec<_>>>()?;
    for node in &graph.nodes {
        let crate::graph::Op::MaxPool(pp) = node.op else {
            continue;
        };
        let src = node.inputs[0];
        let mut g = graph.clone();
        g.nodes.truncate(src + 1);
        let a = if src == 0 {
            x.clone()
        } else {
            g.forward(&CpuBackend, &p, x)?
        };
        let (c, h, w) = (a.shape()[1], a.shape()[2], a.shape()[3]);
        let (oh, ow) = (pp.out_len(h), pp.out_len(w));
        let win = |o: usize, len: usize| {
            let start = o * pp.stride;
            (
                start.saturating_sub(pp.pad),
                (start + pp.kernel).saturating_sub(pp.pad).min(len),
            )
        };
        for (img, t) in ties.iter_mut().enumerate() {
            for ch in 0..c {
                let plane = &a.data()[(img * c + ch) * h * w..][..h * w];
                for y in 0..oh {
                    let (h0, h1) = win(y, h);
                    for xx in 0..ow {
                        let (w0, w1) = win(xx, w);
                        let (mut top, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for ih in h0..h1 {
                            for &v in &plane[ih * w + w0..ih * w + w1] {
                                if v > top {
                                    second = top;
                                    top = v;
                                } else if v > second {
                                    second = v;
                                }
                            }
                        }
                        if top > 0.0 && top - second <= rel * top {
                            *t += 1;
                        }
                    }
                }
            }
        }
    }
    Ok(ties)
}

/// Relative L2 error of `got` against `want`, image by image (rows of the
/// first axis).
pub fn rel_l2_per_image(got: &Tensor, want: &Tensor) -> Vec<f64> {
    let n = want.shape()[0].max(1);
    let per = want.len() / n;
    (0..n)
        .map(|i| {
            rel_l2(
                &got.data()[i * per..(i + 1) * per],
                &want.data()[i * per..(i + 1) * per],
            )
        })
        .collect()
}

/// Records the input-gradient comparison of one path, image by image. An
/// image over the tolerance is excused only when the reference has a
/// max-pool near-tie in it (see [`maxpool_near_ties`]); returns how many
/// images were compared.
fn dx_check<D: Driver>(
    s: &mut Suite<'_, D>,
    path: &str,
    got: &Tensor,
    want: &Tensor,
    ties: &[usize],
    tol: f64,
) -> usize {
    let errs = rel_l2_per_image(got, want);
    let mut compared = 0;
    let mut worst = 0.0f64;
    let mut excused = Vec::new();
    for (i, &e) in errs.iter().enumerate() {
        if e > tol && ties[i] > 0 {
            excused.push(format!(
                "image {i}: {e:.1e}, {} near-tie window(s)",
                ties[i]
            ));
        } else {
            compared += 1;
            worst = worst.max(e);
        }
    }
    let note = if excused.is_empty() {
        String::new()
    } else {
        format!(" [excused at max-pool near-ties: {}]", excused.join("; "))
    };
    s.metric(format!("dx rel L2 per image ({path}){note}"), worst, tol);
    compared
}

/// Host outputs of [`check_model`]'s two GPU paths: `(logits, dx)` each.
pub struct ModelOutputs {
    /// Through the generic graph runner.
    pub runner: (Tensor, Tensor),
    /// Through the fused eval path.
    pub fused: (Tensor, Tensor),
}

/// Forward logits and input gradient of one model on `gpu` against the CPU,
/// through the generic graph runner and through the fused eval path.
pub fn check_model<D: Driver>(gpu: &GpuBackend<D>, case: &ModelCase) -> Result<Vec<Check>> {
    Ok(check_model_outputs(gpu, case)?.0)
}

/// [`check_model`], also returning both GPU paths' outputs (formula input,
/// labels `(3n + 1) mod classes`, mean cross-entropy).
pub fn check_model_outputs<D: Driver>(
    gpu: &GpuBackend<D>,
    case: &ModelCase,
) -> Result<(Vec<Check>, ModelOutputs)> {
    let graph = build(&ModelSpec::new(case.arch, case.input, case.classes))?;
    let params = formula_params(&graph);
    let x = formula_input(&graph.input_shape(case.batch));
    let (cl, cdx) = logits_and_input_grad(&CpuBackend, &graph, &params, &x)?;
    let ties = maxpool_near_ties(&graph, &params, &x, 1e-5)?;
    let group = format!(
        "{} {}x{}x{} batch {}",
        case.arch, case.input[0], case.input[1], case.input[2], case.batch
    );
    let mut s = Suite::new(gpu, &group, 0);
    let (ltol, gtol) = model_tolerances(case.deep);
    let (gl, gdx) = logits_and_input_grad(gpu, &graph, &params, &x)?;
    s.metric(
        "logits (graph runner)".into(),
        scaled_max_diff(gl.data(), cl.data()),
        ltol,
    );
    let mut compared = dx_check(&mut s, "graph runner", &gdx, &cdx, &ties, gtol);
    let fused = super::fused::FusedModel::new(gpu, &graph, &params)?;
    let n = case.batch;
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % case.classes).collect();
    let (fl, fdx) = fused.logits_and_input_grad(&x, &labels, &vec![1.0 / n as f32; n])?;
    s.metric(
        "logits (fused: BN folded, ReLU fused)".into(),
        scaled_max_diff(fl.data(), cl.data()),
        ltol,
    );
    compared += dx_check(&mut s, "fused", &fdx, &cdx, &ties, gtol);
    s.property("at least one input gradient compared", compared > 0);
    Ok((
        s.out,
        ModelOutputs {
            runner: (gl, gdx),
            fused: (fl, fdx),
        },
    ))
}

/// Positions where two signed steps differ although the reference
/// gradient's sign is unambiguous (|g| >= 1e-7 * max|g|).
pub fn mask_step_mismatches(got: &Tensor, want: &Tensor, want_grad: &Tensor) -> usize {
    let floor = 1e-7 * want_grad.max_abs();
    (0..want.len())
        .filter(|&i| want_grad.data()[i].abs() >= floor && got.data()[i] != want.data()[i])
        .count()
}

/// One batched search step (S = 3 searches of B = 4 images, three target
/// classes) of `case`'s model on `gpu` against the CPU: logits, mask
/// gradient and the stepped mask, through the search's own step: with the
/// GPU's fused runner (what the search uses) and with the generic graph
/// runner.
pub fn check_search_step<D: Driver>(gpu: &GpuBackend<D>, case: &ModelCase) -> Result<Vec<Check>> {
    let graph = build(&ModelSpec::new(case.arch, case.input, case.classes))?;
    let params = formula_params(&graph);
    let [c, h, w] = case.input;
    let (s, b) = (3usize, 4usize);
    let mut su = Suite::new(gpu, &format!("search step {} S={s} B={b}", case.arch), 7);
    let canvas = su.rand(&[s, c, h, w], 0.0, 1.0);
    let others = su.rand(&[s * b, c, h, w], 0.0, 1.0);
    let mask = Tensor::full(&[s, h, w], 0.5);
    let targets = [3usize, 0, 7].map(|t| t % case.classes);
    let cfg = MaskConfig {
        batch: b,
        ..MaskConfig::default()
    };
    let cpu_model = DeviceModel::upload(&CpuBackend, &graph, &params)?;
    let want = search_step(&cpu_model, &canvas, &mask, &others, &targets, &cfg)?;
    // The search's own model (the backend's fused runner), and the generic
    // graph runner on the same device.
    let native = DeviceModel::upload(gpu, &graph, &params)?;
    if !native.is_native() {
        return Err(Error::Msg("the GPU backend offered no fused runner".into()));
    }
    let got = search_step(&native, &canvas, &mask, &others, &targets, &cfg)?;
    let generic = DeviceModel::generic(gpu, &graph, native.into_params());
    let got_g = search_step(&generic, &canvas, &mask, &others, &targets, &cfg)?;
    let (ltol, gtol) = model_tolerances(case.deep);
    for (tag, g) in [
        ("search, fused runner", &got),
        ("generic graph runner", &got_g),
    ] {
        su.metric(
            format!("logits ({tag})"),
            scaled_max_diff(g.logits.data(), want.logits.data()),
            ltol,
        );
        su.metric(
            format!("dmask rel L2 ({tag})"),
            rel_l2(g.dmask.data(), want.dmask.data()),
            gtol,
        );
        let bad = mask_step_mismatches(&g.masks, &want.masks, &want.dmask);
        su.metric(format!("mask positions differing ({tag})"), bad as f64, 0.0);
    }
    Ok(su.out)
}

/// One training step (train-mode BN, all parameter gradients, SGD with
/// momentum) of `case`'s model on `gpu` against the CPU.
pub fn check_train_step<D: Driver>(gpu: &GpuBackend<D>, case: &ModelCase) -> Result<Vec<Check>> {
    let graph = build(&ModelSpec::new(case.arch, case.input, case.classes))?;
    let params = formula_params(&graph);
    let n = case.batch.max(2);
    let x = formula_input(&graph.input_shape(n));
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % case.classes).collect();
    let sgd = SgdParams {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    fn step<B: Backend>(
        be: &B,
        graph: &Graph,
        params: &[Tensor],
        x: &Tensor,
        labels: &[usize],
        sgd: SgdParams,
    ) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>, Tensor)> {
        let mut p = params
            .iter()
            .map(|t| be.upload(t))
            .collect::<Result<Vec<_>>>()?;
        let n = labels.len();
        let trace = graph.forward_train(be, &mut p, be.upload(x)?, 0.1)?;
        let (_, dl) = be.softmax_cross_entropy(trace.logits(), labels, &vec![1.0 / n as f32; n])?;
        let grads = graph.backward(be, &p, &trace, dl, true)?;
        let dx = be.download(&grads.dx)?;
        let mut host_grads = Vec::new();
        for (i, g) in grads.params.iter().enumerate() {
            host_grads.push(g.as_ref().map(|g| be.download(g)).transpose()?);
            if let Some(g) = g {
                let mut v = be.zeros(be.shape(g))?;
                let decay = if graph.params[i].kind.decays() {
                    sgd.weight_decay
                } else {
                    0.0
                };
                be.sgd_step(
                    &mut p[i],
                    g,
                    &mut v,
                    SgdParams {
                        weight_decay: decay,
                        ..sgd
                    },
                )?;
            }
        }
        let after = p
            .iter()
            .map(|b| be.download(b))
            .collect::<Result<Vec<_>>>()?;
        Ok((after, host_grads, dx))
    }
    let (cp, cg, cdx) = step(&CpuBackend, &graph, &params, &x, &labels, sgd)?;
    let (gp, gg, gdx) = step(gpu, &graph, &params, &x, &labels, sgd)?;
    let mut su = Suite::new(gpu, &format!("train step {} batch {n}", case.arch), 0);
    let (_, gtol) = model_tolerances(case.deep);
    su.metric("dx rel L2".into(), rel_l2(gdx.data(), cdx.data()), gtol);
    // Gradients that are analytically zero (a conv bias feeding train-mode
    // batch norm: the normalisation removes any constant) come out of both
    // implementations as rounding noise, where a relative error means
    // nothing; they are held to an absolute 1e-6 of the largest gradient.
    let norm = |t: &Tensor| {
        t.data()
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let big = cg.iter().flatten().map(norm).fold(0.0f64, f64::max);
    let (mut worst_g, mut worst_zero, mut worst_p, mut count) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for i in 0..params.len() {
        match (&gg[i], &cg[i]) {
            (Some(g), Some(c)) if norm(c) < 1e-6 * big => {
                let d: Vec<f32> = g.data().iter().zip(c.data()).map(|(a, b)| a - b).collect();
                worst_zero = worst_zero.max(norm(&Tensor::new(g.shape(), d)?) / (1e-6 * big));
            }
            (Some(g), Some(c)) => {
                worst_g = worst_g.max(rel_l2(g.data(), c.data()));
                count += 1;
            }
            (None, None) => {}
            _ => worst_g = f64::INFINITY,
        }
        worst_p = worst_p.max(rel_l2(gp[i].data(), cp[i].data()));
    }
    su.metric(
        format!("worst parameter gradient rel L2 ({count} tensors)"),
        worst_g,
        gtol,
    );
    su.metric(
        "analytically zero gradients: |diff| / (1e-6 max |grad|)".into(),
        worst_zero,
        1.0,
    );
    su.metric(
        "worst parameter/running statistic after the step, rel L2".into(),
        worst_p,
        gtol,
    );
    Ok(su.out)
}

/// What [`run_suite`] runs.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// Op families only (no model-level checks).
    pub ops_only: bool,
    /// Images per batch of the model checks (`None`: the small CI batches).
    pub batch: Option<usize>,
    /// Seed of the random op inputs.
    pub seed: u64,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            ops_only: false,
            batch: None,
            seed: 0x5eed,
        }
    }
}

/// The whole equivalence suite on `gpu`: every op family, every zoo model,
/// one batched search step and one training step. `progress` hears what
/// runs next. A check that cannot run (an error) is itself a failed check.
pub fn run_suite<D: Driver>(
    gpu: &GpuBackend<D>,
    opts: &SuiteOptions,
    progress: &mut dyn FnMut(&str),
) -> Vec<Check> {
    let mut out = Vec::new();
    let push = |group: &str, r: Result<Vec<Check>>, out: &mut Vec<Check>| match r {
        Ok(c) => out.extend(c),
        Err(e) => out.push(Check {
            group: group.to_string(),
            name: format!("error: {e}"),
            max_err: f64::INFINITY,
            ratio: f64::INFINITY,
            pass: false,
        }),
    };
    for f in OP_FAMILIES {
        progress(&format!("ops: {f}"));
        push(f, check_ops(gpu, f, opts.seed), &mut out);
    }
    if opts.ops_only {
        return out;
    }
    for mut case in zoo_cases() {
        if let Some(b) = opts.batch {
            case.batch = b;
        }
        progress(&format!(
            "model: {} {:?} batch {}",
            case.arch, case.input, case.batch
        ));
        push(case.arch, check_model(gpu, &case), &mut out);
    }
    let small = zoo_cases().into_iter().next().expect("zoo cases");
    progress("search step");
    push("search step", check_search_step(gpu, &small), &mut out);
    progress("training step");
    push("train step", check_train_step(gpu, &small), &mut out);
    out
}

/// The checks as a table: group, name, max error, error/bound, verdict.
pub fn format_checks(checks: &[Check]) -> String {
    let mut s = format!(
        "{:<44} {:<66} {:>11} {:>9}  result\n",
        "group", "check", "max err", "err/bound"
    );
    for c in checks {
        s += &format!(
            "{:<44} {:<66} {:>11.3e} {:>9.3}  {}\n",
            c.group,
            c.name,
            c.max_err,
            c.ratio,
            if c.pass { "ok" } else { "FAIL" }
        );
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    s += &format!("{} checks, {} failed\n", checks.len(), failed);
    s
}
