//! The GPU backend: host side of the CUDA path, generic over a [`Driver`].
//!
//! [`GpuBackend`] implements [`Backend`](crate::backend::Backend) (in ops.rs) with the hand-written kernels of
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
mod conv_grouped;
pub mod conv_mma;
pub mod cuda;
pub mod driver;
pub mod emu;
mod graph_ops;
pub mod kernels;
pub mod locate;
pub mod nvrtc;
mod ops;

use std::ffi::c_void;
use std::sync::Arc;

pub use driver::Driver;

use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::tensor::numel;
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

/// Device work recorded once (a CUDA graph), destroyed with its last handle.
pub struct Recording<D: Driver> {
    graph: driver::GraphId,
    drv: Arc<D>,
}

impl<D: Driver> Drop for Recording<D> {
    fn drop(&mut self) {
        self.drv.destroy_graph(self.graph);
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
    /// How the convolutions multiply (`--precision`).
    precision: Precision,
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
            precision: Precision::Fp32,
        }
    }

    /// Makes the convolutions (and linear layers) multiply in `p`: fp32 on
    /// the f32 kernels of conv.cu, the other modes on the tensor-core
    /// kernels of conv_mma.cu.
    pub fn set_precision(&mut self, p: Precision) {
        self.precision = p;
    }

    /// The same backend with precision `p`.
    pub fn with_precision(mut self, p: Precision) -> GpuBackend<D> {
        self.precision = p;
        self
    }

    /// The precision of the convolutions.
    pub fn precision(&self) -> Precision {
        self.precision
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
