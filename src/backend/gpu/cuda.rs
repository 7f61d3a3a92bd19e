//! The CUDA driver: a real GPU through cudarc's driver API bindings, loaded
//! at run time (the binary builds and starts on machines without CUDA).
//!
//! One primary context and one stream per device. Memory comes from the
//! device's stream-ordered pool (`cuMemAllocAsync`/`cuMemFreeAsync`), so
//! freeing the intermediates of a forward pass never waits for the GPU.
//! Kernel files are read from the disk cache, or compiled on first use by
//! NVRTC for the device's own architecture (see [`super::nvrtc`]) and
//! cached; NVRTC is loaded only when a kernel is not in the cache.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::Mutex;

use cudarc::driver::result as cu;
use cudarc::driver::sys;

use super::driver::{AllocError, DevPtr, Dim3, Driver, GraphId};
use super::kernels::{file_of, KernelFile};
use super::nvrtc::{self, Origin};
use crate::error::{Error, Result};

/// Loads the CUDA driver library, or says why it cannot. `CWP_CUDA_LIB` may
/// name the library file; otherwise `dlopen` searches for `libcuda.so.1`.
pub fn ensure_libcuda() -> Result<()> {
    static STATE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("CWP_CUDA_LIB") {
                nvrtc::preload(std::path::Path::new(&path), "CWP_CUDA_LIB")?;
            }
            // SAFETY: only probes dlopen with cudarc's candidate names.
            if unsafe { sys::is_culib_present() } {
                Ok(())
            } else {
                Err(
                    "the CUDA driver library (libcuda.so.1) was not found: no NVIDIA driver is \
                     installed here, or its folder is not on the library path"
                        .to_string(),
                )
            }
        })
        .clone()
        .map_err(Error::Backend)
}

fn err(what: &str, e: cu::DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Backend(format!("CUDA: {what}: {name} ({text})"))
}

/// Raw CUDA handles; the driver API is thread-safe.
struct Handles {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
}
// SAFETY: CUDA contexts and streams may be used from any thread once the
// context is made current there, which every method does first.
unsafe impl Send for Handles {}
// SAFETY: as above.
unsafe impl Sync for Handles {}

struct Module {
    module: sys::CUmodule,
}
// SAFETY: a loaded module is a device-side object usable from any thread.
unsafe impl Send for Module {}

/// An instantiated CUDA graph.
struct Exec(sys::CUgraphExec);
// SAFETY: an executable graph is a driver object usable from any thread
// with its context current.
unsafe impl Send for Exec {}

#[derive(Clone, Copy)]
struct Func(sys::CUfunction);
// SAFETY: a function handle is immutable and valid while its module is loaded.
unsafe impl Send for Func {}

/// A CUDA device.
pub struct CudaDriver {
    ordinal: usize,
    dev: sys::CUdevice,
    h: Handles,
    name: String,
    cc: (i32, i32),
    sm_count: usize,
    cache: Option<PathBuf>,
    modules: Mutex<HashMap<&'static str, Module>>,
    funcs: Mutex<HashMap<&'static str, Func>>,
    graphs: Mutex<HashMap<GraphId, Exec>>,
    next_graph: std::sync::atomic::AtomicU64,
}

