//! Where NVRTC may be installed on a machine, so that a GPU box that has it
//! somewhere off the library path (a CUDA toolkit folder, a Python wheel
//! such as PyTorch's `nvidia-cuda-nvrtc`) needs no `LD_LIBRARY_PATH` set-up.
//!
//! Pure path logic over an environment and a filesystem root, so that a test
//! can check the order of the candidates on a fake folder tree.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The library files tried, best first. cudarc is built for CUDA 13 and its
/// loader accepts both sonames (`libnvrtc.so.13`, `libnvrtc.so.12`), so a
/// CUDA 13 NVRTC anywhere is preferred to a CUDA 12 one.
pub const NVRTC_SONAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so.12"];

/// Environment variables naming a CUDA toolkit, in the order they are read.
const TOOLKIT_VARS: [&str; 4] = [
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_ROOT",
    "CUDA_TOOLKIT_ROOT_DIR",
];

/// The folders searched for NVRTC, in order, that exist: the toolkits named
/// by `CUDA_HOME`/`CUDA_PATH`/`CUDA_ROOT`/`CUDA_TOOLKIT_ROOT_DIR`, then
/// `/usr/local/cuda`, `/usr/local/cuda-*` (newest first) and `/opt/cuda`
/// (each `lib64`, `lib`, `targets/*/lib`), then the `nvidia/*/lib` folders of
/// Python wheels in the site-packages of `$VIRTUAL_ENV`, `$CONDA_PREFIX`,
/// every `python3` on `PATH`, `~/.local`, `/usr/local` and `/usr`.
///
/// `env` reads a variable; `root` is the filesystem root (`/`) that the
/// fixed folders are taken under.
pub fn nvrtc_dirs(env: &dyn Fn(&str) -> Option<OsString>, root: &Path) -> Vec<PathBuf> {
    let mut toolkits: Vec<PathBuf> = TOOLKIT_VARS
        .iter()
        .filter_map(|v| env(v).filter(|s| !s.is_empty()).map(PathBuf::from))
        .collect();
    toolkits.push(root.join("usr/local/cuda"));
    toolkits.extend(newest_first(children(&root.join("usr/local"), |n| {
        n.starts_with("cuda-")
    })));
    toolkits.push(root.join("opt/cuda"));

    let mut dirs = Vec::new();
    for t in &toolkits {
        dirs.push(t.join("lib64"));
        dirs.push(t.join("lib"));
        for target in children(&t.join("targets"), |_| true) {
            dirs.push(target.join("lib"));
        }
    }
    for sp in site_packages(env, root) {
        let nv = sp.join("nvidia");
        // The CUDA 13 wheels share one folder; the CUDA 12 wheel has its own.
        for sub in ["cu13/lib", "cuda_nvrtc/lib", "cu12/lib"] {
            dirs.push(nv.join(sub));
        }
        for pkg in children(&nv, |_| true) {
            dirs.push(pkg.join("lib"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// The NVRTC library files in `dirs`, best first: every `libnvrtc.so.13`
/// (in folder order) before any `libnvrtc.so.12`.
pub fn nvrtc_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    NVRTC_SONAMES
        .iter()
        .flat_map(|so| dirs.iter().map(move |d| d.join(so)))
        .filter(|p| p.is_file())
        .collect()
}

/// Site-packages (and Debian dist-packages) folders of the Python
/// installations this machine is likely to have, found without running
/// Python: `PREFIX/lib*/python3*/{site,dist}-packages` for each prefix.
fn site_packages(env: &dyn Fn(&str) -> Option<OsString>, root: &Path) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| env(v).filter(|s| !s.is_empty()).map(PathBuf::from))
        .collect();
    if let Some(path) = env("PATH") {
        for bin in std::env::split_paths(&path) {
            if bin.join("python3").exists() {
                if let Some(p) = bin.parent() {
                    prefixes.push(p.to_path_buf());
                }
            }
        }
    }
    if let Some(home) = env("HOME").filter(|s| !s.is_empty()) {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.push(root.join("usr/local"));
    prefixes.push(root.join("usr"));
    let mut out = Vec::new();
    for p in prefixes {
        for lib in ["lib", "lib64"] {
            for py in newest_first(children(&p.join(lib), |n| n.starts_with("python3"))) {
                out.push(py.join("site-packages"));
                out.push(py.join("dist-packages"));
            }
        }
    }
    out
}

/// The entries of `dir` whose names pass `keep`, sorted by name; none when
/// `dir` cannot be read.
fn children(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(&keep))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Version-named folders (`cuda-12.4`, `python3.12`) newest first: by the
/// numbers in the name, so that 12.10 comes before 12.9.
fn newest_first(mut v: Vec<PathBuf>) -> Vec<PathBuf> {
    let nums = |p: &PathBuf| -> Vec<u64> {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    v.sort_by_key(|p| std::cmp::Reverse(nums(p)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not a library").unwrap();
    }

    /// A fake machine: two toolkits, a venv, a python3 on PATH with the
    /// CUDA 12 wheel, and a user-site CUDA 13 wheel.
    #[test]
    fn nvrtc_candidates_prefer_cuda13_then_follow_the_folder_order() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let toolkit12 = r.join("usr/local/cuda-12.4/targets/x86_64-linux/lib/libnvrtc.so.12");
        let toolkit12_old = r.join("usr/local/cuda-12.10/lib64/libnvrtc.so.12");
        let home_tk = r.join("opt/mytk/lib64/libnvrtc.so.12");
        let venv13 = r.join("venv/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let path12 =
            r.join("pyenv/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        let user13 =
            r.join("home/u/.local/lib/python3.10/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let debian13 = r.join("usr/lib/python3/dist-packages/nvidia/cu13/lib/libnvrtc.so.13");
        for p in [
            &toolkit12,
            &toolkit12_old,
            &home_tk,
            &venv13,
            &path12,
            &user13,
            &debian13,
        ] {
            touch(p);
        }
        touch(&r.join("pyenv/bin/python3"));
        std::fs::create_dir_all(r.join("usr/local/cuda/lib64")).unwrap();
        let vars = |venv: bool, cuda_home: bool| {
            let r = r.to_path_buf();
            move |k: &str| -> Option<OsString> {
                match k {
                    "VIRTUAL_ENV" if venv => Some(r.join("venv").into()),
                    "CUDA_HOME" if cuda_home => Some(r.join("opt/mytk").into()),
                    "PATH" => Some(
                        std::env::join_paths([r.join("nowhere/bin"), r.join("pyenv/bin")]).unwrap(),
                    ),
                    "HOME" => Some(r.join("home/u").into()),
                    _ => None,
                }
            }
        };
        let found = nvrtc_files(&nvrtc_dirs(&vars(true, true), r));
        assert_eq!(
            found,
            vec![
                venv13.clone(),
                user13.clone(),
                debian13.clone(),
                home_tk.clone(),
                toolkit12_old.clone(),
                toolkit12.clone(),
                path12.clone(),
            ],
            "every .so.13 first; then CUDA_HOME, /usr/local/cuda-* newest first, \
             wheels of python3 on PATH"
        );
        // Without the venv and CUDA_HOME, the next best moves up.
        let found = nvrtc_files(&nvrtc_dirs(&vars(false, false), r));
        assert_eq!(
            found,
            vec![user13, debian13, toolkit12_old, toolkit12, path12]
        );
    }

    #[test]
    fn nvrtc_dirs_lists_only_folders_that_exist_once() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/local/cuda/lib64")).unwrap();
        let env = |k: &str| (k == "CUDA_HOME").then(|| r.join("usr/local/cuda").into());
        let dirs = nvrtc_dirs(&env, r);
        assert_eq!(dirs, vec![r.join("usr/local/cuda/lib64")]);
        assert!(nvrtc_files(&dirs).is_empty());
    }
}
