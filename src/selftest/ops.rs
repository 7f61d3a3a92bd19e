//! The op half of the suite: every op of [`Backend`] on random shapes (odd
//! ones included), GPU against the CPU reference, each element under its own
//! bound (see the module above for how the bounds are derived).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod graph_ops;

use super::{gamma, Check, U};
use crate::backend::cpu::CpuBackend;
use crate::backend::gpu::{Driver, GpuBackend, GpuBuf};
use crate::backend::{Backend, ConvParams, PoolParams, Precision, SgdParams};
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};

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
    "activation",
    "mul",
    "affine",
    "concat",
    "pad",
];

/// `(n, c, h, w, o, k, params)` of a convolution case.
type ConvCase = (usize, usize, usize, usize, usize, usize, ConvParams);

/// The recorder of one group of checks, with the two backends and the
/// random source of its inputs (the model half records through it too).
pub(super) struct Suite<'a, D: Driver> {
    gpu: &'a GpuBackend<D>,
    cpu: CpuBackend,
    rng: ChaCha8Rng,
    group: String,
    pub(super) out: Vec<Check>,
}

fn abs(t: &Tensor) -> Tensor {
    Tensor::from_fn(t.shape(), |i| t.data()[i].abs())
}

fn conv_shape(s: &[usize], o: usize, k: usize, p: ConvParams) -> Vec<usize> {
    vec![s[0], o, p.out_len(s[2], k), p.out_len(s[3], k)]
}

impl<'a, D: Driver> Suite<'a, D> {
    pub(super) fn new(gpu: &'a GpuBackend<D>, group: &str, seed: u64) -> Self {
        Suite {
            gpu,
            cpu: CpuBackend::REFERENCE,
            rng: ChaCha8Rng::seed_from_u64(seed),
            group: group.to_string(),
            out: Vec::new(),
        }
    }

