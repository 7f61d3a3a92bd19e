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
//! of the source, the headers, the options and the NVRTC version. An entry
//! carries its own checksum; one that is unreadable, truncated or corrupted is
//! a miss and is rebuilt. Entries are written atomically (temp file + rename).

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

use super::kernels::{KernelFile, KERNEL_HEADERS};
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

/// Loads NVRTC, or says clearly why it cannot. `CWP_NVRTC_LIB` may name the
/// library file (e.g. the one in the `nvidia-cuda-nvrtc` wheel); otherwise the
/// usual `dlopen` search (`LD_LIBRARY_PATH`, ld.so cache) applies.
pub fn ensure_nvrtc() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("CWP_NVRTC_LIB") {
                preload(Path::new(&path), "CWP_NVRTC_LIB")?;
            }
            // SAFETY: only probes dlopen with cudarc's candidate names.
            if unsafe { sys::is_culib_present() } {
                Ok(())
            } else {
                Err(
                    "NVRTC (libnvrtc.so.13) was not found: install the `nvidia-cuda-nvrtc` \
                     wheel (`pip install nvidia-cuda-nvrtc`) or a CUDA toolkit, and point \
                     CWP_NVRTC_LIB at libnvrtc.so.13 or add its folder to LD_LIBRARY_PATH"
                        .to_string(),
                )
            }
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

/// The cache key of a file compiled for `arch` by NVRTC `version`.
pub fn cache_key(file: &KernelFile, arch: &str, version: (i32, i32)) -> String {
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
    h.update(format!("\0nvrtc {}.{}", version.0, version.1).as_bytes());
    hex(&h.finalize())
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

/// The image of `file` for `arch`, from the cache in `dir` when an intact
/// entry exists, else compiled now and stored. A corrupted entry is rebuilt;
/// a cache that cannot be written is only a lost speed-up, never an error.
pub fn compile_cached(
    file: &KernelFile,
    arch: &str,
    dir: Option<&Path>,
) -> Result<(Image, Origin)> {
    let version = version()?;
    let path = dir.map(|d| {
        d.join(format!(
            "{}-{}.bin",
            file.name,
            cache_key(file, arch, version)
        ))
    });
    if let Some(p) = &path {
        if let Some(img) = std::fs::read(p).ok().and_then(|b| decode(&b)) {
            return Ok((img, Origin::Cache));
        }
    }
    let img = compile(file, arch)?;
    if let (Some(p), Some(d)) = (&path, dir) {
        let _ = store(d, p, &img);
    }
    Ok((img, Origin::Compiled))
}

/// Drops the cache entry of `file` for `arch` (after the driver refused it).
pub fn evict(file: &KernelFile, arch: &str, dir: &Path) {
    if let Ok(v) = version() {
        let _ = std::fs::remove_file(dir.join(format!(
            "{}-{}.bin",
            file.name,
            cache_key(file, arch, v)
        )));
    }
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
