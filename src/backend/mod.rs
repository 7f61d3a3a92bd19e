//! The op set every compute backend provides, and nothing more.
//!
//! Buffers are opaque handles owned by the backend: the CPU reference keeps
//! NCHW `f32`, a GPU backend may keep another layout. Every buffer reports its
//! *logical* shape (NCHW for images, `[N, F]` for features), and all shapes in
//! this trait are logical. Ops are pure functions of their inputs unless they
//! take `&mut`; reductions are deterministic for a given shape.

pub mod activation;
pub mod check;
pub mod cpu;
mod device;
pub mod gpu;
pub mod precision;
pub mod shape_ops;

pub use activation::Activation;
pub use device::{select_device, Device};
pub use precision::Precision;
pub use shape_ops::Pad2d;

use crate::error::Result;
use crate::tensor::Tensor;

/// Stride, zero padding, dilation and groups of a 2-D convolution (same on
/// both axes). `groups` splits the channels into independent convolutions
/// (the filter is `[O, C/groups, KH, KW]`; `groups = C` is depthwise);
/// `dilation` spaces the filter taps, as in PyTorch's `Conv2d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvParams {
    /// Step between output positions, in input pixels.
    pub stride: usize,
    /// Zeros added on each side of the input.
    pub pad: usize,
    /// Channel groups (1: every output sees every input channel).
    pub groups: usize,
    /// Distance between filter taps, in input pixels (1: adjacent).
    pub dilation: usize,
    /// Compute it directly (no Winograd) even where a faster algorithm
    /// applies: the reference the faster paths are tested against. Passes
    /// do not ask for it; training takes Winograd backward-data too, since
    /// its filter transform runs on all threads without divisions
    /// (resnet18 training 1.20x the direct step, smallcnn about even, in
    /// alternating runs on 2026-12-04; before that change the transform
    /// alone took a tenth of the step and Winograd lost). A backend without
    /// such algorithms ignores it.
    pub direct: bool,
}

impl Default for ConvParams {
    /// Stride 1, no padding, one group, no dilation.
    fn default() -> Self {
        ConvParams::new(1, 0)
    }
}

impl ConvParams {
    /// A dense, undilated convolution with this stride and padding.
    pub const fn new(stride: usize, pad: usize) -> Self {
        ConvParams {
            stride,
            pad,
            groups: 1,
            dilation: 1,
            direct: false,
        }
    }

    /// The same, computed directly (see [`ConvParams::direct`]).
    pub const fn direct(self) -> Self {
        ConvParams {
            direct: true,
            ..self
        }
    }

    /// The same with `groups` channel groups.
    pub const fn with_groups(self, groups: usize) -> Self {
        ConvParams { groups, ..self }
    }

    /// The same with filter taps `dilation` pixels apart.
    pub const fn with_dilation(self, dilation: usize) -> Self {
        ConvParams { dilation, ..self }
    }

    /// True for the dense, undilated case (the GEMM paths).
    pub fn is_dense(&self) -> bool {
        self.groups == 1 && self.dilation == 1
    }

    /// Input pixels one filter of `kernel` taps spans along an axis.
    pub fn span(&self, kernel: usize) -> usize {
        self.dilation * (kernel.max(1) - 1) + 1
    }

    /// Output extent along one axis for an input extent and a kernel extent.
    pub fn out_len(&self, input: usize, kernel: usize) -> usize {
        (input + 2 * self.pad - self.span(kernel)) / self.stride + 1
    }
}

/// Window, stride and padding of a 2-D pooling op (same on both axes), and
/// PyTorch's two options: `ceil_mode` rounds the output extent up (the last
/// window may hang over the right padding, but must start inside the input
/// or the left padding), and `count_include_pad` makes average pooling
/// divide by the window clipped to the padded input rather than to the
/// input itself. Max pooling ignores padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolParams {
    /// Window extent.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Padding on each side.
    pub pad: usize,
    /// Round the output extent up instead of down.
    pub ceil_mode: bool,
    /// Average pooling counts padded zeros in the divisor.
    pub count_include_pad: bool,
}

