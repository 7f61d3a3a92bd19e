//! The command line never panics and never blames the wrong thing: bad
//! arguments (repeated classes, non-UTF-8 bytes, sizes, limits), unwritable
//! output, and broken files end in one clear error naming the option or file,
//! a non-zero exit, and nothing left behind on disk.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use classwise::train::init_params;
use classwise::weights::Model;
use classwise::zoo::{build, ModelSpec};

fn cwp<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .output()
        .expect("cwp runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails the test unless `o` is an ordinary failure: exit status 1 with an
/// `error:` line, not a panic (status 101).
fn assert_clean_failure(o: &Output) -> String {
    let msg = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(msg.starts_with("error: "), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    msg
}

/// A random smallcnn (1×28×28, 10 classes) whose metadata `edit` may change.
fn smallcnn_file(dir: &Path, name: &str, edit: impl FnOnce(&mut Model)) -> PathBuf {
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    let mut model = Model::new(&spec, init_params(&graph, 1)).unwrap();
    edit(&mut model);
    let path = dir.join(name);
    model.save(&path).unwrap();
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn zoo_into_a_full_stdout_fails_without_a_panic() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let o = Command::new(env!("CARGO_BIN_EXE_cwp"))
        .arg("zoo")
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    let msg = assert_clean_failure(&o);
    assert!(msg.contains("standard output"), "{msg}");
}

#[cfg(unix)]
#[test]
fn a_non_utf8_argument_is_refused_by_name_before_out_is_created() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let dir = tempfile::tempdir().unwrap();
    let w = smallcnn_file(dir.path(), "m.safetensors", |_| {});
    let mut out = dir.path().as_os_str().to_owned().into_vec();
    out.extend(b"/out\xff");
    let out = OsString::from_vec(out);
    // As a separate value and in the `--out=VALUE` form.
    let mut joined = OsString::from("--out=");
    joined.push(&out);
    for args in [
        vec![
            "search".into(),
            "--weights".into(),
            w.clone().into(),
            "--out".into(),
            out.clone(),
        ],
        vec![
            "search".into(),
            "--weights".into(),
            w.clone().into(),
            joined,
        ],
    ] {
        let o = cwp::<OsString>(&args);
        let msg = assert_clean_failure(&o);
        assert!(msg.contains("--out") && msg.contains("UTF-8"), "{msg}");
        assert!(!Path::new(&out).exists(), "--out was created: {msg}");
    }
}

#[test]
fn a_class_listed_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = smallcnn_file(dir.path(), "m.safetensors", |_| {});
    let out = dir.path().join("out");
    let o = cwp(&[
        "search",
        "--weights",
        path_str(&w),
        "--out",
        path_str(&out),
        "--classes",
        "0,8,0,0",
        "--quiet",
    ]);
    let msg = assert_clean_failure(&o);
    assert!(
        msg.contains("--classes") && msg.contains("class 0"),
        "{msg}"
    );
    assert!(!out.exists(), "a refused search created {}", out.display());
}

#[test]
fn an_os_error_is_printed_once() {
    let o = cwp(&["eval", "--weights", "/nonexistent/cwp-weights.safetensors"]);
    let msg = assert_clean_failure(&o);
    // ENOENT, as the OS words it.
    let os = std::io::Error::from_raw_os_error(2).to_string();
    assert!(
        msg.contains("/nonexistent/cwp-weights.safetensors"),
        "{msg}"
    );
    assert_eq!(
        msg.matches(&os).count(),
        1,
        "`{os}` not exactly once in: {msg}"
    );
}

#[test]
fn memory_sizes_with_every_suffix_are_accepted_and_others_named() {
    let dir = tempfile::tempdir().unwrap();
    let w = smallcnn_file(dir.path(), "m.safetensors", |_| {});
    let out = dir.path().join("out");
    // --top-k is checked after --memory is read: its error proves the size
    // was accepted, and nothing runs.
    for size in [
        "4096", "512K", "512M", "2G", "1T", "1t", "2GB", "2GiB", "0.5G",
    ] {
        let o = cwp(&[
            "search",
            "--weights",
            path_str(&w),
            "--out",
            path_str(&out),
            "--memory",
            size,
            "--top-k",
            "0",
        ]);
        let msg = assert_clean_failure(&o);
        assert!(
            msg.contains("--top-k") && !msg.contains("--memory"),
            "{size}: {msg}"
        );
    }
    for bad in ["1P", "lots", "0", "0K", "G", "2GiBB"] {
        let o = cwp(&[
            "search",
            "--weights",
            path_str(&w),
            "--out",
            path_str(&out),
            "--memory",
            bad,
        ]);
        let msg = assert_clean_failure(&o);
        assert!(
            msg.contains("--memory") && msg.contains(bad),
            "{bad}: {msg}"
        );
        assert!(!msg.contains("float"), "{bad}: {msg}");
    }
    assert!(!out.exists());
}

