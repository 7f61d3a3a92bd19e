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
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::driver::{AllocError, DevPtr, Dim3, Driver};
use super::kernels::{EmuBody, EMU_BODIES};
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
    /// Host copies and waits so far, for [`EmuDriver::host_traffic`].
    traffic: [AtomicUsize; 3],
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
        }
    }

    /// Host copies and waits made through this driver so far.
    pub fn host_traffic(&self) -> HostTraffic {
        let [u, d, s] = &self.traffic;
        HostTraffic {
            uploads: u.load(Ordering::Relaxed),
            downloads: d.load(Ordering::Relaxed),
            syncs: s.load(Ordering::Relaxed),
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
        Ok(ptr)
    }

    fn free(&self, ptr: DevPtr) {
        let Some(bytes) = self.live.lock().ok().and_then(|mut l| l.remove(&ptr)) else {
            return;
        };
        if let Ok(layout) = Layout::from_size_align(bytes, ALIGN) {
            // SAFETY: `ptr` came from `alloc` with this layout and is freed once.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.traffic[0].fetch_add(1, Ordering::Relaxed);
        self.check_range("host-to-device copy", dst, src.len())?;
        // SAFETY: the range was checked against a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.traffic[1].fetch_add(1, Ordering::Relaxed);
        self.check_range("device-to-host copy", src, dst.len())?;
        // SAFETY: the range was checked against a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.check_range("device-to-device copy (source)", src, bytes)?;
        self.check_range("device-to-device copy (destination)", dst, bytes)?;
        // SAFETY: both ranges are inside live allocations; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.check_range("memset", dst, bytes)?;
        // SAFETY: the range was checked against a live allocation.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let body = bodies()
            .get(kernel)
            .ok_or_else(|| Error::Backend(format!("emu: no kernel named `{kernel}`")))?;
        // SAFETY: the caller guarantees the argument list matches the kernel.
        let rc = unsafe {
            cwp_emu_launch(
                *body,
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

    fn synchronize(&self) -> Result<()> {
        self.traffic[2].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn memory(&self) -> Result<(usize, usize)> {
        Ok((self.limit.saturating_sub(self.used()), self.limit))
    }
}
