//! The GPU backend: host side of the CUDA path, generic over a [`Driver`].
//!
//! [`GpuBackend`] implements [`Backend`] with the hand-written kernels of
//! `kernels/*.cu`. The same host code runs on a real GPU
//! ([`cuda::CudaDriver`]) and on the CPU through the emulated driver
//! ([`emu::EmuDriver`]), which is how CI runs every kernel.
//!
//! Layout on the device: the same logical NCHW `f32` as the CPU reference, so
//! `upload`/`download` are plain copies and `reshape` is free. Buffers are
//! reference-counted device allocations with copy-on-write: `reshape` shares
//! memory, and an op that mutates a buffer (`add_assign`, the optimiser and
//! mask steps) first copies it if another handle still shares it.
//!
//! Every kernel reduction is deterministic (fixed order, no float atomics),
//! so a run is bitwise reproducible on one device.

pub mod conv;
pub mod cuda;
pub mod driver;
pub mod emu;
pub mod fused;
pub mod kernels;
pub mod nvrtc;
mod ops;
pub mod select;
pub mod selftest;

use std::ffi::c_void;
use std::sync::Arc;

pub use driver::Driver;
pub use select::{select_device, Device};

use crate::backend::{Backend, BnSaved, ConvParams, PoolParams, SgdParams};
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};
use driver::{AllocError, DevPtr, Dim3};

/// A device allocation, freed when the last handle goes.
struct Mem<D: Driver> {
    ptr: DevPtr,
    bytes: usize,
    drv: Arc<D>,
}

impl<D: Driver> Drop for Mem<D> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.drv.free(self.ptr);
        }
    }
}

/// A tensor on the device: shared memory plus a logical shape.
pub struct GpuBuf<D: Driver> {
    mem: Arc<Mem<D>>,
    shape: Vec<usize>,
}

impl<D: Driver> GpuBuf<D> {
    /// The device address of the first element.
    pub fn ptr(&self) -> DevPtr {
        self.mem.ptr
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The CUDA-kernel backend over driver `D`.
pub struct GpuBackend<D: Driver> {
    drv: Arc<D>,
}

/// Threads per block of the elementwise and grid-stride kernels.
const THREADS: u32 = 256;

/// Largest element count a kernel indexes (32-bit signed indices).
const MAX_ELEMENTS: usize = i32::MAX as usize;

/// A pointer to a launch argument, for [`Driver::launch`]'s argument array.
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Grid of a grid-stride kernel over `n` items: enough blocks for one item
/// per thread, capped (the loop covers the rest).
fn grid_for(n: usize) -> Dim3 {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 8192);
    [blocks as u32, 1, 1]
}

impl<D: Driver> GpuBackend<D> {
    /// A backend on `driver`.
    pub fn new(driver: D) -> GpuBackend<D> {
        GpuBackend {
            drv: Arc::new(driver),
        }
    }

    /// The driver.
    pub fn driver(&self) -> &D {
        &self.drv
    }

    /// Waits for all submitted work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.drv.synchronize()
    }

    /// An uninitialised buffer of `shape`.
    fn alloc(&self, shape: &[usize]) -> Result<GpuBuf<D>> {
        let n = numel(shape);
        if n > MAX_ELEMENTS {
            return Err(Error::Backend(format!(
                "a tensor of shape {shape:?} has {n} elements; the GPU kernels index at most \
                 2^31 - 1 per tensor: use a smaller batch"
            )));
        }
        let bytes = n * 4;
        let ptr = if bytes == 0 {
            0
        } else {
            match self.drv.alloc(bytes) {
                Ok(p) => p,
                Err(AllocError::OutOfMemory { free, total }) => {
                    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
                    let avail = match (free, total) {
                        (Some(f), Some(t)) => {
                            format!(" ({:.0} MiB free of {:.0} MiB)", mib(f), mib(t))
                        }
                        _ => String::new(),
                    };
                    return Err(Error::Backend(format!(
                        "out of device memory: a tensor of shape {shape:?} needs {:.1} MiB{avail}; \
                         use a smaller batch",
                        mib(bytes)
                    )));
                }
                Err(AllocError::Other(e)) => return Err(e),
            }
        };
        Ok(GpuBuf {
            mem: Arc::new(Mem {
                ptr,
                bytes,
                drv: self.drv.clone(),
            }),
            shape: shape.to_vec(),
        })
    }

    /// Uploads a small host array (labels, statistics) as a device buffer.
    fn upload_raw<T: bytemuck::Pod>(&self, v: &[T]) -> Result<GpuBuf<D>> {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let b = self.alloc(&[bytes.len().div_ceil(4)])?;
        if !bytes.is_empty() {
            self.drv.htod(b.ptr(), bytes)?;
        }
        Ok(b)
    }

    /// A buffer's values on the host.
    fn download_vec(&self, b: &GpuBuf<D>) -> Result<Vec<f32>> {
        Ok(self.download(b)?.into_data())
    }

    /// Makes `b` the only handle of its memory (copying it if shared), so it
    /// can be written in place.
    fn make_unique(&self, b: &mut GpuBuf<D>) -> Result<()> {
        if Arc::strong_count(&b.mem) > 1 {
            let fresh = self.alloc(&b.shape)?;
            if b.mem.bytes > 0 {
                self.drv.dtod(fresh.ptr(), b.ptr(), b.mem.bytes)?;
            }
            b.mem = fresh.mem;
        }
        Ok(())
    }