impl CudaDriver {
    /// Opens device `ordinal`: checks that the driver library is present,
    /// creates the context and stream. NVRTC is not needed here: it is
    /// loaded when a kernel is missing from the cache. Every failure is an
    /// error that says what is missing; nothing panics.
    pub fn new(ordinal: usize) -> Result<CudaDriver> {
        ensure_libcuda()?;
        cu::init().map_err(|e| err("cuInit (is an NVIDIA GPU visible here?)", e))?;
        let count = cu::device::get_count().map_err(|e| err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Backend(format!(
                "CUDA device {ordinal} does not exist: {count} device(s) found"
            )));
        }
        let dev = cu::device::get(ordinal as i32).map_err(|e| err("cuDeviceGet", e))?;
        let attr = |a| {
            // SAFETY: `dev` came from cuDeviceGet.
            unsafe { cu::device::get_attribute(dev, a) }.map_err(|e| err("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute as A;
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
        let pools = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)?;
        if pools == 0 {
            return Err(Error::Backend(format!(
                "CUDA device {ordinal} does not support stream-ordered memory pools"
            )));
        }
        let name = cu::device::get_name(dev).map_err(|e| err("cuDeviceGetName", e))?;
        // SAFETY: `dev` came from cuDeviceGet; released in Drop.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: a live context.
        unsafe { cu::ctx::set_current(ctx) }.map_err(|e| err("cuCtxSetCurrent", e))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| err("cuStreamCreate", e))?;
        // Keep freed memory in the pool instead of returning it at every sync.
        // SAFETY: `dev` is valid; the attribute takes a u64.
        unsafe {
            if let Ok(pool) = cu::device::get_default_mem_pool(dev) {
                let mut threshold: u64 = u64::MAX;
                let _ = cu::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut c_void,
                );
            }
        }
        Ok(CudaDriver {
            ordinal,
            dev,
            h: Handles { ctx, stream },
            name,
            cc,
            sm_count,
            cache: nvrtc::cache_dir(),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            graphs: Mutex::new(HashMap::new()),
            next_graph: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// The device's own CUBIN target (`sm_90`), which the kernel cache is
    /// searched for first; when NVRTC does not know this device, kernels
    /// are compiled to PTX of the newest architecture it knows instead.
    pub fn target(&self) -> String {
        nvrtc::native_target(self.cc)
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context lives as long as `self`.
        unsafe { cu::ctx::set_current(self.h.ctx) }.map_err(|e| err("cuCtxSetCurrent", e))
    }

    /// Gives the memory the pool keeps from earlier frees back to the
    /// device. The pool never releases it by itself (its release threshold
    /// is the maximum, so that steady-state allocations cost nothing), but
    /// only `cuMemAllocAsync` can reuse it: module loads, graph
    /// instantiation and graph launches allocate outside the pool.
    fn release_pooled(&self) {
        // SAFETY: a live stream and the device's own default pool; the
        // synchronisation completes the pending frees first.
        unsafe {
            let _ = cu::stream::synchronize(self.h.stream);
            if let Ok(pool) = cu::device::get_default_mem_pool(self.dev) {
                let _ = cu::mem_pool::trim_to(pool, 0);
            }
        }
    }

    /// Runs `f`, and once more after [`Self::release_pooled`] if it ran out
    /// of memory: so that memory freed into the pool (after a batch that
    /// filled the device, say) never makes a later launch fail.
    fn retry_oom<T>(
        &self,
        mut f: impl FnMut() -> std::result::Result<T, cudarc::driver::DriverError>,
    ) -> std::result::Result<T, cudarc::driver::DriverError> {
        match f() {
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                self.release_pooled();
                f()
            }
            r => r,
        }
    }

    /// Compiles (or reads from the cache) and loads every kernel file now,
    /// so that the first timed launch does not include compilation.
    pub fn load_all(&self) -> Result<()> {
        for f in super::kernels::KERNEL_FILES {
            if let Some(k) = f.kernels.first() {
                self.function(k)?;
            }
        }
        Ok(())
    }

    fn load_module(&self, file: &'static KernelFile) -> Result<sys::CUmodule> {
        let (img, origin, target) =
            nvrtc::image_for(&nvrtc::Nvrtc, file, self.cc, self.cache.as_deref())?;
        let mut bytes = img.bytes().to_vec();
        if !bytes.ends_with(&[0]) {
            bytes.push(0);
        }
        // SAFETY: a CUBIN or NUL-terminated PTX image, alive during the call.
        match self.retry_oom(|| unsafe { cu::module::load_data(bytes.as_ptr() as *const c_void) }) {
            Ok(m) => Ok(m),
            Err(e) if origin == Origin::Cache => {
                // The cached entry was intact but the driver refused it:
                // drop it and compile afresh.
                if let Some(dir) = &self.cache {
                    nvrtc::evict(file, &target, dir);
                }
                let (img, _) = nvrtc::compile_cached(file, &target, self.cache.as_deref())
                    .map_err(|e2| {
                        Error::Backend(format!(
                            "the driver refused the cached kernels/{} for {target} ({e:?}) and it \
                             cannot be rebuilt: {e2}",
                            file.name
                        ))
                    })?;
                let mut bytes = img.bytes().to_vec();
                bytes.push(0);
                // SAFETY: as above.
                unsafe { cu::module::load_data(bytes.as_ptr() as *const c_void) }.map_err(|e2| {
                    err(
                        &format!("loading kernels/{} (cached copy refused: {e:?})", file.name),
                        e2,
                    )
                })
            }
            Err(e) => Err(err(
                &format!("loading kernels/{} for {target}", file.name),
                e,
            )),
        }
    }

    fn function(&self, kernel: &str) -> Result<Func> {
        let file = file_of(kernel)
            .ok_or_else(|| Error::Backend(format!("no kernel named `{kernel}` in kernels/*.cu")))?;
        let name = *file
            .kernels
            .iter()
            .find(|k| **k == kernel)
            .expect("file_of found it");
        if let Some(f) = self.funcs.lock().map_err(poisoned)?.get(name) {
            return Ok(*f);
        }
        self.bind()?;
        let mut modules = self.modules.lock().map_err(poisoned)?;
        if !modules.contains_key(file.name) {
            let m = self.load_module(file)?;
            modules.insert(file.name, Module { module: m });
        }
        let module = modules[file.name].module;
        let mut funcs = self.funcs.lock().map_err(poisoned)?;
        for k in file.kernels {
            let cname = CString::new(*k).unwrap_or_default();
            // SAFETY: the module is loaded and stays loaded until Drop.
            let f = unsafe { cu::module::get_function(module, cname) }
                .map_err(|e| err(&format!("cuModuleGetFunction({k})"), e))?;
            funcs.insert(k, Func(f));
        }
        Ok(funcs[name])
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Backend("CUDA driver state poisoned by an earlier panic".into())
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // The pool is the device's, not this driver's: what this driver
            // freed into it goes back to the device with it (this also waits
            // for the stream).
            self.release_pooled();
            // SAFETY: the stream, modules and context reference belong to
            // this driver; nothing uses them after this point.
            unsafe {
                if let Ok(m) = self.modules.lock() {
                    for module in m.values() {
                        let _ = cu::module::unload(module.module);
                    }
                }
                let _ = cu::stream::destroy(self.h.stream);
                let _ = cu::primary_ctx::release(self.dev);
            }
        }
    }
}

