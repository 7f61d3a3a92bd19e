//! The CPU reference backend: plain NCHW `f32`, im2col + GEMM for
//! convolutions, rayon for threads. It is the oracle for the GPU path and the
//! path every CI run uses.
//!
//! Two properties hold for every op and are tested:
//! - **Batch invariance**: except for train-mode batch norm and the
//!   parameter-gradient reductions, the result for image `i` is bitwise the
//!   same whether it is computed alone or inside a larger batch. Each image
//!   (or row) goes through arithmetic of the same shape, whatever the batch.
//! - **Thread-count independence**: work is split into chunks whose sizes
//!   depend on the shapes only, each chunk is computed sequentially, and
//!   partial results are combined in a fixed order, so a pool of one thread
//!   and a pool of many give the same bits.

mod activation;
mod chain_gemm;
mod conv;
mod conv_grouped;
mod elementwise;
mod filter_cache;
mod layout;
mod linear;
mod loss;
mod mask;
mod norm;
mod optim;
mod pool;
mod rows;
mod scale;
#[cfg(test)]
mod testutil;
mod winograd;

use std::cell::RefCell;

use crate::backend::{Activation, Backend, BnSaved, ConvParams, Pad2d, PoolParams, SgdParams};
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};

/// The CPU reference backend.
///
/// On first use (upload, convolution or linear layer) it calls
/// [`tune_allocator`]: each op returns a fresh tensor, and with glibc's
/// default settings the freed activations go back to the kernel and come
/// back as page faults, which cost a third of a ResNet step.
///
/// `CpuBackend::REFERENCE` is the reference: every forward convolution is
/// computed directly. [`CpuBackend::with_winograd_forward`] lets the
/// eval-mode fused graph's 3x3 convolutions (what searches, scans and
/// evaluations run) take Winograd F(4x4,3x3), about 1.15x the search
/// steps per second on resnet18, at the cost of decisions that can flip at
/// near-ties (see `conv::conv2d_fused`): `cwp --cpu-forward winograd`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    winograd_forward: bool,
}

impl CpuBackend {
    /// The reference: every forward convolution direct (also `default()`).
    pub const REFERENCE: CpuBackend = CpuBackend {
        winograd_forward: false,
    };

    /// The same backend with the fused forward convolutions on Winograd
    /// (`on`) or direct. Train-mode graphs never run fused convolutions, so
    /// training keeps the direct forward either way: with batch-statistics
    /// batch norm over a few images, Winograd's few-ulp differences grow to
    /// percent-level changes of the gradients (the train-mode fixtures' own
    /// conditioning), which no gate has vetted.
    pub fn with_winograd_forward(self, on: bool) -> CpuBackend {
        CpuBackend {
            winograd_forward: on,
        }
    }

    /// Whether fused forward convolutions take Winograd where it applies.
    pub fn winograd_forward(&self) -> bool {
        self.winograd_forward
    }
}

/// Asks the C allocator to keep freed memory for reuse instead of returning
/// it to the kernel: glibc's `mallopt` with no block served by its own
/// `mmap` and trimming off. glibc otherwise maps every block over 32 MiB
/// (its largest mmap threshold) afresh and unmaps it when freed, so a
/// search step's activations (51 MB a tensor for resnet50 at 224x224 with
/// 16 images) came back as new pages on every step, and the kernel's
/// faulting and zeroing of them took 9% of the step. The process then holds
/// on to its peak heap, which suits a one-shot tool. Runs once per process;
/// does nothing outside glibc Linux.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets allocator parameters (under glibc's
        // own lock); both values are within the ranges glibc accepts, and
        // -1 for the trim threshold turns trimming off.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        });
    }
}

impl Backend for CpuBackend {
    type Buf = Tensor;
    type Index = Vec<u32>;
    type Recording = ();

    fn name(&self) -> String {
        "cpu".into()
    }

    fn numerics(&self) -> String {
        if self.winograd_forward {
            "cpu fp32 winograd-forward".into()
        } else {
            "cpu fp32".into()
        }
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        tune_allocator();
        Ok(t.clone())
    }

    fn download(&self, b: &Tensor) -> Result<Tensor> {
        Ok(b.clone())
    }

    fn upload_index(&self, v: &[u32]) -> Result<Vec<u32>> {
        Ok(v.to_vec())
    }

    fn gather_rows(
        &self,
        src: &Tensor,
        index: &Vec<u32>,
        cursor: &Vec<u32>,
        n: usize,
    ) -> Result<Tensor> {
        rows::gather(src, index, cursor, n)
    }