    /// A random tensor, uniform in `[lo, hi)`.
    pub(super) fn rand(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
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

    /// Bound, relative to `sum |terms|`, between a `k`-term dot product of
    /// the GPU's convolutions or linear layers and the CPU's: `2·γ(k+2)` in
    /// fp32; in the tensor-core modes the operand rounding of
    /// [`Precision::dot_bound`] on top.
    fn dot(&self, k: usize) -> f64 {
        match self.gpu.precision() {
            Precision::Fp32 => 2.0 * gamma(k + 2),
            p => p.dot_bound(1.0, k),
        }
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
    pub(super) fn metric(&mut self, name: String, value: f64, tol: f64) {
        self.out.push(Check {
            group: self.group.clone(),
            name,
            max_err: value,
            ratio: if value == 0.0 { 0.0 } else { value / tol },
            pass: value <= tol,
        });
    }

    /// Records a yes/no property.
    pub(super) fn property(&mut self, name: &str, holds: bool) {
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
        self.rows()
    }

    /// What a search step runs on without the host: a batch gathered by
    /// row index, results written into a row of a window buffer, and
    /// non-finite values counted, each at the step a cursor on the device
    /// holds; and a recorded step replayed.
    fn rows(&mut self) -> Result<()> {
        let src = self.rand(&[6, 2, 3, 1], -1.0, 1.0);
        let idx = vec![5u32, 0, 3, 3, 1, 2];
        let (ccur, gcur) = (vec![1u32], self.gpu.upload_index(&[1])?);
        let gidx = self.gpu.upload_index(&idx)?;
        let gsrc = self.up(&src)?;
        let want = self.cpu.gather_rows(&src, &idx, &ccur, 3)?;
        let got = self.down(&self.gpu.gather_rows(&gsrc, &gidx, &gcur, 3)?)?;
        self.cmp("gather_rows", &got, &want, |_| 0.0);
        let outside = self.gpu.upload_index(&[2, 6])?;
        let first = self.gpu.upload_index(&[0])?;
        let got = self.down(&self.gpu.gather_rows(&gsrc, &outside, &first, 2)?)?;
        self.property(
            "a row index outside the source gives a NaN row, never another row",
            got.data()[..6].iter().all(|v| v.is_finite())
                && got.data()[6..].iter().all(|v| v.is_nan()),
        );
        let got = self.down(&self.gpu.gather_rows(&gsrc, &gidx, &gcur, 4)?)?;
        self.property(
            "a cursor past the index gives NaN rows",
            got.data()[12..].iter().all(|v| v.is_nan()),
        );
        self.property(
            "an index beyond 32-bit signed is refused",
            self.gpu.upload_index(&[1u32 << 31]).is_err(),
        );

        let part = self.rand(&[2, 3], -1.0, 1.0);
        let mut want = Tensor::zeros(&[3, 6]);
        self.cpu.write_row(&mut want, &ccur, &part)?;
        let mut dst = self.gpu.zeros(&[3, 6])?;
        let sharing = self.gpu.reshape(&dst, &[18])?;
        self.gpu.write_row(&mut dst, &gcur, &self.up(&part)?)?;
        self.cmp("write_row", &self.down(&dst)?, &want, |_| 0.0);
        self.cmp(
            "write_row leaves a sharing buffer unchanged",
            &self.down(&sharing)?,
            &Tensor::zeros(&[18]),
            |_| 0.0,
        );
        self.property(
            "write_row of a row of another size is refused",
            self.gpu
                .write_row(&mut dst, &gcur, &self.up(&Tensor::zeros(&[5]))?)
                .is_err(),
        );

        let mut x = self.rand(&[1031], -1.0, 1.0);
        for (i, v) in [
            (0, f32::NAN),
            (255, f32::INFINITY),
            (256, -f32::INFINITY),
            (1030, f32::NAN),
        ] {
            x.data_mut()[i] = v;
        }
        x.data_mut()[7] = f32::MAX;
        let mut want = Tensor::new(&[2, 2], vec![1.0, 0.0, 2.0, 5.0])?;
        let mut got = self.up(&want)?;
        let gx = self.up(&x)?;
        for slot in [1, 0, 1] {
            self.cpu.count_nonfinite(&x, &mut want, &ccur, slot)?;
            self.gpu.count_nonfinite(&gx, &mut got, &gcur, slot)?;
        }
        self.cmp("count_nonfinite", &self.down(&got)?, &want, |_| 0.0);

        // Three steps of "gather the cursor's rows, add them to an
        // accumulator, move on": the first run op by op, the second
        // recorded, the third replayed, as a search window runs them.
        let table = [4u32, 1, 0, 5, 2, 2];
        let want = recorded_steps(&self.cpu, &src, &table)?;
        let got = recorded_steps(self.gpu, &src, &table)?;
        self.cmp(
            "three steps, one recorded and replayed",
            &got,
            &want,
            |_| 0.0,
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
        let wt = self.rand(&[o, c / p.groups, k, k], -0.5, 0.5);
        let b = self.rand(&[o], -0.5, 0.5);
        let (gx, gw, gb) = (self.up(&x)?, self.up(&wt)?, self.up(&b)?);
        let tag = if p.is_dense() {
            format!("k{k} s{} p{}", p.stride, p.pad)
        } else {
            format!(
                "k{k} s{} p{} g{} d{}",
                p.stride, p.pad, p.groups, p.dilation
            )
        };
        let kf = c / p.groups * k * k;
        let bound_f = self.dot(kf);

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
        let want = self
            .cpu
            .conv2d_fused(&x, &wt, Some(&b), Some(&res), true, p)?;
        let got = self.down(&self.gpu.conv2d_fused(
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
        let kd = o / p.groups * k * k;
        let bound_d = self.dot(kd);
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
        let want = self
            .cpu
            .conv2d_fused_backward_data(&dy, &wt, Some(&y), x.shape(), p)?;
        let absref = self
            .cpu
            .conv2d_backward_data(&abs(&masked), &abs(&wt), x.shape(), p)?;
        let got = self.down(&self.gpu.conv2d_fused_backward_data(
            &gdy,
            &gw,
            Some(&self.up(&y)?),
            x.shape(),
            p,
        )?)?;
        self.cmp(
            &format!("conv2d_backward_data relu-masked {tag}"),
            &got,
            &want,
            |i| bound_d * absref.data()[i] as f64,
        );

        // backward filter and bias
        let kw_ = n * yshape[2] * yshape[3];
        let bound_w = self.dot(kw_);
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
        let cp = ConvParams::new;
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
            // K of 2048 and more: forward and dgrad split K (3 chunks each
            // here, strided too), a 1x1 from 2048 channels into 2.
            (2, 240, 3, 3, 232, 3, cp(1, 1)),
            (3, 256, 4, 4, 256, 3, cp(2, 1)),
            (2, 2048, 2, 2, 20, 1, cp(1, 0)),
        ];
        for case in cases {
            self.conv_case(case)?;
        }
        // Grouped and dilated (conv_grouped.cu): depthwise 3x3 stride 1 and
        // 2 (MobileNet, EfficientNet), depthwise 5x5, a channel multiplier,
        // groups 2 and 4, dilation 2 with and without groups, a plane over
        // one 256-thread tile, and a batch long enough to split wgrad.
        let grouped = [
            (2, 6, 9, 7, 6, 3, cp(1, 1).with_groups(6)),
            (3, 8, 10, 9, 8, 3, cp(2, 1).with_groups(8)),
            (1, 5, 11, 12, 5, 5, cp(2, 2).with_groups(5)),
            (2, 3, 7, 8, 6, 3, cp(1, 1).with_groups(3)),
            (2, 4, 9, 6, 6, 3, cp(1, 0).with_groups(2)),
            (1, 8, 8, 9, 12, 3, cp(2, 1).with_groups(4)),
            (2, 3, 10, 9, 5, 3, cp(1, 2).with_dilation(2)),
            (1, 4, 11, 11, 8, 3, cp(1, 2).with_dilation(2).with_groups(4)),
            (1, 2, 20, 17, 2, 3, cp(1, 1).with_groups(2)),
            (40, 2, 12, 12, 2, 3, cp(1, 1).with_groups(2)),
        ];
        for case in grouped {
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
        // Batch invariance: image 1 alone gives the same bits as in a batch,
        // also where K is split (forward and dgrad: the split follows K
        // alone, never the batch).
        self.batch_invariance("conv2d", [3, 5, 9, 9], 12, false)?;
        self.batch_invariance("conv2d with K split", [3, 240, 3, 3], 232, false)?;
        self.batch_invariance(
            "conv2d_backward_data with K split",
            [3, 240, 3, 3],
            232,
            true,
        )?;
        Ok(())
    }

    /// Checks that image 1 of a 3x3 padding-1 convolution of `x` (`o`
    /// output channels; its input gradient when `dgrad`) has the same bits
    /// alone as inside the batch.
    fn batch_invariance(&mut self, what: &str, x: [usize; 4], o: usize, dgrad: bool) -> Result<()> {
        let p = ConvParams::new(1, 1);
        let wt = self.rand(&[o, x[1], 3, 3], -0.5, 0.5);
        let gw = self.up(&wt)?;
        let run = |this: &mut Self, t: &Tensor, one: bool| -> Result<Tensor> {
            let n = if one { 1 } else { x[0] };
            let got = if dgrad {
                this.gpu
                    .conv2d_backward_data(&this.up(t)?, &gw, &[n, x[1], x[2], x[3]], p)?
            } else {
                this.gpu.conv2d(&this.up(t)?, &gw, None, p)?
            };
            this.down(&got)
        };
        // dgrad's input is a dy of the output's shape (3x3, padding 1: the same).
        let input = self.rand(&[x[0], if dgrad { o } else { x[1] }, x[2], x[3]], -1.0, 1.0);
        let all = run(self, &input, false)?;
        let one = run(self, &input.slice_rows(1, 2), true)?;
        self.property(
            &format!("{what} batch invariant (bitwise)"),
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
            let bound = self.dot(k);
            self.cmp(
                "linear",
                &self.down(&self.gpu.linear(&gx, &gw, Some(&gb))?)?,
                &want,
                |i| bound * absref.data()[i] as f64,
            );
            let want = self.cpu.linear_backward_data(&dy, &w)?;
            let absref = self.cpu.linear_backward_data(&abs(&dy), &abs(&w))?;
            let bound = self.dot(o);
            self.cmp(
                "linear_backward_data",
                &self.down(&self.gpu.linear_backward_data(&gdy, &gw)?)?,
                &want,
                |i| bound * absref.data()[i] as f64,
            );
            let (ww, wb) = self.cpu.linear_backward_weight(&x, &dy, true)?;
            let (aw, ab) = self.cpu.linear_backward_weight(&abs(&x), &abs(&dy), true)?;
            let (gw2, gb2) = self.gpu.linear_backward_weight(&gx, &gdy, true)?;
            let bound = self.dot(n);
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
            if shape.len() == 4 {
                self.fold_bn_case(&shape, &gamma_, &beta, &mean, &var)?;
            }
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

    /// BN folded into a conv `[o, c, kh, kw]` (the BN's channels as output
    /// channels), with and without the conv's bias. The scale is computed
    /// identically on both sides; each weight is one product with it, each
    /// bias `(b - mean) * s + beta` (a product that may be fused on the GPU).
    fn fold_bn_case(
        &mut self,
        shape: &[usize],
        gamma_: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
    ) -> Result<()> {
        let o = shape[1];
        let wshape = [o, shape[0], shape[2], shape[3]];
        let w = self.rand(&wshape, -1.0, 1.0);
        let b = self.rand(&[o], -1.0, 1.0);
        let eps = 1e-5f32;
        let scale: Vec<f64> = (0..o)
            .map(|k| (gamma_.data()[k] as f64 / (var.data()[k] as f64 + eps as f64).sqrt()).abs())
            .collect();
        let g = |t: &Tensor| self.up(t);
        let (gw, gb, gg, gbt, gm, gv) = (g(&w)?, g(&b)?, g(gamma_)?, g(beta)?, g(mean)?, g(var)?);
        for bias in [true, false] {
            let (ww, wb) =
                self.cpu
                    .fold_bn(&w, bias.then_some(&b), gamma_, beta, mean, var, eps)?;
            let (w2, b2) = self
                .gpu
                .fold_bn(&gw, bias.then_some(&gb), &gg, &gbt, &gm, &gv, eps)?;
            self.cmp(
                &format!("fold_bn weight (bias {bias})"),
                &self.down(&w2)?,
                &ww,
                |i| 4.0 * U * ww.data()[i].abs() as f64,
            );
            self.cmp(
                &format!("fold_bn bias (bias {bias})"),
                &self.down(&b2)?,
                &wb,
                |k| {
                    let bk = if bias { b.data()[k] } else { 0.0 };
                    8.0 * U
                        * ((bk - mean.data()[k]).abs() as f64 * scale[k]
                            + beta.data()[k].abs() as f64)
                },
            );
        }
        Ok(())
    }

    fn pool(&mut self) -> Result<()> {
        let pp = PoolParams::new;
        for (shape, p) in [
            ([2usize, 3, 9, 7], pp(3, 2, 1)),
            ([1, 2, 8, 8], pp(2, 2, 0)),
            ([2, 2, 7, 6], pp(3, 1, 1)),
            ([1, 3, 10, 9], pp(5, 3, 2)),
            // ceil_mode (odd extents: a last window over the edge) and
            // average pooling without the padding in the divisor.
            ([2, 3, 9, 7], pp(3, 2, 1).with_ceil_mode(true)),
            ([1, 2, 7, 9], pp(2, 2, 0).with_ceil_mode(true)),
            ([2, 2, 8, 7], pp(3, 2, 1).with_count_include_pad(false)),
            (
                [1, 3, 10, 9],
                pp(3, 2, 1)
                    .with_ceil_mode(true)
                    .with_count_include_pad(false),
            ),
            ([1, 2, 11, 10], pp(5, 3, 2).with_ceil_mode(true)),
        ] {
            let mut x = self.rand(&shape, -1.0, 1.0);
            // Ties: the first maximum of a window wins on both sides.
            x.data_mut()[5] = x.data()[4];
            let gx = self.up(&x)?;
            let tag = format!(
                "k{} s{} p{}{}{}",
                p.kernel,
                p.stride,
                p.pad,
                if p.ceil_mode { " ceil" } else { "" },
                if p.count_include_pad {
                    ""
                } else {
                    " exclude-pad"
                }
            );
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
        // On the device no label is checked: one out of range makes its
        // row NaN (the step's finiteness count reports it), nothing else.
        let logits = self.rand(&[2, 5], -2.0, 2.0);
        let labels = self.gpu.upload_index(&[1, 5])?;
        let weights = self.up(&Tensor::full(&[2], 0.5))?;
        let (gl, gd) =
            self.gpu
                .softmax_cross_entropy_on_device(&self.up(&logits)?, &labels, &weights)?;
        let (gl, gd) = (self.down(&gl)?, self.down(&gd)?);
        self.property(
            "softmax_cross_entropy_on_device: a label out of range gives a NaN row only",
            gl.data()[0].is_finite()
                && gl.data()[1].is_nan()
                && gd.data()[..5].iter().all(|v| v.is_finite())
                && gd.data()[5..].iter().all(|v| v.is_nan()),
        );
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
            // The same additions in the same order, then one product (no
            // multiply-add to fuse): identical bits.
            let want = self.cpu.pattern_grad(&dx, &mask)?;
            let got = self.down(&self.gpu.pattern_grad(&self.up(&dx)?, &gm)?)?;
            self.cmp("pattern_grad", &got, &want, |_| 0.0);
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
        let cp = ConvParams::new(1, 0);
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
        let (dx, m) = (t(&[5, 2, 3, 3]), t(&[2, 3, 3]));
        self.property(
            "pattern_grad of 5 images for 2 searches: both refuse",
            self.cpu.pattern_grad(&dx, &m).is_err()
                && self
                    .gpu
                    .pattern_grad(&self.up(&dx)?, &self.up(&m)?)
                    .is_err(),
        );
        self.property(
            "pool larger than the padded input refused",
            self.gpu
                .max_pool2d(&self.up(&t(&[1, 1, 2, 2]))?, PoolParams::new(3, 1, 0))
                .is_err(),
        );
        Ok(())
    }
}

/// Runs one op family of the suite (see [`OP_FAMILIES`]) on `gpu`.
/// Three steps that each add the cursor's two rows of `src` (by `table`)
/// to an accumulator: the first run op by op, the second through
/// [`Backend::record`], the third replayed (the two run op by op where
/// nothing is recorded). The accumulator comes back.
fn recorded_steps<B: Backend>(be: &B, src: &Tensor, table: &[u32]) -> Result<Tensor> {
    let src = be.upload(src)?;
    let table = be.upload_index(table)?;
    let mut cursor = be.upload_index(&[0])?;
    let mut shape = be.shape(&src).to_vec();
    shape[0] = 2;
    let mut acc = be.zeros(&shape)?;
    let mut step = || -> Result<()> {
        let rows = be.gather_rows(&src, &table, &cursor, 2)?;
        be.add_assign(&mut acc, &rows)?;
        be.advance_cursor(&mut cursor)
    };
    step()?;
    match be.record(&mut step)? {
        Some(r) => be.replay(&r)?,
        None => {
            step()?;
            step()?;
        }
    }
    be.download(&acc)
}

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
        "activation" => s.activation()?,
        "mul" => s.mul()?,
        "affine" => s.affine()?,
        "concat" => s.concat()?,
        "pad" => s.pad()?,
        other => {
            return Err(Error::arg(
                "family",
                format!("unknown op family `{other}` ({})", OP_FAMILIES.join(", ")),
            ))
        }
    }
    Ok(s.out)
}
