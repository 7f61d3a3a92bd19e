//! Every kernel file compiles with a real NVRTC for sm_80 and sm_90, to CUBIN.
//!
//! NVRTC needs no GPU. It is found through `CWP_NVRTC_LIB` (the library file)
//! or `LD_LIBRARY_PATH`; failing both, through the `nvidia-cuda-nvrtc` wheel
//! of `python3`. When none of these gives an NVRTC the tests FAIL with a
//! message saying how to install it: they never skip.

use std::path::PathBuf;

use classwise::backend::gpu::kernels::{KernelFile, KERNEL_FILES};
use classwise::backend::gpu::nvrtc::{self, Image, Origin};

/// Makes NVRTC loadable or fails the test with instructions.
fn nvrtc() {
    if std::env::var_os("CWP_NVRTC_LIB").is_none() {
        if let Some(lib) = wheel_nvrtc() {
            nvrtc::preload(&lib, "the nvidia-cuda-nvrtc wheel").expect("load the wheel's NVRTC");
        }
    }
    if let Err(e) = nvrtc::ensure_nvrtc() {
        panic!(
            "{e}\nThe NVRTC compile check needs NVRTC: `python3 -m pip install nvidia-cuda-nvrtc` \
             (scripts/test.sh does this), or set CWP_NVRTC_LIB=/path/to/libnvrtc.so.13."
        );
    }
}

/// libnvrtc.so.13 inside the python3 `nvidia-cuda-nvrtc` wheel, if installed.
fn wheel_nvrtc() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u, os\n\
             for m in ('nvidia.cu13', 'nvidia.cuda_nvrtc'):\n\
             \x20   try: s = u.find_spec(m)\n\
             \x20   except Exception: s = None\n\
             \x20   if s and s.submodule_search_locations:\n\
             \x20       for d in s.submodule_search_locations:\n\
             \x20           p = os.path.join(d, 'lib', 'libnvrtc.so.13')\n\
             \x20           if os.path.exists(p): print(p); raise SystemExit\n",
        ])
        .output()
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(p.trim());
    p.is_file().then_some(p)
}