    fn write_row(&self, dst: &mut Tensor, cursor: &Vec<u32>, src: &Tensor) -> Result<()> {
        rows::write_row(dst, cursor, src)
    }

    fn count_nonfinite(
        &self,
        x: &Tensor,
        counts: &mut Tensor,
        cursor: &Vec<u32>,
        slot: usize,
    ) -> Result<()> {
        rows::count_nonfinite(x, counts, cursor, slot)
    }

    fn advance_cursor(&self, cursor: &mut Vec<u32>) -> Result<()> {
        rows::next(cursor)
    }

    /// Ops run as they are called: nothing to record (and `f` not run).
    fn record(&self, _: &mut dyn FnMut() -> Result<()>) -> Result<Option<()>> {
        Ok(None)
    }

    fn replay(&self, _: &()) -> Result<()> {
        Err(Error::Msg(
            "the CPU backend records nothing to replay; run the work again".into(),
        ))
    }

    fn shape<'a>(&self, b: &'a Tensor) -> &'a [usize] {
        b.shape()
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(shape))
    }

    fn reshape(&self, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != x.len() {
            return Err(Error::Msg(format!(
                "reshape: cannot view {:?} ({} values) as {shape:?} ({} values)",
                x.shape(),
                x.len(),
                numel(shape)
            )));
        }
        x.clone().reshape(shape)
    }

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        p: ConvParams,
    ) -> Result<Tensor> {
        tune_allocator();
        conv::conv2d(x, w, bias, p)
    }

    fn conv2d_backward_data(
        &self,
        dy: &Tensor,
        w: &Tensor,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<Tensor> {
        conv::conv2d_backward_data(dy, w, x_shape, p)
    }

    fn conv2d_backward_filter(
        &self,
        x: &Tensor,
        dy: &Tensor,
        w_shape: &[usize],
        p: ConvParams,
        with_bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        conv::conv2d_backward_filter(x, dy, w_shape, p, with_bias)
    }

    fn conv2d_fused(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        relu: bool,
        p: ConvParams,
    ) -> Result<Tensor> {
        tune_allocator();
        conv::conv2d_fused(x, w, bias, residual, relu, p, self.winograd_forward)
    }

    fn conv2d_fused_backward_data(
        &self,
        dy: &Tensor,
        w: &Tensor,
        relu_y: Option<&Tensor>,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<Tensor> {
        conv::conv2d_gated_backward_data(dy, relu_y, w, x_shape, p)
    }

    fn fold_bn(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        norm::fold_bn(w, b, gamma, beta, mean, var, eps)
    }

    fn batch_norm_eval(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        norm::batch_norm_eval(x, gamma, beta, mean, var, eps)
    }

    fn batch_norm_eval_backward(
        &self,
        dy: &Tensor,
        gamma: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        norm::batch_norm_eval_backward(dy, gamma, var, eps)
    }

    fn batch_norm_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> Result<(Tensor, BnSaved<Tensor>)> {
        norm::batch_norm_train(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_relu(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> Result<(Tensor, BnSaved<Tensor>)> {
        norm::batch_norm_train(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            true,
        )
    }

    fn batch_norm_train_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        gamma: &Tensor,
        saved: &BnSaved<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        norm::batch_norm_train_backward(dy, x, gamma, saved)
    }

    fn batch_norm_train_backward_owned(
        &self,
        dy: Tensor,
        x: &Tensor,
        gamma: &Tensor,
        saved: &BnSaved<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        norm::batch_norm_train_backward_owned(dy, x, gamma, saved)
    }

    fn relu(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::relu(x)
    }

    fn relu_backward(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        elementwise::relu_backward(dy, y)
    }

    fn relu_owned(&self, x: Tensor) -> Result<Tensor> {
        Ok(elementwise::relu_in_place(x))
    }

    fn relu_backward_owned(&self, dy: Tensor, y: &Tensor) -> Result<Tensor> {
        elementwise::relu_backward_in_place(dy, y)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::add(a, b)
    }

    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()> {
        elementwise::add_assign(a, b)
    }

    fn max_pool2d(&self, x: &Tensor, p: PoolParams) -> Result<Tensor> {
        pool::max_pool2d(x, p)
    }

    fn max_pool2d_backward(&self, x: &Tensor, dy: &Tensor, p: PoolParams) -> Result<Tensor> {
        pool::max_pool2d_backward(x, dy, p, false)
    }

    fn max_pool2d_relu_backward(&self, x: &Tensor, dy: &Tensor, p: PoolParams) -> Result<Tensor> {
        pool::max_pool2d_backward(x, dy, p, true)
    }

    fn avg_pool2d(&self, x: &Tensor, p: PoolParams) -> Result<Tensor> {
        pool::avg_pool2d(x, p)
    }

    fn avg_pool2d_backward(&self, dy: &Tensor, x_shape: &[usize], p: PoolParams) -> Result<Tensor> {
        pool::avg_pool2d_backward(dy, x_shape, p)
    }

    fn global_avg_pool(&self, x: &Tensor) -> Result<Tensor> {
        pool::global_avg_pool(x)
    }

    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
        pool::global_avg_pool_backward(dy, x_shape)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        tune_allocator();
        linear::linear(x, w, bias)
    }

    fn linear_backward_data(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        linear::linear_backward_data(dy, w)
    }

    fn linear_backward_weight(
        &self,
        x: &Tensor,
        dy: &Tensor,
        with_bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        linear::linear_backward_weight(x, dy, with_bias)
    }

    fn normalize(&self, x: &Tensor, mean: &[f32], std: &[f32]) -> Result<Tensor> {
        norm::normalize(x, mean, std)
    }

    fn normalize_backward(&self, dy: &Tensor, std: &[f32]) -> Result<Tensor> {
        norm::normalize_backward(dy, std)
    }

    fn softmax_cross_entropy_on_device(
        &self,
        logits: &Tensor,
        labels: &Vec<u32>,
        weights: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        let (losses, dlogits) = loss::softmax_cross_entropy(logits, &labels, weights.data())?;
        Ok((Tensor::new(&[losses.len()], losses)?, dlogits))
    }

    fn composite(&self, canvas: &Tensor, mask: &Tensor, others: &Tensor) -> Result<Tensor> {
        mask::composite(canvas, mask, others)
    }

    fn mask_grad(
        &self,
        dx: &Tensor,
        canvas: &Tensor,
        others: &Tensor,
        l1_grad: f32,
    ) -> Result<Tensor> {
        mask::mask_grad(dx, canvas, others, l1_grad)
    }

    fn pattern_grad(&self, dx: &Tensor, mask: &Tensor) -> Result<Tensor> {
        mask::pattern_grad(dx, mask)
    }

    fn sign_step_clamp(&self, mask: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        mask::sign_step_clamp(mask, grad, lr)
    }

    fn sgd_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        velocity: &mut Tensor,
        p: SgdParams,
    ) -> Result<()> {
        optim::sgd_step(param, grad, velocity, p)
    }

    fn pgd_step(
        &self,
        x: &mut Tensor,
        grad: &Tensor,
        x0: &Tensor,
        step: f32,
        eps: f32,
    ) -> Result<()> {
        optim::pgd_step(x, grad, x0, step, eps)
    }

    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        activation::activation(x, act)
    }

    fn activation_backward(&self, dy: &Tensor, x: &Tensor, act: Activation) -> Result<Tensor> {
        activation::activation_backward(dy, x, act)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        scale::mul(a, b)
    }

    fn mul_backward(&self, dy: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        scale::mul_backward(dy, a, b)
    }

    fn affine(&self, x: &Tensor, scale: &[f32], shift: &[f32]) -> Result<Tensor> {
        scale::affine(x, scale, shift)
    }

    fn affine_backward(&self, dy: &Tensor, scale: &[f32]) -> Result<Tensor> {
        scale::affine_backward(dy, scale)
    }

    fn concat(&self, xs: &[&Tensor]) -> Result<Tensor> {
        layout::concat(xs)
    }

    fn concat_backward(&self, dy: &Tensor, channels: &[usize]) -> Result<Vec<Tensor>> {
        layout::concat_backward(dy, channels)
    }

    fn pad2d(&self, x: &Tensor, p: Pad2d) -> Result<Tensor> {
        layout::pad2d(x, p)
    }

    fn pad2d_backward(&self, dy: &Tensor, p: Pad2d) -> Result<Tensor> {
        layout::pad2d_backward(dy, p)
    }
}