impl Driver for CudaDriver {
    fn name(&self) -> String {
        format!(
            "cuda:{} {} (sm_{}{}, {} SMs)",
            self.ordinal, self.name, self.cc.0, self.cc.1, self.sm_count
        )
    }

    fn arch(&self) -> String {
        format!("cuda sm_{}{}", self.cc.0, self.cc.1)
    }

    fn sm_count(&self) -> usize {
        self.sm_count
    }

    fn alloc(&self, bytes: usize) -> std::result::Result<DevPtr, AllocError> {
        self.bind().map_err(AllocError::Other)?;
        // SAFETY: a live stream; the memory is only used on it.
        match self.retry_oom(|| unsafe { cu::malloc_async(self.h.stream, bytes) }) {
            Ok(p) => Ok(p),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                let info = cu::mem_get_info().ok();
                Err(AllocError::OutOfMemory {
                    free: info.map(|i| i.0),
                    total: info.map(|i| i.1),
                })
            }
            Err(e) => Err(AllocError::Other(err("cuMemAllocAsync", e))),
        }
    }

    fn free(&self, ptr: DevPtr) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once, in stream order.
            let _ = unsafe { cu::free_async(ptr, self.h.stream) };
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds at least `src.len()` bytes (the backend's
        // allocation); a pageable source is staged before this returns.
        unsafe { cu::memcpy_htod_async(dst, src, self.h.stream) }
            .map_err(|e| err("cuMemcpyHtoDAsync", e))
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `src` holds at least `dst.len()` bytes; we wait below.
        unsafe { cu::memcpy_dtoh_async(dst, src, self.h.stream) }
            .map_err(|e| err("cuMemcpyDtoHAsync", e))?;
        self.synchronize()
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges are live allocations of at least `bytes`.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.h.stream) }
            .map_err(|e| err("cuMemcpyDtoDAsync", e))
    }

    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds at least `bytes`.
        unsafe { cu::memset_d8_async(dst, 0, bytes, self.h.stream) }
            .map_err(|e| err("cuMemsetD8Async", e))
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.function(kernel)?;
        self.bind()?;
        // SAFETY: the caller guarantees the argument list matches the kernel.
        // (A launch allocates when the kernel needs more local memory than
        // any before it.)
        self.retry_oom(|| unsafe {
            cu::launch_kernel(
                f.0,
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                shared_bytes,
                self.h.stream,
                args,
            )
        })
        .map_err(|e| {
            err(
                &format!("launch of `{kernel}` (grid {grid:?}, block {block:?})"),
                e,
            )
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: a live stream.
        unsafe { cu::stream::synchronize(self.h.stream) }
            .map_err(|e| err("a kernel failed (reported at stream synchronize)", e))
    }

    fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cu::mem_get_info().map_err(|e| err("cuMemGetInfo", e))
    }

    fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        // Relaxed: loading a module while recording (a first launch) is allowed.
        // SAFETY: a live stream.
        unsafe {
            sys::cuStreamBeginCapture_v2(
                self.h.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .result()
        .map_err(|e| err("cuStreamBeginCapture", e))
    }

    fn end_capture(&self) -> Result<GraphId> {
        self.bind()?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: a live stream under capture; `graph` receives the result.
        unsafe { sys::cuStreamEndCapture(self.h.stream, &mut graph) }
            .result()
            .map_err(|e| err("cuStreamEndCapture", e))?;
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` is the captured graph; it is not needed once instantiated.
        let made = self.retry_oom(|| {
            // SAFETY: as above; a failed instantiation leaves `exec` unset.
            unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result()
        });
        // SAFETY: as above.
        unsafe { sys::cuGraphDestroy(graph) };
        made.map_err(|e| err("cuGraphInstantiateWithFlags", e))?;
        let id = self
            .next_graph
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.graphs
            .lock()
            .map_err(|_| Error::Backend("CUDA: graph table poisoned".into()))?
            .insert(id, Exec(exec));
        Ok(id)
    }

    fn launch_graph(&self, graph: GraphId) -> Result<()> {
        self.bind()?;
        let graphs = self
            .graphs
            .lock()
            .map_err(|_| Error::Backend("CUDA: graph table poisoned".into()))?;
        let exec = graphs
            .get(&graph)
            .ok_or_else(|| Error::Backend(format!("CUDA: no graph {graph}")))?;
        // SAFETY: an instantiated graph and a live stream.
        self.retry_oom(|| unsafe { sys::cuGraphLaunch(exec.0, self.h.stream) }.result())
            .map_err(|e| err("cuGraphLaunch", e))
    }

    fn destroy_graph(&self, graph: GraphId) {
        let exec = self.graphs.lock().ok().and_then(|mut g| g.remove(&graph));
        if let (Some(exec), Ok(())) = (exec, self.bind()) {
            // SAFETY: launches still pending complete before it goes.
            unsafe { sys::cuGraphExecDestroy(exec.0) };
        }
    }
}
