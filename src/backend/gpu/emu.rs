//! The emulated driver: device memory is host memory and kernels are the
//! `kernels/*.cu` sources compiled by the host C++ compiler against
//! `kernels/emu/cuda_emu.h` (see `build.rs`). A launch runs every block of the
//! grid with the same grid, block and argument array the CUDA driver would
//! use, synchronously. Only the speed is not a GPU's.
//!
//! Fresh allocations are filled with NaN so that a kernel that fails to write
//! part of its output shows up in the equivalence tests, and every copy is
//! checked against the live allocations.

use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::driver::{AllocError, DevPtr, Dim3, Driver, GraphId};
use super::kernels::{EmuArgSizes, EmuBody, EMU_ARG_SIZES, EMU_BODIES};
use crate::error::{Error, Result};

unsafe extern "C" {
    fn cwp_emu_launch(
        body: EmuBody,
        args: *mut *mut c_void,
        grid: *const u32,
        block: *const u32,
        smem: u32,
    ) -> i32;
}

const ALIGN: usize = 256;

/// The emulated device. Memory is limited (4 GiB unless told otherwise, or
/// `CWP_EMU_MEMORY` bytes) so that out-of-memory paths can be exercised.
pub struct EmuDriver {
    limit: usize,
    /// Live allocations: start address -> size in bytes.
    live: Mutex<BTreeMap<u64, usize>>,
    /// Host copies, waits and graph launches so far, for [`EmuDriver::host_traffic`].
    traffic: Traffic,
    /// The recording under way, if any.
    capture: Mutex<Option<Capture>>,
    /// Recorded graphs by id.
    graphs: Mutex<HashMap<GraphId, Graph>>,
    next_graph: AtomicUsize,
    /// Launches (direct or recorded) by kernel name, for
    /// [`EmuDriver::launches`].
    launches: Mutex<HashMap<String, usize>>,
}

/// The counters behind [`HostTraffic`].
#[derive(Default)]
struct Traffic {
    uploads: AtomicUsize,
    downloads: AtomicUsize,
    syncs: AtomicUsize,
    graph_launches: AtomicUsize,
}

/// One piece of recorded work.
enum Op {
    Launch {
        kernel: String,
        body: EmuBody,
        grid: Dim3,
        block: Dim3,
        smem: u32,
        /// Each argument's value, copied into 8-byte-aligned words.
        args: Vec<Vec<u64>>,
    },
    Copy {
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    },
    Zero {
        dst: DevPtr,
        bytes: usize,
    },
}

/// A recording under way: its work, the memory it allocated and has not
/// freed, the memory it allocated and freed (which lives with its graph),
/// and the first thing it did that a graph cannot hold.
#[derive(Default)]
struct Capture {
    ops: Vec<Op>,
    live: BTreeSet<DevPtr>,
    owned: Vec<DevPtr>,
    fault: Option<String>,
}

/// A recorded graph and the memory its work uses.
struct Graph {
    ops: Vec<Op>,
    owned: Vec<DevPtr>,
}

/// How often the host reached the device other than by launching: what a
/// device-resident search step must not do between its progress points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTraffic {
    /// Host-to-device copies.
    pub uploads: usize,
    /// Device-to-host copies (each waits for the device on a GPU).
    pub downloads: usize,
    /// Explicit waits for the device.
    pub syncs: usize,
    /// Recorded graphs launched (one submission each).
    pub graph_launches: usize,
}