#[test]
fn a_failed_search_leaves_no_empty_folders() {
    let dir = tempfile::tempdir().unwrap();
    let w = smallcnn_file(dir.path(), "m.safetensors", |_| {});
    // The canvas index is checked once the run has started (it depends on
    // the data), after the results folder is opened.
    let out = dir.path().join("new").join("out");
    let o = cwp(&[
        "search",
        "--weights",
        path_str(&w),
        "--out",
        path_str(&out),
        "--classes",
        "0",
        "--canvas",
        "test:5000",
        "--quiet",
        "--device",
        "cpu",
    ]);
    let msg = assert_clean_failure(&o);
    assert!(msg.contains("--canvas"), "{msg}");
    assert!(!dir.path().join("new").exists(), "left behind: {msg}");
    // A folder that was there before stays, empty or not.
    let kept = dir.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    let o = cwp(&[
        "search",
        "--weights",
        path_str(&w),
        "--out",
        path_str(&kept),
        "--classes",
        "0",
        "--canvas",
        "test:5000",
        "--quiet",
        "--device",
        "cpu",
    ]);
    assert_clean_failure(&o);
    assert!(kept.is_dir());
    assert_eq!(std::fs::read_dir(&kept).unwrap().count(), 0);
}

#[test]
fn pgd_limit_and_robust_eval_of_zero_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = smallcnn_file(dir.path(), "m.safetensors", |_| {});
    let o = cwp(&[
        "eval",
        "--weights",
        path_str(&w),
        "--pgd",
        "0.1,0.01,2",
        "--pgd-limit",
        "0",
        "--device",
        "cpu",
    ]);
    let msg = assert_clean_failure(&o);
    assert!(msg.contains("--pgd-limit"), "{msg}");
    let out = dir.path().join("t.safetensors");
    let o = cwp(&[
        "train",
        "--arch",
        "smallcnn",
        "--out",
        path_str(&out),
        "--robust-eval",
        "0.1,0.01,2:0",
        "--device",
        "cpu",
    ]);
    let msg = assert_clean_failure(&o);
    assert!(msg.contains("--robust-eval"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn forward_refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let w = smallcnn_file(dir.path(), "m.safetensors", |_| {});
    let input = dir.path().join("in.safetensors");
    std::fs::copy(
        common::fixtures_dir().join("expect_smallcnn_1x28_f32.safetensors"),
        &input,
    )
    .unwrap();
    let before = std::fs::read(&input).unwrap();
    let hard = dir.path().join("hard.safetensors");
    std::fs::hard_link(&input, &hard).unwrap();
    let mut outs = vec![
        input.clone(),
        dir.path().join(".").join("in.safetensors"),
        hard,
    ];
    #[cfg(unix)]
    {
        let soft = dir.path().join("soft.safetensors");
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        outs.push(soft);
    }
    for out in &outs {
        let o = cwp(&[
            "forward",
            "--weights",
            path_str(&w),
            "--input",
            path_str(&input),
            "--out",
            path_str(out),
            "--device",
            "cpu",
        ]);
        let msg = assert_clean_failure(&o);
        assert!(msg.contains("--out") && msg.contains("--input"), "{msg}");
        assert_eq!(std::fs::read(&input).unwrap(), before, "input overwritten");
    }
    // The weights are inputs too.
    let o = cwp(&[
        "forward",
        "--weights",
        path_str(&w),
        "--input",
        path_str(&input),
        "--out",
        path_str(&w),
        "--device",
        "cpu",
    ]);
    let msg = assert_clean_failure(&o);
    assert!(msg.contains("--out") && msg.contains("--weights"), "{msg}");
    // A distinct output is written.
    let out = dir.path().join("out.safetensors");
    let o = cwp(&[
        "forward",
        "--weights",
        path_str(&w),
        "--input",
        path_str(&input),
        "--out",
        path_str(&out),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}

/// A change to a model's metadata before it is saved.
type MetaEdit = fn(&mut Model);

#[test]
fn bad_metadata_is_blamed_on_the_file_not_an_option() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, MetaEdit, &str); 3] = [
        (
            "arch.safetensors",
            |m| m.meta.arch = Some("resnet99".into()),
            "resnet99",
        ),
        (
            "input.safetensors",
            |m| m.meta.input = Some([0, 28, 28]),
            "[0, 28, 28]",
        ),
        (
            "classes.safetensors",
            |m| m.meta.num_classes = Some(1),
            "2 classes",
        ),
    ];
    for (name, edit, what) in cases {
        let w = smallcnn_file(dir.path(), name, edit);
        let o = cwp(&["eval", "--weights", path_str(&w), "--device", "cpu"]);
        let msg = assert_clean_failure(&o);
        assert!(
            msg.contains(path_str(&w)) && msg.contains(what),
            "{name}: {msg}"
        );
        assert!(
            !msg.contains("option "),
            "{name} blamed on an option: {msg}"
        );
    }
    // An option the user did give is still blamed on that option.
    let w = smallcnn_file(dir.path(), "ok.safetensors", |_| {});
    let o = cwp(&["eval", "--weights", path_str(&w), "--arch", "resnet99"]);
    let msg = assert_clean_failure(&o);
    assert!(msg.contains("option --arch"), "{msg}");
}