#[test]
fn nvrtc_compiles_every_kernel_file_for_sm80_and_sm90() {
    nvrtc();
    let (major, minor) = nvrtc::version().expect("NVRTC version");
    assert!(
        major >= 12,
        "NVRTC {major}.{minor} is older than the CUDA 12 the kernels target"
    );
    assert!(!KERNEL_FILES.is_empty());
    for file in KERNEL_FILES {
        assert!(!file.kernels.is_empty(), "{} defines no kernel", file.name);
        for arch in ["sm_80", "sm_90"] {
            match nvrtc::compile(file, arch) {
                Ok(Image::Cubin(elf)) => {
                    assert!(
                        elf.starts_with(b"\x7fELF"),
                        "{} for {arch}: not an ELF",
                        file.name
                    )
                }
                Ok(Image::Ptx(_)) => panic!("{} for {arch}: PTX instead of CUBIN", file.name),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

#[test]
fn nvrtc_compile_error_reports_the_log() {
    nvrtc();
    let bad = KernelFile {
        name: "broken.cu",
        source: "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n",
        kernels: &["k"],
    };
    let err = nvrtc::compile(&bad, "sm_90")
        .expect_err("must not compile")
        .to_string();
    assert!(
        err.contains("broken.cu") && err.contains("undefined_name"),
        "{err}"
    );
}

#[test]
fn nvrtc_targets_cubin_for_known_archs_and_ptx_beyond() {
    nvrtc();
    assert_eq!(nvrtc::target_for(9, 0).unwrap(), "sm_90");
    assert_eq!(nvrtc::target_for(8, 0).unwrap(), "sm_80");
    // A future architecture falls back to PTX of the newest known one.
    let t = nvrtc::target_for(99, 9).unwrap();
    assert!(t.starts_with("compute_"), "{t}");
    let img = nvrtc::compile(&KERNEL_FILES[0], &t).expect("PTX compile");
    assert!(matches!(img, Image::Ptx(_)));
}

#[test]
fn nvrtc_cache_hits_and_rebuilds_corrupted_entries() {
    nvrtc();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = KERNEL_FILES
        .iter()
        .find(|f| f.name == "elementwise.cu")
        .expect("elementwise.cu");
    let (a, o1) = nvrtc::compile_cached(file, "sm_90", Some(dir.path())).unwrap();
    assert_eq!(o1, Origin::Compiled);
    let (b, o2) = nvrtc::compile_cached(file, "sm_90", Some(dir.path())).unwrap();
    assert_eq!((o2, &a), (Origin::Cache, &b));
    // Damage every entry: the next call must compile again, not fail.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&p, bytes).unwrap();
    }
    let (c, o3) = nvrtc::compile_cached(file, "sm_90", Some(dir.path())).unwrap();
    assert_eq!((o3, &c), (Origin::Compiled, &a));
    let (_, o4) = nvrtc::compile_cached(file, "sm_90", Some(dir.path())).unwrap();
    assert_eq!(o4, Origin::Cache, "the rebuilt entry is stored again");
    // An unwritable cache is only a lost speed-up.
    let (_, o5) =
        nvrtc::compile_cached(file, "sm_90", Some(&dir.path().join("missing/\0bad"))).unwrap();
    assert_eq!(o5, Origin::Compiled);
}

/// The assembler's resource report for sm_90: no kernel spills registers to
/// local memory (a spill in the GEMM main loop would cost far more than any
/// tile-size gain), and the forward and dgrad 128x128 tiles (the search's
/// hot path) fit 128 registers, so two blocks of 256 threads share an SM.
#[test]
fn nvrtc_kernels_do_not_spill_on_sm90() {
    nvrtc();
    let mut report = String::new();
    for file in KERNEL_FILES {
        let (_, log) = nvrtc::compile_with(file, "sm_90", &["--ptxas-options=-v"])
            .unwrap_or_else(|e| panic!("{e}"));
        report += &log;
        report += "\n";
    }
    println!("{report}");
    let mut kernel = String::new();
    for line in report.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            kernel = line[i + 26..].trim_end_matches("' for 'sm_90'").to_string();
        }
        if line.contains("spill stores") {
            assert!(
                line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                "{kernel}: {line}"
            );
        }
        if let Some(i) = line.find("Used ") {
            let regs: usize = line[i + 5..]
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            // 256 threads x 128 registers = half of the 64K register file.
            let hot = kernel == "conv_fwd_128x128" || kernel == "conv_dgrad_128x128";
            assert!(regs <= 128 || !hot, "{kernel}: {regs} registers");
        }
    }
    assert!(
        report.contains("conv_fwd_128x128"),
        "no resource report:\n{report}"
    );
}

/// A compiler that is not there: what a GPU machine without NVRTC has.
struct NoNvrtc;

impl nvrtc::Compiler for NoNvrtc {
    fn target_for(&self, _: i32, _: i32) -> classwise::Result<String> {
        Err(classwise::Error::Backend("no NVRTC here".into()))
    }

    fn compile(&self, _: &KernelFile, _: &str) -> classwise::Result<Image> {
        Err(classwise::Error::Backend("no NVRTC here".into()))
    }
}

/// `cwp precompile --arch sm_90` fills a cache from which the backend's own
/// lookup serves every kernel file to an sm_90 device as CUBIN, with no
/// compiler at all; an architecture NVRTC does not know is refused.
#[test]
fn nvrtc_precompiled_cache_serves_every_kernel_without_nvrtc() {
    nvrtc();
    let dir = tempfile::tempdir().expect("temp dir");
    let cwp = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cwp"));
        if let (None, Some(lib)) = (std::env::var_os("CWP_NVRTC_LIB"), wheel_nvrtc()) {
            c.env("CWP_NVRTC_LIB", lib);
        }
        c
    };
    let out = cwp()
        .args(["precompile", "--arch", "sm_90", "--out"])
        .arg(dir.path())
        .output()
        .expect("run cwp");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in KERNEL_FILES {
        let (img, origin, target) = nvrtc::image_for(&NoNvrtc, file, (9, 0), Some(dir.path()))
            .unwrap_or_else(|e| panic!("{}: {e}", file.name));
        assert_eq!((origin, target.as_str()), (Origin::Cache, "sm_90"));
        assert!(
            matches!(&img, Image::Cubin(b) if b.starts_with(b"\x7fELF")),
            "{}: not a CUBIN",
            file.name
        );
    }
    let out = cwp()
        .args(["precompile", "--arch", "sm_91", "--out"])
        .arg(dir.path())
        .output()
        .expect("run cwp");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--arch") && err.contains("sm_91"),
        "{err}"
    );
}