use crate::backend::check::{dims2, dims4};

/// Fails unless `t` has exactly `shape`.
fn expect_shape(name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    crate::error::check_shape(name, shape, t.shape())
}

/// A new buffer of `len` floats, each written by `fill`, without clearing
/// it first: `vec![0.0; len]` reuses freed heap memory (see
/// [`tune_allocator`]) and so zeroes it in a pass of its own, about 5% of
/// a smallcnn training step when every output is then overwritten anyway.
/// The unit tests fill the buffer with NaN first, so that a value `fill`
/// misses shows in their results.
///
/// # Safety
/// `fill` must write every element of the slice it is given.
unsafe fn filled_by(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut buf = Box::<[f32]>::new_uninit_slice(len);
    #[cfg(test)]
    buf.iter_mut().for_each(|v| {
        v.write(f32::NAN);
    });
    fill(&mut buf);
    // SAFETY: the caller's promise: `fill` initialised every element.
    unsafe { buf.assume_init() }.into_vec()
}

/// Elementwise ops split their work into chunks of this many values: large
/// enough to amortise a rayon task, small enough to use both cores on the
/// smaller activations.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// A strided, read-only view of a matrix for [`matmul`]: element `(i, j)` is
/// `data[i * rs + j * cs]`. Transposing is swapping the strides, no copy.
#[derive(Clone, Copy)]
struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows x cols` matrix at the start of `data`.
    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, sharing the data.
    #[cfg(test)]
    fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// True when every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), `dst` a dense
/// row-major `a.rows x b.cols` matrix. Single-threaded: callers parallelise
/// over independent calls of a fixed shape, which keeps results independent
/// of the batch size and of the thread count.
fn matmul(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Internal invariants: the callers validated every shape beforehand, so a
    // failure here is a bug in this backend, not a bad input.
    assert_eq!(k, b.rows, "matmul: inner extents differ");
    assert_eq!(dst.len(), m * n, "matmul: destination size");
    assert!(a.in_bounds() && b.in_bounds(), "matmul: view out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every address gemm touches inside `dst`,
    // `a.data` and `b.data`; `dst` is borrowed mutably so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `N` scratch buffers of the given lengths, kept per thread
/// across calls: a fresh multi-megabyte column buffer per image would cost
/// more in page faults than the copy into it. The contents on entry are
/// unspecified; `f` must write what it reads.
///
/// Each buffer starts on a 64-byte line, so the GEMM's panels (rows of 16
/// floats) and output rows lie on whole cache lines: the kernel's 64-byte
/// loads and stores never straddle two.
fn with_scratch<const N: usize, R>(lens: [usize; N], f: impl FnOnce([&mut [f32]; N]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            if bufs.len() < N {
                bufs.resize_with(N, Vec::new);
            }
            let mut bufs = bufs.iter_mut();
            f(std::array::from_fn(|i| {
                let buf = bufs.next().expect("N buffers were made above");
                line_aligned(buf, lens[i])
            }))
        }
        // Only reachable if `f` itself asked for scratch: give it its own.
        Err(_) => {
            let mut own: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
            let mut own = own.iter_mut();
            f(std::array::from_fn(|i| {
                line_aligned(own.next().expect("N buffers"), lens[i])
            }))
        }
    })
}

/// Floats in a 64-byte line.
const LINE: usize = 16;

/// `len` floats of `buf` starting on a 64-byte line (grown as needed).
fn line_aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + LINE - 1 {
        buf.resize(len + LINE - 1, 0.0);
    }
    // `align_offset` counts elements; a Vec of f32 is 4-byte aligned, so
    // some offset below LINE reaches the line.
    let skip = buf.as_ptr().align_offset(64).min(LINE - 1);
    &mut buf[skip..skip + len]
}

#[cfg(test)]
mod tests {
    use super::*;
    use testutil::*;

    #[test]
    fn scratch_buffers_start_on_a_cache_line_nested_or_not() {
        let aligned = |b: &[f32]| (b.as_ptr() as usize).is_multiple_of(64);
        for lens in [[1, 17], [1000, 3], [5, 4096]] {
            with_scratch(lens, |[a, b]| {
                assert!(aligned(a) && aligned(b), "{lens:?}");
                assert_eq!([a.len(), b.len()], lens);
                // A nested call gets buffers of its own, aligned too.
                with_scratch([33], |[c]| assert!(aligned(c) && c.len() == 33));
            });
        }
    }

    #[test]
    fn a_conv_with_a_folded_bn_computes_the_conv_then_the_bn() {
        let be = CpuBackend::REFERENCE;
        let mut r = rng(11);
        let x = uniform(&mut r, &[2, 3, 7, 7], -1.0, 1.0);
        let w = uniform(&mut r, &[5, 3, 3, 3], -0.5, 0.5);
        let b = uniform(&mut r, &[5], -0.5, 0.5);
        let gamma = uniform(&mut r, &[5], 0.5, 1.5);
        let beta = uniform(&mut r, &[5], -0.5, 0.5);
        let mean = uniform(&mut r, &[5], -0.3, 0.3);
        let var = uniform(&mut r, &[5], 0.2, 2.0);
        let p = ConvParams::new(2, 1);
        for bias in [Some(&b), None] {
            let want = be
                .batch_norm_eval(
                    &be.conv2d(&x, &w, bias, p).unwrap(),
                    &gamma,
                    &beta,
                    &mean,
                    &var,
                    1e-5,
                )
                .unwrap();
            let (w2, b2) = be
                .fold_bn(&w, bias, &gamma, &beta, &mean, &var, 1e-5)
                .unwrap();
            assert_eq!(w2.shape(), w.shape());
            let got = be.conv2d(&x, &w2, Some(&b2), p).unwrap();
            assert_close(
                &format!("folded conv, bias {}", bias.is_some()),
                got.data(),
                &f64s(&want),
                1e-5,
            );
        }
        let e = be
            .fold_bn(&w, None, &gamma, &beta, &Tensor::zeros(&[4]), &var, 1e-5)
            .unwrap_err();
        assert!(e.to_string().contains("mean"), "{e}");
    }

    #[test]
    fn the_relu_masked_input_gradient_is_the_input_gradient_of_relu_of_the_conv() {
        let be = CpuBackend::REFERENCE;
        let mut r = rng(12);
        let x = uniform(&mut r, &[2, 3, 6, 6], -1.0, 1.0);
        let w = uniform(&mut r, &[4, 3, 3, 3], -0.5, 0.5);
        let p = ConvParams::new(1, 1);
        let y = be.conv2d_fused(&x, &w, None, None, true, p).unwrap();
        assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v > 0.0));
        let dy = uniform(&mut r, y.shape(), -1.0, 1.0);
        let want = be
            .conv2d_backward_data(&be.relu_backward(&dy, &y).unwrap(), &w, x.shape(), p)
            .unwrap();
        let got = be
            .conv2d_fused_backward_data(&dy, &w, Some(&y), x.shape(), p)
            .unwrap();
        assert_bitwise("masked dgrad", got.data(), want.data());
        let plain = be.conv2d_backward_data(&dy, &w, x.shape(), p).unwrap();
        let got = be
            .conv2d_fused_backward_data(&dy, &w, None, x.shape(), p)
            .unwrap();
        assert_bitwise("unmasked dgrad", got.data(), plain.data());
        assert_ne!(plain.data(), want.data(), "the mask changed nothing");
    }

    #[test]
    fn buffers_round_trip_and_reshape_keeps_flatten_order() {
        let be = CpuBackend::REFERENCE;
        let t = Tensor::from_fn(&[2, 3, 2, 2], |i| i as f32);
        let b = be.upload(&t).unwrap();
        assert_eq!(be.download(&b).unwrap(), t);
        assert_eq!(be.shape(&b), &[2, 3, 2, 2]);
        let flat = be.reshape(&b, &[2, 12]).unwrap();
        assert_eq!(flat.shape(), &[2, 12]);
        assert_eq!(flat.data(), t.data());
        assert!(be.reshape(&b, &[2, 11]).is_err());
        assert_eq!(be.zeros(&[3, 1]).unwrap(), Tensor::zeros(&[3, 1]));
        assert_eq!(be.name(), "cpu");
    }

    #[test]
    fn matmul_handles_transposed_views_and_accumulation() {
        let mut g = rng(1);
        let (m, k, n) = (5, 7, 3);
        let a = uniform(&mut g, &[m, k], -1.0, 1.0);
        let bt = uniform(&mut g, &[n, k], -1.0, 1.0);
        let want: Vec<f64> = (0..m * n)
            .map(|i| dot(&f64s(&a)[i / n * k..][..k], &f64s(&bt)[i % n * k..][..k]))
            .collect();
        let mut dst = vec![0.0; m * n];
        let b = MatRef::row_major(bt.data(), n, k).t();
        matmul(&mut dst, MatRef::row_major(a.data(), m, k), b, false);
        assert_close("a b", &dst, &want, 1e-6);
        matmul(&mut dst, MatRef::row_major(a.data(), m, k), b, true);
        let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
        assert_close("accumulated", &dst, &twice, 1e-6);
        let mut empty_k = vec![1.0; m * n];
        matmul(
            &mut empty_k,
            MatRef::row_major(&[], m, 0),
            MatRef::row_major(&[], 0, n),
            false,
        );
        assert_eq!(empty_k, vec![0.0; m * n]);
    }
}
