//! Run-time compilation of the kernel files with NVRTC, and the on-disk cache
//! of compiled modules.
//!
//! Each file is compiled for the device's own architecture (`sm_XY`) straight
//! to CUBIN, so the driver never JIT-compiles PTX (a driver older than the
//! NVRTC would reject its newer PTX). When this NVRTC does not know the
//! device's architecture, the newest one it knows is compiled to PTX instead
//! and the driver JIT-compiles that.
//!
//! Compiled images are cached under `$CWP_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/classwise`, else `~/.cache/classwise`, keyed by the SHA-256
//! of the source, the headers and the options (which name the target
//! architecture). The NVRTC version is not in the key, so the key can be
//! computed without NVRTC: a machine whose cache holds every kernel (e.g. one
//! filled by `cwp precompile`) never loads NVRTC at all. A CUBIN the driver
//! refuses is evicted and compiled afresh. An entry carries its own checksum;
//! one that is unreadable, truncated or corrupted is a miss and is rebuilt.
//! Entries are written atomically (temp file + rename).

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

use super::kernels::{KernelFile, KERNEL_FILES, KERNEL_HEADERS};
use super::locate;
use crate::error::{Error, Result};

/// What NVRTC produced for a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Image {
    /// Machine code for one real architecture (an ELF).
    Cubin(Vec<u8>),
    /// PTX text (NUL-terminated), for the driver to JIT-compile.
    Ptx(Vec<u8>),
}

impl Image {
    /// The bytes to hand to `cuModuleLoadData`.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Image::Cubin(b) | Image::Ptx(b) => b,
        }
    }
}

/// Loads NVRTC, or says clearly why it cannot. Tried in order:
/// `CWP_NVRTC_LIB` (the library file, e.g. the one in the
/// `nvidia-cuda-nvrtc` wheel; an error if it does not load), the usual
/// `dlopen` search (`LD_LIBRARY_PATH`, ld.so cache), then the CUDA toolkit
/// and Python-wheel folders of [`super::locate::nvrtc_dirs`]. The error when
/// none works lists the folders searched.
pub fn ensure_nvrtc() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("CWP_NVRTC_LIB") {
                preload(Path::new(&path), "CWP_NVRTC_LIB")?;
            }
            // SAFETY: only probes dlopen with cudarc's candidate names.
            if unsafe { sys::is_culib_present() } {
                return Ok(());
            }
            let dirs = locate::nvrtc_dirs(&|k| std::env::var_os(k), Path::new("/"));
            let mut refused = Vec::new();
            for lib in locate::nvrtc_files(&dirs) {
                match preload(&lib, "found") {
                    // SAFETY: as above; the preloaded soname now resolves.
                    Ok(()) if unsafe { sys::is_culib_present() } => return Ok(()),
                    Ok(()) => refused.push(format!("{}: loaded but not usable", lib.display())),
                    Err(e) => refused.push(e),
                }
            }
            let searched = if dirs.is_empty() {
                "no CUDA toolkit or Python-wheel folder exists here".to_string()
            } else {
                let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                format!("neither have these folders: {}", list.join(", "))
            };
            let refused = if refused.is_empty() {
                String::new()
            } else {
                format!("; these did not load: {}", refused.join("; "))
            };
            Err(format!(
                "NVRTC ({}) was not found: CWP_NVRTC_LIB is {}, the library path \
                 (LD_LIBRARY_PATH, ld.so cache) has none, and {searched}{refused}. Install the `nvidia-cuda-nvrtc` wheel \
                 (`pip install nvidia-cuda-nvrtc`) or a CUDA toolkit, or point CWP_NVRTC_LIB \
                 at the library; a kernel cache filled by `cwp precompile` needs no NVRTC",
                locate::NVRTC_SONAMES.join(" or "),
                if std::env::var_os("CWP_NVRTC_LIB").is_some() {
                    "set"
                } else {
                    "unset"
                },
            ))
        })
        .clone()
        .map_err(Error::Backend)
}

