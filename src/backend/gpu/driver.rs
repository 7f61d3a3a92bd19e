//! The small interface the GPU backend needs from a device: memory, copies
//! and kernel launches. Two implementations: [`super::cuda::CudaDriver`]
//! (a real GPU through cudarc) and [`super::emu::EmuDriver`] (the same kernels
//! compiled for the CPU), so all host-side code is shared and CI runs it.

use std::ffi::c_void;

use crate::error::Result;

/// A device address (CUDA's `CUdeviceptr`; a host address under emu).
pub type DevPtr = u64;

/// Why an allocation failed.
#[derive(Debug)]
pub enum AllocError {
    /// The device has not that much free memory.
    OutOfMemory {
        /// Free bytes on the device when the allocation failed, if known.
        free: Option<usize>,
        /// Total bytes of device memory, if known.
        total: Option<usize>,
    },
    /// Any other driver failure.
    Other(crate::Error),
}

/// A recorded graph of work, as a driver numbers it.
pub type GraphId = u64;

/// Grid or block extents of a launch, `(x, y, z)`.
pub type Dim3 = [u32; 3];

/// A device the GPU backend can run on.
pub trait Driver: Send + Sync + 'static {
    /// Device description for reports, e.g. `cuda:0 NVIDIA H200 (sm_90)`.
    fn name(&self) -> String;
    /// The kind of device the kernels run on, for [`crate::backend::Backend::numerics`]:
    /// `cuda sm_XY`, or `emu`. Devices of one arch run the same code.
    fn arch(&self) -> String;
    /// Streaming multiprocessors: how many blocks one wave of a grid runs.
    /// The forward and backward-data convolutions pick smaller tiles when
    /// a large one would leave SMs idle (their results never depend on the
    /// tile); nothing whose result could change reads it.
    fn sm_count(&self) -> usize;
    /// Allocates `bytes` (> 0) of device memory, aligned to 256 bytes.
    fn alloc(&self, bytes: usize) -> std::result::Result<DevPtr, AllocError>;
    /// Frees memory from [`Driver::alloc`]. Ordered after earlier work.
    fn free(&self, ptr: DevPtr);
    /// Copies host bytes to the device.
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies device bytes to the host (waits for earlier work).
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// Copies `bytes` between device buffers.
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Sets `bytes` at `dst` to zero.
    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()>;
    /// Launches `kernel` with the given grid, block and dynamic shared memory.
    ///
    /// # Safety
    /// `args` holds one pointer per kernel parameter, each to a value of
    /// exactly the type the kernel declares (device pointers as [`DevPtr`]),
    /// and every buffer the kernel touches must be live and large enough.
    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()>;
    /// Waits until all submitted work is done; reports asynchronous faults.
    fn synchronize(&self) -> Result<()>;
    /// From now on records the launches, device copies and memsets
    /// submitted (and the allocations and frees between them) into a graph
    /// instead of running them. Host copies and waits are errors until
    /// [`Driver::end_capture`].
    fn begin_capture(&self) -> Result<()>;
    /// Ends a recording: the graph of everything submitted since
    /// [`Driver::begin_capture`], none of which has run. Memory allocated
    /// while recording must have been freed while recording too (it lives
    /// with the graph), and nothing allocated before freed.
    fn end_capture(&self) -> Result<GraphId>;
    /// Submits a recorded graph's work, in order after earlier work.
    fn launch_graph(&self, graph: GraphId) -> Result<()>;
    /// Frees a recorded graph (after the work submitted so far).
    fn destroy_graph(&self, graph: GraphId);
    /// `(free, total)` device memory in bytes.
    fn memory(&self) -> Result<(usize, usize)>;
}