    /// Launches `kernel`; a no-op when `work` is 0 (nothing to do).
    fn launch(
        &self,
        kernel: &str,
        work: usize,
        grid: Dim3,
        block: Dim3,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        if work == 0 {
            return Ok(());
        }
        // SAFETY: every caller in this module passes the argument list its
        // kernel declares, with buffers sized for the launch.
        unsafe { self.drv.launch(kernel, grid, block, 0, args) }
    }

    /// Launches a grid-stride kernel over `n` items with 256-thread blocks.
    fn launch_flat(&self, kernel: &str, n: usize, args: &mut [*mut c_void]) -> Result<()> {
        self.launch(kernel, n, grid_for(n), [THREADS, 1, 1], args)
    }
}

impl<D: Driver> Backend for GpuBackend<D> {
    type Buf = GpuBuf<D>;

    fn eval_runner<'a>(
        &'a self,
        graph: &crate::graph::Graph,
        params: &[GpuBuf<D>],
    ) -> Result<Option<Box<dyn crate::backend::EvalRunner<GpuBuf<D>> + 'a>>> {
        Ok(Some(Box::new(fused::FusedModel::from_device(
            self, graph, params,
        )?)))
    }

    fn name(&self) -> String {
        self.drv.name()
    }

    fn numerics(&self) -> String {
        format!("{} fp32", self.drv.arch())
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

    fn conv2d_backward_data(
        &self,
        dy: &GpuBuf<D>,
        w: &GpuBuf<D>,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        self.conv_dgrad(dy, w, None, x_shape, p)
    }

    fn conv2d_backward_filter(
        &self,
        x: &GpuBuf<D>,
        dy: &GpuBuf<D>,
        w_shape: &[usize],
        p: ConvParams,
        with_bias: bool,
    ) -> Result<(GpuBuf<D>, Option<GpuBuf<D>>)> {
        self.conv_wgrad(x, dy, w_shape, p, with_bias)
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
        self.bn_eval(x, gamma, beta, mean, var, eps)
    }

    fn batch_norm_eval_backward(
        &self,
        dy: &GpuBuf<D>,
        gamma: &GpuBuf<D>,
        var: &GpuBuf<D>,
        eps: f32,
    ) -> Result<GpuBuf<D>> {
        self.bn_eval_backward(dy, gamma, var, eps)
    }

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
        self.bn_train(x, gamma, beta, running_mean, running_var, momentum, eps)
    }

    fn batch_norm_train_backward(
        &self,
        dy: &GpuBuf<D>,
        x: &GpuBuf<D>,
        gamma: &GpuBuf<D>,
        saved: &BnSaved<GpuBuf<D>>,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>, GpuBuf<D>)> {
        self.bn_train_backward(dy, x, gamma, saved)
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
        self.add_in_place(a, b)
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
        self.max_pool_backward(x, dy, p)
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
        self.avg_pool_backward(dy, x_shape, p)
    }

    fn global_avg_pool(&self, x: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        self.global_avg_forward(x)
    }

    fn global_avg_pool_backward(&self, dy: &GpuBuf<D>, x_shape: &[usize]) -> Result<GpuBuf<D>> {
        self.global_avg_backward(dy, x_shape)
    }

    fn linear(&self, x: &GpuBuf<D>, w: &GpuBuf<D>, bias: Option<&GpuBuf<D>>) -> Result<GpuBuf<D>> {
        self.linear_forward(x, w, bias)
    }

    fn linear_backward_data(&self, dy: &GpuBuf<D>, w: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        self.linear_dgrad(dy, w)
    }

    fn linear_backward_weight(
        &self,
        x: &GpuBuf<D>,
        dy: &GpuBuf<D>,
        with_bias: bool,
    ) -> Result<(GpuBuf<D>, Option<GpuBuf<D>>)> {
        self.linear_wgrad(x, dy, with_bias)
    }

    fn normalize(&self, x: &GpuBuf<D>, mean: &[f32], std: &[f32]) -> Result<GpuBuf<D>> {
        self.normalize_op(x, Some(mean), std)
    }

    fn normalize_backward(&self, dy: &GpuBuf<D>, std: &[f32]) -> Result<GpuBuf<D>> {
        self.normalize_op(dy, None, std)
    }

    fn softmax_cross_entropy(
        &self,
        logits: &GpuBuf<D>,
        labels: &[usize],
        weights: &[f32],
    ) -> Result<(Vec<f32>, GpuBuf<D>)> {
        self.softmax_xent(logits, labels, weights)
    }

    fn composite(
        &self,
        canvas: &GpuBuf<D>,
        mask: &GpuBuf<D>,
        others: &GpuBuf<D>,
    ) -> Result<GpuBuf<D>> {
        self.mask_composite(canvas, mask, others)
    }

    fn mask_grad(
        &self,
        dx: &GpuBuf<D>,
        canvas: &GpuBuf<D>,
        others: &GpuBuf<D>,
        l1_grad: f32,
    ) -> Result<GpuBuf<D>> {
        self.mask_gradient(dx, canvas, others, l1_grad)
    }

    fn sign_step_clamp(&self, mask: &mut GpuBuf<D>, grad: &GpuBuf<D>, lr: f64) -> Result<()> {
        self.mask_sign_step(mask, grad, lr)
    }

    fn sgd_step(
        &self,
        param: &mut GpuBuf<D>,
        grad: &GpuBuf<D>,
        velocity: &mut GpuBuf<D>,
        p: SgdParams,
    ) -> Result<()> {
        self.sgd(param, grad, velocity, p)
    }

    fn pgd_step(
        &self,
        x: &mut GpuBuf<D>,
        grad: &GpuBuf<D>,
        x0: &GpuBuf<D>,
        step: f32,
        eps: f32,
    ) -> Result<()> {
        self.pgd(x, grad, x0, step, eps)
    }
}