/// Loads a shared library by path (`var` names where the path came from, for
/// the message) and keeps it loaded, so that a later
/// `dlopen` of its soname (what cudarc does) finds it.
pub fn preload(path: &Path, var: &str) -> std::result::Result<(), String> {
    // SAFETY: loading a shared library runs its initialisers; these are the
    // CUDA libraries the user pointed us at.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            Ok(())
        }
        Err(e) => Err(format!("{var}={}: cannot load: {e}", path.display())),
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: NVRTC is loaded; the out-pointers are valid.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    check(rc, "nvrtcVersion")?;
    Ok((major, minor))
}

/// The real architectures this NVRTC can compile for (e.g. 75, 80, 90).
pub fn supported_archs() -> Result<Vec<i32>> {
    ensure_nvrtc()?;
    let mut n: c_int = 0;
    // SAFETY: NVRTC is loaded; the out-pointer is valid.
    check(
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) },
        "nvrtcGetNumSupportedArchs",
    )?;
    let mut v = vec![0 as c_int; n.max(0) as usize];
    // SAFETY: `v` holds as many ints as NVRTC reported.
    check(
        unsafe { sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) },
        "nvrtcGetSupportedArchs",
    )?;
    Ok(v)
}

fn check(rc: sys::nvrtcResult, what: &str) -> Result<()> {
    if rc == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Backend(format!("NVRTC: {what} failed: {rc:?}")))
    }
}

/// The options every kernel file is compiled with, for target `arch`
/// (`sm_90` for CUBIN, `compute_90` for PTX).
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-DCWP_NVRTC=1".into(),
    ]
}

/// Compiles one kernel file for `arch`. A compile error carries NVRTC's log.
pub fn compile(file: &KernelFile, arch: &str) -> Result<Image> {
    compile_with(file, arch, &[]).map(|(img, _)| img)
}

/// Compiles with extra options (e.g. `--ptxas-options=-v` for the
/// assembler's resource report); returns the image and NVRTC's log.
pub fn compile_with(file: &KernelFile, arch: &str, extra: &[&str]) -> Result<(Image, String)> {
    ensure_nvrtc()?;
    let src = CString::new(file.source)
        .map_err(|_| Error::Backend(format!("{}: NUL byte in source", file.name)))?;
    let name = CString::new(file.name).unwrap_or_default();
    let hdr_src: Vec<CString> = KERNEL_HEADERS
        .iter()
        .map(|(_, s)| CString::new(*s).unwrap_or_default())
        .collect();
    let hdr_name: Vec<CString> = KERNEL_HEADERS
        .iter()
        .map(|(n, _)| CString::new(*n).unwrap_or_default())
        .collect();
    let hdr_src_p: Vec<*const c_char> = hdr_src.iter().map(|s| s.as_ptr()).collect();
    let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|s| s.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string; the
    // program is destroyed below before they are dropped.
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                hdr_src_p.len() as c_int,
                hdr_src_p.as_ptr(),
                hdr_name_p.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    // SAFETY: `prog` was created above and is destroyed exactly once.
    let out = unsafe { compile_program(prog, file.name, arch, extra) };
    // SAFETY: as above.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    out
}

/// # Safety
/// `prog` must be a live program.
unsafe fn compile_program(
    prog: sys::nvrtcProgram,
    name: &str,
    arch: &str,
    extra: &[&str],
) -> Result<(Image, String)> {
    let opts: Vec<CString> = options(arch)
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .map(|o| CString::new(o).unwrap_or_default())
        .collect();
    let opt_p: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: the caller's program; options are live C strings.
    let rc = unsafe { sys::nvrtcCompileProgram(prog, opt_p.len() as c_int, opt_p.as_ptr()) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        // SAFETY: as above.
        let log = unsafe { program_log(prog) };
        return Err(Error::Backend(format!(
            "NVRTC could not compile kernels/{name} for {arch} ({rc:?}):\n{log}"
        )));
    }
    let mut size = 0usize;
    // SAFETY: as above.
    check(
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) },
        "nvrtcGetCUBINSize",
    )?;
    if size > 0 {
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds `size` bytes.
        check(
            unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) },
            "nvrtcGetCUBIN",
        )?;
        // SAFETY: as above.
        return Ok((Image::Cubin(buf), unsafe { program_log(prog) }));
    }
    // SAFETY: as above.
    check(
        unsafe { sys::nvrtcGetPTXSize(prog, &mut size) },
        "nvrtcGetPTXSize",
    )?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes.
    check(
        unsafe { sys::nvrtcGetPTX(prog, buf.as_mut_ptr() as *mut c_char) },
        "nvrtcGetPTX",
    )?;
    // SAFETY: as above.
    Ok((Image::Ptx(buf), unsafe { program_log(prog) }))
}