impl Default for EmuDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuDriver {
    /// An emulated device with the default memory limit.
    pub fn new() -> EmuDriver {
        let limit = std::env::var("CWP_EMU_MEMORY")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4usize << 30);
        Self::with_memory_limit(limit)
    }

    /// An emulated device that holds at most `bytes` of allocations.
    pub fn with_memory_limit(bytes: usize) -> EmuDriver {
        EmuDriver {
            limit: bytes,
            live: Mutex::new(BTreeMap::new()),
            traffic: Default::default(),
            capture: Mutex::new(None),
            graphs: Mutex::new(HashMap::new()),
            next_graph: AtomicUsize::new(1),
            launches: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on the recording under way, if there is one.
    fn capturing<T>(&self, f: impl FnOnce(&mut Capture) -> T) -> Option<T> {
        self.capture.lock().ok().and_then(|mut c| c.as_mut().map(f))
    }

    /// Fails while a recording is under way: `what` cannot be recorded.
    fn not_while_capturing(&self, what: &str) -> Result<()> {
        match self.capturing(|_| ()) {
            Some(()) => Err(Error::Backend(format!(
                "emu: {what} while recording a graph (a CUDA graph cannot hold it)"
            ))),
            None => Ok(()),
        }
    }

    fn free_now(&self, ptr: DevPtr) {
        let Some(bytes) = self.live.lock().ok().and_then(|mut l| l.remove(&ptr)) else {
            return;
        };
        if let Ok(layout) = Layout::from_size_align(bytes, ALIGN) {
            // SAFETY: `ptr` came from `alloc` with this layout and is freed once.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }

    /// Fails unless the memory `op` touches lies in live allocations.
    fn check_op(&self, op: &Op) -> Result<()> {
        match op {
            Op::Copy { dst, src, bytes } => {
                self.check_range("device-to-device copy (source)", *src, *bytes)?;
                self.check_range("device-to-device copy (destination)", *dst, *bytes)
            }
            Op::Zero { dst, bytes } => self.check_range("memset", *dst, *bytes),
            Op::Launch { .. } => Ok(()),
        }
    }

    fn run(&self, op: &Op) -> Result<()> {
        self.check_op(op)?;
        match op {
            Op::Launch {
                kernel,
                body,
                grid,
                block,
                smem,
                args,
            } => {
                let mut ptrs: Vec<*mut c_void> =
                    args.iter().map(|a| a.as_ptr() as *mut c_void).collect();
                // SAFETY: the argument values were copied from a launch of
                // this kernel with exactly its parameter sizes.
                unsafe { run_kernel(kernel, *body, *grid, *block, *smem, &mut ptrs) }
            }
            Op::Copy { dst, src, bytes } => {
                // SAFETY: both ranges were checked against live allocations;
                // `copy` allows overlap.
                unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
                Ok(())
            }
            Op::Zero { dst, bytes } => {
                // SAFETY: the range was checked against a live allocation.
                unsafe { std::ptr::write_bytes(*dst as *mut u8, 0, *bytes) };
                Ok(())
            }
        }
    }

    /// How often `kernel` was launched (or recorded) so far: lets a test
    /// see which kernels a backend op chose.
    pub fn launches(&self, kernel: &str) -> usize {
        self.launches
            .lock()
            .map(|m| m.get(kernel).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Host copies and waits made through this driver so far.
    pub fn host_traffic(&self) -> HostTraffic {
        let t = &self.traffic;
        HostTraffic {
            uploads: t.uploads.load(Ordering::Relaxed),
            downloads: t.downloads.load(Ordering::Relaxed),
            syncs: t.syncs.load(Ordering::Relaxed),
            graph_launches: t.graph_launches.load(Ordering::Relaxed),
        }
    }

    fn used(&self) -> usize {
        self.live.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Fails unless `[ptr, ptr+bytes)` lies inside one live allocation.
    fn check_range(&self, what: &str, ptr: DevPtr, bytes: usize) -> Result<()> {
        let live = self
            .live
            .lock()
            .map_err(|_| Error::Backend("emu: allocation table poisoned".into()))?;
        match live.range(..=ptr).next_back() {
            Some((&start, &len)) if ptr + bytes as u64 <= start + len as u64 => Ok(()),
            _ => Err(Error::Backend(format!(
                "emu: {what} of {bytes} bytes at {ptr:#x} is outside every live allocation"
            ))),
        }
    }
}

fn bodies() -> &'static HashMap<&'static str, EmuBody> {
    static MAP: OnceLock<HashMap<&'static str, EmuBody>> = OnceLock::new();
    MAP.get_or_init(|| EMU_BODIES.iter().copied().collect())
}

impl EmuDriver {
    /// Runs `op` now, or records it while a recording is under way (its
    /// ranges checked now, and again when a replay runs it).
    fn submit(&self, op: Op) -> Result<()> {
        if self.capturing(|_| ()).is_none() {
            return self.run(&op);
        }
        self.check_op(&op)?;
        self.capturing(|c| c.ops.push(op))
            .ok_or_else(|| Error::Backend("emu: the recording ended while submitting".into()))
    }
}

/// The byte size of each parameter of `kernel`.
fn arg_sizes(kernel: &str) -> Result<Vec<usize>> {
    static MAP: OnceLock<HashMap<&'static str, EmuArgSizes>> = OnceLock::new();
    let f = MAP
        .get_or_init(|| EMU_ARG_SIZES.iter().copied().collect())
        .get(kernel)
        .ok_or_else(|| Error::Backend(format!("emu: no kernel named `{kernel}`")))?;
    let mut out = [0 as std::ffi::c_ulong; 64];
    // SAFETY: the generated function writes one size per parameter; no
    // kernel has more than 64.
    let n = unsafe { f(out.as_mut_ptr()) };
    Ok(out[..n.clamp(0, 64) as usize]
        .iter()
        .map(|&v| v as usize)
        .collect())
}

/// Runs every block of one launch now.
///
/// # Safety
/// As [`Driver::launch`].
unsafe fn run_kernel(
    kernel: &str,
    body: EmuBody,
    grid: Dim3,
    block: Dim3,
    shared_bytes: u32,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: the caller guarantees the argument list matches the kernel.
    let rc = unsafe {
        cwp_emu_launch(
            body,
            args.as_mut_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            shared_bytes,
        )
    };
    let why = match rc {
        0 => return Ok(()),
        1 => "block dimensions are zero or over 1024 threads",
        2 => "grid dimensions are zero or over the limits",
        3 => "deadlock: threads of a block wait on a barrier the others never reach",
        4 => "cannot map the fiber stacks",
        5 => "dynamic shared memory over 227 KiB",
        6 => {
            "a kernel that ran without barriers before reached a barrier (the emulator \
              ran it without fibers; the launch was stopped, its outputs are incomplete)"
        }
        _ => "unknown emulator error",
    };
    Err(Error::Backend(format!(
        "emu: launch of `{kernel}` (grid {grid:?}, block {block:?}) failed: {why}"
    )))
}

impl Driver for EmuDriver {
    fn name(&self) -> String {
        "emu (CUDA kernels emulated on the CPU)".into()
    }

    fn arch(&self) -> String {
        "emu".into()
    }

    /// An H200's, so that the emulator picks the tiles the H200 does.
    fn sm_count(&self) -> usize {
        132
    }

    fn alloc(&self, bytes: usize) -> std::result::Result<DevPtr, AllocError> {
        let bytes = bytes.max(1);
        let used = self.used();
        if used + bytes > self.limit {
            return Err(AllocError::OutOfMemory {
                free: Some(self.limit.saturating_sub(used)),
                total: Some(self.limit),
            });
        }
        let layout = Layout::from_size_align(bytes, ALIGN)
            .map_err(|e| AllocError::Other(Error::Backend(format!("emu: {e}"))))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(AllocError::OutOfMemory {
                free: None,
                total: Some(self.limit),
            });
        }
        // Poison: all-ones bytes are a NaN in f32.
        // SAFETY: `p` points to `bytes` freshly allocated bytes.
        unsafe { std::ptr::write_bytes(p, 0xff, bytes) };
        let ptr = p as u64;
        if let Ok(mut live) = self.live.lock() {
            live.insert(ptr, bytes);
        }
        self.capturing(|c| c.live.insert(ptr));
        Ok(ptr)
    }

    /// While recording, memory allocated in the recording stays with the
    /// graph (a CUDA graph's memory nodes), and freeing older memory is a
    /// fault: every replay would free it again.
    fn free(&self, ptr: DevPtr) {
        let kept = self.capturing(|c| {
            if c.live.remove(&ptr) {
                c.owned.push(ptr);
                true
            } else {
                c.fault.get_or_insert_with(|| {
                    format!(
                        "memory at {ptr:#x}, allocated before the recording, was freed in it \
                         (every replay would free it again)"
                    )
                });
                false
            }
        });
        if kept != Some(true) {
            self.free_now(ptr);
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.traffic.uploads.fetch_add(1, Ordering::Relaxed);
        self.not_while_capturing("a host-to-device copy")?;
        self.check_range("host-to-device copy", dst, src.len())?;
        // SAFETY: the range was checked against a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.traffic.downloads.fetch_add(1, Ordering::Relaxed);
        self.not_while_capturing("a device-to-host copy")?;
        self.check_range("device-to-host copy", src, dst.len())?;
        // SAFETY: the range was checked against a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.submit(Op::Copy { dst, src, bytes })
    }

    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.submit(Op::Zero { dst, bytes })
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let body = *bodies()
            .get(kernel)
            .ok_or_else(|| Error::Backend(format!("emu: no kernel named `{kernel}`")))?;
        if let Ok(mut m) = self.launches.lock() {
            *m.entry(kernel.to_string()).or_default() += 1;
        }
        if self.capturing(|_| ()).is_none() {
            // SAFETY: the caller guarantees the argument list matches the kernel.
            return unsafe { run_kernel(kernel, body, grid, block, shared_bytes, args) };
        }
        let sizes = arg_sizes(kernel)?;
        if sizes.len() != args.len() {
            return Err(Error::Backend(format!(
                "emu: `{kernel}` takes {} arguments, {} given",
                sizes.len(),
                args.len()
            )));
        }
        let args = sizes
            .iter()
            .zip(args.iter())
            .map(|(&n, &p)| {
                let mut words = vec![0u64; n.div_ceil(8)];
                // SAFETY: the caller guarantees `p` points to a value of the
                // parameter's type, `n` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(p as *const u8, words.as_mut_ptr() as *mut u8, n)
                };
                words
            })
            .collect();
        self.submit(Op::Launch {
            kernel: kernel.to_string(),
            body,
            grid,
            block,
            smem: shared_bytes,
            args,
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.traffic.syncs.fetch_add(1, Ordering::Relaxed);
        self.not_while_capturing("a wait for the device")
    }

    fn begin_capture(&self) -> Result<()> {
        let mut c = self
            .capture
            .lock()
            .map_err(|_| Error::Backend("emu: capture state poisoned".into()))?;
        if c.is_some() {
            return Err(Error::Backend(
                "emu: a recording is already under way".into(),
            ));
        }
        *c = Some(Capture::default());
        Ok(())
    }

    fn end_capture(&self) -> Result<GraphId> {
        let c = self
            .capture
            .lock()
            .map_err(|_| Error::Backend("emu: capture state poisoned".into()))?
            .take()
            .ok_or_else(|| Error::Backend("emu: no recording is under way".into()))?;
        let fault = c.fault.or_else(|| {
            (!c.live.is_empty()).then(|| {
                format!(
                    "{} allocation(s) made while recording outlive it (a graph's memory \
                     lives only while it runs)",
                    c.live.len()
                )
            })
        });
        if let Some(why) = fault {
            for p in c.owned {
                self.free_now(p);
            }
            return Err(Error::Backend(format!("emu: recording refused: {why}")));
        }
        let id = self.next_graph.fetch_add(1, Ordering::Relaxed) as GraphId;
        if let Ok(mut g) = self.graphs.lock() {
            g.insert(
                id,
                Graph {
                    ops: c.ops,
                    owned: c.owned,
                },
            );
        }
        Ok(id)
    }

    fn launch_graph(&self, graph: GraphId) -> Result<()> {
        self.traffic.graph_launches.fetch_add(1, Ordering::Relaxed);
        self.not_while_capturing("a graph launch")?;
        let graphs = self
            .graphs
            .lock()
            .map_err(|_| Error::Backend("emu: graph table poisoned".into()))?;
        let g = graphs
            .get(&graph)
            .ok_or_else(|| Error::Backend(format!("emu: no graph {graph}")))?;
        g.ops.iter().try_for_each(|op| self.run(op))
    }

    fn destroy_graph(&self, graph: GraphId) {
        let g = self.graphs.lock().ok().and_then(|mut g| g.remove(&graph));
        for p in g.map(|g| g.owned).unwrap_or_default() {
            self.free_now(p);
        }
    }

    fn memory(&self) -> Result<(usize, usize)> {
        Ok((self.limit.saturating_sub(self.used()), self.limit))
    }
}