impl PoolParams {
    /// Floor mode, padding counted: PyTorch's defaults.
    pub const fn new(kernel: usize, stride: usize, pad: usize) -> Self {
        PoolParams {
            kernel,
            stride,
            pad,
            ceil_mode: false,
            count_include_pad: true,
        }
    }

    /// The same with the output extent rounded up (`ceil_mode=True`).
    pub const fn with_ceil_mode(self, ceil_mode: bool) -> Self {
        PoolParams { ceil_mode, ..self }
    }

    /// The same with `count_include_pad` set as given.
    pub const fn with_count_include_pad(self, count_include_pad: bool) -> Self {
        PoolParams {
            count_include_pad,
            ..self
        }
    }

    /// Output extent along one axis (PyTorch's `pooling_output_shape`).
    pub fn out_len(&self, input: usize) -> usize {
        let span = input + 2 * self.pad - self.kernel;
        let round_up = if self.ceil_mode { self.stride - 1 } else { 0 };
        let out = (span + round_up) / self.stride + 1;
        // The last window must start inside the input or the left padding.
        if self.ceil_mode && (out - 1) * self.stride >= input + self.pad {
            out - 1
        } else {
            out
        }
    }
}

/// What the train-mode batch norm keeps for its backward pass.
pub struct BnSaved<B> {
    /// Per-channel batch mean, `[C]`.
    pub mean: B,
    /// Per-channel `1 / sqrt(biased batch variance + eps)`, `[C]`.
    pub invstd: B,
}

/// Hyper-parameters of one SGD-with-momentum update (PyTorch's convention:
/// `g' = g + wd * p; v = momentum * v + g'; p -= lr * v`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// L2 weight decay (0 for parameters that must not decay).
    pub weight_decay: f32,
}

/// The op set of the engine. Shapes are logical NCHW; `x` is an input,
/// `y` an output, `d*` a gradient of the loss with respect to that tensor.
pub trait Backend: Send + Sync {
    /// A buffer on the backend's device.
    type Buf: Send + Sync;
    /// Row indices or class labels (`u32`) on the backend's device: what
    /// lets a search step gather and score its batch without the host.
    type Index: Send + Sync;
    /// Device work recorded once and replayed ([`Backend::record`]).
    type Recording: Send + Sync;

    /// A short name for reports ("cpu", "cuda:0 NVIDIA H200", "emu").
    fn name(&self) -> String;

    /// What decides the numbers this backend computes: the kind of device
    /// and the precision (e.g. `cpu fp32`, `cuda sm_90 fp32`). Backends with
    /// equal numerics give the same results bit for bit (two GPUs of one
    /// kind do), so results are keyed and merged by it, never by the name.
    fn numerics(&self) -> String;