/// # Safety
/// `prog` must be a live program.
unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: the caller's program.
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS {
        return "(no log)".into();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes.
    if unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return "(no log)".into();
    }
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

/// The target to compile for on a device of compute capability `major.minor`:
/// `sm_XY` (CUBIN) when this NVRTC supports it, else `compute_AB` (PTX) for
/// the newest architecture it supports that the device can run.
pub fn target_for(major: i32, minor: i32) -> Result<String> {
    let cc = major * 10 + minor;
    let archs = supported_archs()?;
    if archs.contains(&cc) {
        return Ok(format!("sm_{cc}"));
    }
    match archs.iter().copied().filter(|a| *a <= cc).max() {
        Some(a) => Ok(format!("compute_{a}")),
        None => Err(Error::Backend(format!(
            "this NVRTC supports none of the architectures a device of compute capability \
             {major}.{minor} can run (it knows {archs:?})"
        ))),
    }
}

/// The directory of the kernel cache.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CWP_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("classwise"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("classwise"))
}

/// The cache key of a file compiled for `arch`: the SHA-256 of its name,
/// source, the headers and the options. It needs no NVRTC, so a filled cache
/// is read on a machine without one.
pub fn cache_key(file: &KernelFile, arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(file.name.as_bytes());
    h.update([0]);
    h.update(file.source.as_bytes());
    for (n, s) in KERNEL_HEADERS {
        h.update([0]);
        h.update(n.as_bytes());
        h.update([0]);
        h.update(s.as_bytes());
    }
    for o in options(arch) {
        h.update([0]);
        h.update(o.as_bytes());
    }
    hex(&h.finalize())
}

/// The path of the cache entry of `file` for `arch` in `dir`.
fn entry_path(dir: &Path, file: &KernelFile, arch: &str) -> PathBuf {
    dir.join(format!("{}-{}.bin", file.name, cache_key(file, arch)))
}

/// The intact cache entry of `file` for `arch` in `dir`, if any.
fn read_entry(dir: Option<&Path>, file: &KernelFile, arch: &str) -> Option<Image> {
    std::fs::read(entry_path(dir?, file, arch))
        .ok()
        .and_then(|b| decode(&b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const MAGIC: &[u8; 8] = b"CWPKRN1\n";

/// Encodes an image as a cache entry: magic, kind, payload checksum, payload.
fn encode(img: &Image) -> Vec<u8> {
    let (kind, payload) = match img {
        Image::Cubin(b) => (b'C', b),
        Image::Ptx(b) => (b'P', b),
    };
    let mut out = Vec::with_capacity(payload.len() + 48);
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// Decodes a cache entry; `None` when it is not one intact entry.
fn decode(bytes: &[u8]) -> Option<Image> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (&kind, rest) = rest.split_first()?;
    if rest.len() < 32 {
        return None;
    }
    let (sum, payload) = rest.split_at(32);
    if Sha256::digest(payload).as_slice() != sum || payload.is_empty() {
        return None;
    }
    match kind {
        b'C' => Some(Image::Cubin(payload.to_vec())),
        b'P' => Some(Image::Ptx(payload.to_vec())),
        _ => None,
    }
}

/// Where a compiled image came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from an intact cache entry.
    Cache,
    /// Compiled now (and stored, when the cache is writable).
    Compiled,
}

/// What the kernel cache needs from a compiler: NVRTC in the product
/// ([`Nvrtc`]), a stand-in in tests. It is asked only on a cache miss, so a
/// machine whose cache holds every kernel never loads it.
pub trait Compiler {
    /// The target for a device of compute capability `major.minor` (see
    /// [`target_for`]).
    fn target_for(&self, major: i32, minor: i32) -> Result<String>;
    /// Compiles `file` for `target`.
    fn compile(&self, file: &KernelFile, target: &str) -> Result<Image>;
}

/// NVRTC, loaded on first use.
pub struct Nvrtc;

impl Compiler for Nvrtc {
    fn target_for(&self, major: i32, minor: i32) -> Result<String> {
        target_for(major, minor)
    }

    fn compile(&self, file: &KernelFile, target: &str) -> Result<Image> {
        compile(file, target)
    }
}

/// The image of `file` for `arch`, from the cache in `dir` when an intact
/// entry exists, else compiled now and stored. A corrupted entry is rebuilt;
/// a cache that cannot be written is only a lost speed-up, never an error.
pub fn compile_cached(
    file: &KernelFile,
    arch: &str,
    dir: Option<&Path>,
) -> Result<(Image, Origin)> {
    compile_cached_with(&Nvrtc, file, arch, dir)
}

/// [`compile_cached`] with a given compiler.
pub fn compile_cached_with(
    compiler: &dyn Compiler,
    file: &KernelFile,
    arch: &str,
    dir: Option<&Path>,
) -> Result<(Image, Origin)> {
    if let Some(img) = read_entry(dir, file, arch) {
        return Ok((img, Origin::Cache));
    }
    let img = compiler.compile(file, arch)?;
    if let Some(d) = dir {
        let _ = store(d, &entry_path(d, file, arch), &img);
    }
    Ok((img, Origin::Compiled))
}

/// The image of `file` for a device of compute capability `cc`, and the
/// target it was made for. The device's own CUBIN (`sm_XY`) is looked up in
/// the cache first, without the compiler; only on a miss is the compiler
/// asked for its target (which may be PTX for a device it does not know),
/// and that target is looked up, then compiled and stored.
pub fn image_for(
    compiler: &dyn Compiler,
    file: &KernelFile,
    cc: (i32, i32),
    dir: Option<&Path>,
) -> Result<(Image, Origin, String)> {
    let native = native_target(cc);
    if let Some(img) = read_entry(dir, file, &native) {
        return Ok((img, Origin::Cache, native));
    }
    let target = compiler.target_for(cc.0, cc.1)?;
    let (img, origin) = compile_cached_with(compiler, file, &target, dir)?;
    Ok((img, origin, target))
}

/// The CUBIN target of a device of compute capability `cc`: `sm_XY`.
pub fn native_target(cc: (i32, i32)) -> String {
    format!("sm_{}{}", cc.0, cc.1)
}

/// Compiles every kernel file for `arch` into the cache in `dir` (entries
/// already there and intact are kept), through the same path the backend
/// loads them by; returns each file's name and where its image came from.
/// This is how a kernel cache is prepared for a machine without NVRTC.
pub fn precompile(
    compiler: &dyn Compiler,
    arch: &str,
    dir: &Path,
) -> Result<Vec<(&'static str, Origin)>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Backend(format!("cannot create {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for file in KERNEL_FILES {
        let (img, origin) = compile_cached_with(compiler, file, arch, Some(dir))?;
        if origin == Origin::Compiled && read_entry(Some(dir), file, arch).as_ref() != Some(&img) {
            return Err(Error::Backend(format!(
                "cannot write the cache entry of kernels/{} in {}",
                file.name,
                dir.display()
            )));
        }
        out.push((file.name, origin));
    }
    Ok(out)
}

/// Drops the cache entry of `file` for `arch` (after the driver refused it).
pub fn evict(file: &KernelFile, arch: &str, dir: &Path) {
    let _ = std::fs::remove_file(entry_path(dir, file, arch));
}

fn store(dir: &Path, path: &Path, img: &Image) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&encode(img))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A compiler that makes a recognisable fake image per file and target,
    /// or, when `present` is false, fails as a machine without NVRTC does;
    /// it counts how often it is asked.
    struct Fake {
        present: bool,
        asked: Cell<usize>,
    }

    impl Fake {
        fn new(present: bool) -> Fake {
            Fake {
                present,
                asked: Cell::new(0),
            }
        }

        fn image(file: &KernelFile, target: &str) -> Image {
            Image::Cubin(format!("{} for {target}", file.name).into_bytes())
        }

        fn ask(&self) -> Result<()> {
            self.asked.set(self.asked.get() + 1);
            if self.present {
                Ok(())
            } else {
                Err(Error::Backend("no NVRTC on this machine".into()))
            }
        }
    }

    impl Compiler for Fake {
        fn target_for(&self, major: i32, minor: i32) -> Result<String> {
            self.ask()?;
            // Knows up to sm_90; newer devices get PTX, as NVRTC does.
            Ok(if major * 10 + minor <= 90 {
                format!("sm_{major}{minor}")
            } else {
                "compute_90".into()
            })
        }

        fn compile(&self, file: &KernelFile, target: &str) -> Result<Image> {
            self.ask()?;
            Ok(Fake::image(file, target))
        }
    }

    #[test]
    fn a_cache_holding_every_kernel_needs_no_compiler() {
        let dir = tempfile::tempdir().unwrap();
        let made = precompile(&Fake::new(true), "sm_90", dir.path()).unwrap();
        assert_eq!(made.len(), KERNEL_FILES.len());
        assert!(made.iter().all(|(_, o)| *o == Origin::Compiled));
        let again = precompile(&Fake::new(true), "sm_90", dir.path()).unwrap();
        assert!(again.iter().all(|(_, o)| *o == Origin::Cache), "{again:?}");

        let absent = Fake::new(false);
        for file in KERNEL_FILES {
            let (img, origin, target) = image_for(&absent, file, (9, 0), Some(dir.path()))
                .unwrap_or_else(|e| panic!("{}: {e}", file.name));
            assert_eq!(
                (img, origin, target.as_str()),
                (Fake::image(file, "sm_90"), Origin::Cache, "sm_90")
            );
        }
        assert_eq!(absent.asked.get(), 0, "the compiler was never asked");

        // A device of another architecture, or one missing entry, does need it.
        let file = &KERNEL_FILES[0];
        let err = image_for(&absent, file, (8, 0), Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("no NVRTC"), "{err}");
        evict(file, "sm_90", dir.path());
        assert!(image_for(&absent, file, (9, 0), Some(dir.path())).is_err());
        let (_, origin, _) = image_for(&Fake::new(true), file, (9, 0), Some(dir.path())).unwrap();
        assert_eq!(origin, Origin::Compiled, "the evicted entry is rebuilt");
    }

    #[test]
    fn a_device_the_compiler_does_not_know_gets_cached_ptx() {
        let dir = tempfile::tempdir().unwrap();
        let file = &KERNEL_FILES[0];
        let nvrtc = Fake::new(true);
        let (img, origin, target) = image_for(&nvrtc, file, (12, 0), Some(dir.path())).unwrap();
        assert_eq!(
            (img, origin, target.as_str()),
            (
                Fake::image(file, "compute_90"),
                Origin::Compiled,
                "compute_90"
            )
        );
        let (_, origin, _) = image_for(&nvrtc, file, (12, 0), Some(dir.path())).unwrap();
        assert_eq!(origin, Origin::Cache);
    }

    #[test]
    fn the_cache_key_depends_on_the_target_and_the_source() {
        let f = &KERNEL_FILES[0];
        assert_ne!(cache_key(f, "sm_90"), cache_key(f, "sm_80"));
        let edited = KernelFile {
            name: f.name,
            source: "// edited\n",
            kernels: f.kernels,
        };
        assert_ne!(cache_key(f, "sm_90"), cache_key(&edited, "sm_90"));
        assert_eq!(cache_key(f, "sm_90"), cache_key(f, "sm_90"));
    }

    #[test]
    fn cache_entries_round_trip_and_reject_damage() {
        let img = Image::Cubin(vec![1, 2, 3, 4, 5]);
        let enc = encode(&img);
        assert_eq!(decode(&enc), Some(img));
        let mut bad = enc.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&bad), None, "a flipped payload bit is caught");
        assert_eq!(
            decode(&enc[..enc.len() - 1]),
            None,
            "a truncated entry is caught"
        );
        assert_eq!(decode(b"garbage"), None);
        assert_eq!(decode(&[]), None);
    }
}