    /// Copies a host tensor onto the device.
    fn upload(&self, t: &Tensor) -> Result<Self::Buf>;
    /// Copies a buffer back to the host, in logical (NCHW) order.
    fn download(&self, b: &Self::Buf) -> Result<Tensor>;
    /// Copies row indices or labels onto the device (each below 2^31).
    fn upload_index(&self, v: &[u32]) -> Result<Self::Index>;
    /// Rows `index[c*n..(c+1)*n]` of `src` (rows along its first axis), in
    /// that order: `[n, ...]`, `c` the step `cursor` holds (a one-entry
    /// index). A search step gathers its batch this way from the images kept
    /// on the device, reading where it stands from the device too, so every
    /// step submits the same work.
    fn gather_rows(
        &self,
        src: &Self::Buf,
        index: &Self::Index,
        cursor: &Self::Index,
        n: usize,
    ) -> Result<Self::Buf>;
    /// Writes `src` into row `c` of `dst` (rows along its first axis, each
    /// as many values as `src`), `c` the cursor's step: a step leaves its
    /// results in a window buffer that the host reads once.
    fn write_row(&self, dst: &mut Self::Buf, cursor: &Self::Index, src: &Self::Buf) -> Result<()>;
    /// Adds the number of NaN or infinite values of `x` to `counts[c][slot]`
    /// (`counts [steps, width]`, `c` the cursor's step), so a step's
    /// finiteness is checked on the device and read back with its window
    /// (exact below 2^24; never zero when there is one).
    fn count_nonfinite(
        &self,
        x: &Self::Buf,
        counts: &mut Self::Buf,
        cursor: &Self::Index,
        slot: usize,
    ) -> Result<()>;
    /// Moves a step cursor on by one step.
    fn advance_cursor(&self, cursor: &mut Self::Index) -> Result<()>;
    /// Where the device can, records the work `f` submits and runs it once,
    /// so that [`Backend::replay`] submits it again in one go, with no host
    /// work per op (on a GPU, a CUDA graph). `f` must submit work that
    /// reads everything that changes between calls from the device (see
    /// the cursor ops above), allocate nothing that outlives it, and copy
    /// nothing to or from the host. On an error nothing `f` submitted has
    /// run. None where ops run as they are called (the CPU): nothing ran,
    /// and the caller runs `f` itself.
    fn record(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Recording>>;
    /// Submits the work of a [`Backend::record`]ing again.
    fn replay(&self, r: &Self::Recording) -> Result<()>;
    /// The logical shape of a buffer.
    fn shape<'a>(&self, b: &'a Self::Buf) -> &'a [usize];
    /// A buffer of zeros.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Buf>;
    /// The same data under another logical shape with as many elements
    /// (for `[N,C,H,W] <-> [N,C*H*W]` this is PyTorch's `flatten(1)` order).
    fn reshape(&self, x: &Self::Buf, shape: &[usize]) -> Result<Self::Buf>;

    /// Cross-correlation of `x [N,C,H,W]` with `w [O,C/groups,KH,KW]`, plus
    /// `bias [O]`.
    fn conv2d(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        p: ConvParams,
    ) -> Result<Self::Buf>;
    /// Gradient of `conv2d` with respect to its input, of shape `x_shape`.
    fn conv2d_backward_data(
        &self,
        dy: &Self::Buf,
        w: &Self::Buf,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<Self::Buf>;
    /// Gradients of `conv2d` with respect to the filter (shape `w_shape`)
    /// and, when `with_bias`, the bias (sum of `dy` over N, H, W).
    fn conv2d_backward_filter(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        w_shape: &[usize],
        p: ConvParams,
        with_bias: bool,
    ) -> Result<(Self::Buf, Option<Self::Buf>)>;

    /// A convolution with a fused epilogue:
    /// `y = relu?(conv2d(x, w, bias) + residual)`, `residual` of the
    /// output's shape. What the eval-mode fused graph's convolutions run:
    /// one pass over the output instead of three.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_fused(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        residual: Option<&Self::Buf>,
        relu: bool,
        p: ConvParams,
    ) -> Result<Self::Buf>;
    /// Input gradient of a convolution whose output went through a ReLU:
    /// with `relu_y` (the fused conv's output), `dy` is first zeroed where
    /// `relu_y <= 0`; without, this is `conv2d_backward_data`.
    fn conv2d_fused_backward_data(
        &self,
        dy: &Self::Buf,
        w: &Self::Buf,
        relu_y: Option<&Self::Buf>,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<Self::Buf>;
    /// An eval-mode batch norm folded into the convolution before it:
    /// `(w', b')` with `w' = w * s`, `b' = (b - mean) * s + beta`,
    /// `s = gamma / sqrt(var + eps)` per output channel (`w [O,C,KH,KW]`,
    /// the rest `[O]`), so that `conv2d(x, w', b')` is
    /// `batch_norm_eval(conv2d(x, w, b))` up to rounding.
    #[allow(clippy::too_many_arguments)]
    fn fold_bn(
        &self,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        mean: &Self::Buf,
        var: &Self::Buf,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// Batch norm with running statistics:
    /// `y = (x - mean) / sqrt(var + eps) * gamma + beta`, per channel.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_eval(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        mean: &Self::Buf,
        var: &Self::Buf,
        eps: f32,
    ) -> Result<Self::Buf>;
    /// Input gradient of `batch_norm_eval`: `dy * gamma / sqrt(var + eps)`.
    fn batch_norm_eval_backward(
        &self,
        dy: &Self::Buf,
        gamma: &Self::Buf,
        var: &Self::Buf,
        eps: f32,
    ) -> Result<Self::Buf>;
    /// Batch norm with batch statistics (biased variance to normalise).
    /// Updates the running statistics in place with `momentum` and the
    /// unbiased variance, as PyTorch does.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        momentum: f32,
        eps: f32,
    ) -> Result<(Self::Buf, BnSaved<Self::Buf>)>;
    /// [`Backend::batch_norm_train`] and a ReLU after it, for a batch norm
    /// that only the ReLU reads: returns the ReLU's output, which a backend
    /// may write in the same pass as the normalisation.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_relu(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        momentum: f32,
        eps: f32,
    ) -> Result<(Self::Buf, BnSaved<Self::Buf>)> {
        let (y, saved) =
            self.batch_norm_train(x, gamma, beta, running_mean, running_var, momentum, eps)?;
        Ok((self.relu_owned(y)?, saved))
    }
    /// Gradients of `batch_norm_train`: `(dx, dgamma, dbeta)`.
    fn batch_norm_train_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        saved: &BnSaved<Self::Buf>,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// [`Backend::batch_norm_train_backward`] of a `dy` the caller gives
    /// up, so a backend may write `dx` over it.
    fn batch_norm_train_backward_owned(
        &self,
        dy: Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        saved: &BnSaved<Self::Buf>,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        self.batch_norm_train_backward(&dy, x, gamma, saved)
    }

    /// `max(x, 0)`.
    fn relu(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// `dy` where the ReLU's output `y` is positive, else 0.
    fn relu_backward(&self, dy: &Self::Buf, y: &Self::Buf) -> Result<Self::Buf>;
    /// [`Backend::relu`] of a buffer the caller gives up, so a backend may
    /// write the result over it instead of allocating another.
    fn relu_owned(&self, x: Self::Buf) -> Result<Self::Buf> {
        self.relu(&x)
    }
    /// [`Backend::relu_backward`] of a `dy` the caller gives up (see
    /// [`Backend::relu_owned`]).
    fn relu_backward_owned(&self, dy: Self::Buf, y: &Self::Buf) -> Result<Self::Buf> {
        self.relu_backward(&dy, y)
    }
    /// `a + b`, same shapes.
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf>;
    /// `a += b` in place, same shapes (gradient accumulation).
    fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> Result<()>;

    /// Max pooling; padded positions never win.
    fn max_pool2d(&self, x: &Self::Buf, p: PoolParams) -> Result<Self::Buf>;
    /// Gradient of `max_pool2d`, routed to the first maximum of each window
    /// (row-major scan order, as PyTorch on the CPU).
    fn max_pool2d_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        p: PoolParams,
    ) -> Result<Self::Buf>;
    /// The gradient through a ReLU and the max pool that reads it, from the
    /// pool's output gradient `dy`, with `x` the pool's input (the ReLU's
    /// output): [`Backend::max_pool2d_backward`], then
    /// [`Backend::relu_backward`] gated by `x`, which a backend may do in
    /// one pass.
    fn max_pool2d_relu_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        p: PoolParams,
    ) -> Result<Self::Buf> {
        let dx = self.max_pool2d_backward(x, dy, p)?;
        self.relu_backward_owned(dx, x)
    }
    /// Average pooling; the divisor follows `p.count_include_pad`.
    fn avg_pool2d(&self, x: &Self::Buf, p: PoolParams) -> Result<Self::Buf>;
    /// Gradient of `avg_pool2d` with respect to an input of shape `x_shape`.
    fn avg_pool2d_backward(
        &self,
        dy: &Self::Buf,
        x_shape: &[usize],
        p: PoolParams,
    ) -> Result<Self::Buf>;
    /// Mean over H and W: `[N,C,H,W] -> [N,C]`.
    fn global_avg_pool(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// Gradient of `global_avg_pool` for an input of shape `x_shape`.
    fn global_avg_pool_backward(&self, dy: &Self::Buf, x_shape: &[usize]) -> Result<Self::Buf>;

    /// `x [N,K] * w[O,K]^T + bias [O]`.
    fn linear(&self, x: &Self::Buf, w: &Self::Buf, bias: Option<&Self::Buf>) -> Result<Self::Buf>;
    /// Input gradient of `linear`: `dy [N,O] * w [O,K]`.
    fn linear_backward_data(&self, dy: &Self::Buf, w: &Self::Buf) -> Result<Self::Buf>;
    /// Weight gradient `dy^T * x` (`[O,K]`) and, when `with_bias`, the bias
    /// gradient (sum of `dy` over N).
    fn linear_backward_weight(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        with_bias: bool,
    ) -> Result<(Self::Buf, Option<Self::Buf>)>;

    /// Per-channel input normalisation `(x - mean[c]) / std[c]`.
    fn normalize(&self, x: &Self::Buf, mean: &[f32], std: &[f32]) -> Result<Self::Buf>;
    /// Input gradient of `normalize`: `dy / std[c]`.
    fn normalize_backward(&self, dy: &Self::Buf, std: &[f32]) -> Result<Self::Buf>;

    /// Softmax cross-entropy of `logits [N,K]` against `labels`.
    /// Returns the per-sample losses and `dlogits[n] = weights[n] *
    /// (softmax(logits[n]) - onehot(labels[n]))`, so a mean over the batch is
    /// `weights = 1/N` and a search's own mean is `alpha / B` on its rows.
    fn softmax_cross_entropy(
        &self,
        logits: &Self::Buf,
        labels: &[usize],
        weights: &[f32],
    ) -> Result<(Vec<f32>, Self::Buf)> {
        let [n, _] = check::cross_entropy_args(self.shape(logits), labels, weights)?;
        let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let labels = self.upload_index(&labels)?;
        let weights = self.upload(&Tensor::new(&[n], weights.to_vec())?)?;
        let (losses, dlogits) = self.softmax_cross_entropy_on_device(logits, &labels, &weights)?;
        Ok((self.download(&losses)?.into_data(), dlogits))
    }
    /// [`Backend::softmax_cross_entropy`] with the labels and weights `[N]`
    /// already on the device and the losses `[N]` left there. Each label
    /// must be below K: the CPU refuses one that is not, a GPU gives that
    /// row a NaN loss (which the finiteness checks report).
    fn softmax_cross_entropy_on_device(
        &self,
        logits: &Self::Buf,
        labels: &Self::Index,
        weights: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// The search composite for S searches with B images each:
    /// `out[s*B+b] = mask[s] * canvas[s] + (1 - mask[s]) * others[s*B+b]`,
    /// the `[S,H,W]` mask broadcast over channels.
    fn composite(
        &self,
        canvas: &Self::Buf,
        mask: &Self::Buf,
        others: &Self::Buf,
    ) -> Result<Self::Buf>;
    /// The mask gradient of each search from the gradient `dx` of its
    /// composites: `dmask[s,h,w] = l1_grad + sum_{b,c} dx[s*B+b,c,h,w] *
    /// (canvas[s,c,h,w] - others[s*B+b,c,h,w])`, summed in a fixed order.
    fn mask_grad(
        &self,
        dx: &Self::Buf,
        canvas: &Self::Buf,
        others: &Self::Buf,
        l1_grad: f32,
    ) -> Result<Self::Buf>;
    /// The gradient of the composite with respect to its canvas, `[S,C,H,W]`
    /// from `dx [S*B,C,H,W]` and `mask [S,H,W]`: `dcanvas[s,c,h,w] =
    /// mask[s,h,w] * sum_b dx[s*B+b,c,h,w]`, the sum over `b` in order from
    /// zero and multiplied once, so a result never depends on the batching
    /// of searches. Neural Cleanse optimises its canvas (the pattern) too.
    fn pattern_grad(&self, dx: &Self::Buf, mask: &Self::Buf) -> Result<Self::Buf>;
    /// Signed-gradient descent on the mask: `m = clamp(m - lr * sign(g), 0, 1)`
    /// with `sign(0) = 0`, computed in double precision and rounded once to
    /// f32, so the step is exactly the reference's (`lr` = 0.02 has no exact
    /// f32 value, and `m - 0.02f` rounds differently near 0).
    fn sign_step_clamp(&self, mask: &mut Self::Buf, grad: &Self::Buf, lr: f64) -> Result<()>;

    /// One SGD-with-momentum update of `param` in place.
    fn sgd_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        velocity: &mut Self::Buf,
        p: SgdParams,
    ) -> Result<()>;
    /// One L-infinity PGD ascent step in place:
    /// `x = clamp(clamp(x + step * sign(g), x0 - eps, x0 + eps), 0, 1)`.
    fn pgd_step(
        &self,
        x: &mut Self::Buf,
        grad: &Self::Buf,
        x0: &Self::Buf,
        step: f32,
        eps: f32,
    ) -> Result<()>;

    /// The elementwise activation `act(x)`, any shape (see [`Activation`]).
    fn activation(&self, x: &Self::Buf, act: Activation) -> Result<Self::Buf>;
    /// Input gradient of `activation`, from the op's input `x`:
    /// `dy * act'(x)`, PyTorch's choice at the kinks.
    fn activation_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        act: Activation,
    ) -> Result<Self::Buf>;
    /// `a * b` elementwise, where `b` has `a`'s shape or is `[N, C]` (or,
    /// for an NCHW `a`, `[N, C, 1, 1]`) broadcast over the rest of `a [N, C, ...]`
    /// (squeeze-and-excitation gates).
    fn mul(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf>;
    /// Gradients of `mul`: `(dy * b, dy * a)`, the second summed over the
    /// broadcast extents in f64 (a fixed order per channel) and shaped as `b`.
    fn mul_backward(
        &self,
        dy: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// Per-channel constant affine map `x * scale[c] + shift[c]` of
    /// `x [N, C, ...]` (the product rounded before the sum); `scale` and
    /// `shift` hold 1 value (for every channel) or C, all finite.
    fn affine(&self, x: &Self::Buf, scale: &[f32], shift: &[f32]) -> Result<Self::Buf>;
    /// Input gradient of `affine`: `dy * scale[c]`.
    fn affine_backward(&self, dy: &Self::Buf, scale: &[f32]) -> Result<Self::Buf>;
    /// Concatenation on the channel axis of two or more `[N, C_i, ...]`
    /// tensors equal in every other extent.
    fn concat(&self, xs: &[&Self::Buf]) -> Result<Self::Buf>;
    /// Gradients of `concat`: `dy` split on the channel axis into parts of
    /// `channels[i]` channels.
    fn concat_backward(&self, dy: &Self::Buf, channels: &[usize]) -> Result<Vec<Self::Buf>>;
    /// Zero padding of the H and W axes of `x [N, C, H, W]`.
    fn pad2d(&self, x: &Self::Buf, p: Pad2d) -> Result<Self::Buf>;
    /// Gradient of `pad2d`: `dy` with the padding cropped off.
    fn pad2d_backward(&self, dy: &Self::Buf, p: Pad2d) -> Result<Self::Buf>;
}
