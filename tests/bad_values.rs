//! Values that would make a result meaningless are refused, never turned
//! into a confident answer: NaN or infinite weights and negative BN
//! variances at load (naming the file and the tensor), a forward pass that
//! overflows at run time (naming the model), and search options outside
//! their range (naming the option).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use classwise::train::init_params;
use classwise::weights::Model;
use classwise::zoo::{build, ModelSpec};

fn cwp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .output()
        .expect("cwp runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A freshly initialised smallcnn for Fashion-MNIST, with `edit` applied to
/// the parameter called `name`, saved (unchecked) as `file` in `dir`.
fn edited_model(dir: &Path, file: &str, name: &str, edit: impl FnOnce(&mut [f32])) -> PathBuf {
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    let mut params = init_params(&graph, 1);
    let i = graph
        .params
        .iter()
        .position(|p| p.name == name)
        .unwrap_or_else(|| panic!("smallcnn has no `{name}`"));
    edit(params[i].data_mut());
    let path = dir.join(file);
    Model::new(&spec, params).unwrap().save(&path).unwrap();
    path
}

/// Runs a command that must fail before it computes anything; returns its
/// message after checking that no figure was printed.
fn refused(args: &[&str]) -> String {
    let o = cwp(args);
    let msg = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}: {msg}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        !stdout.contains('%'),
        "{args:?} printed figures before failing: {stdout}"
    );
    msg
}

#[test]
fn a_nan_weight_is_refused_at_load_naming_the_file_tensor_and_element() {
    let dir = tempfile::tempdir().unwrap();
    let w = edited_model(dir.path(), "nan.safetensors", "conv1.weight", |d| {
        d[17] = f32::NAN
    });
    for cmd in ["eval", "search"] {
        let out = dir.path().join("out");
        let mut args = vec![cmd, "--weights", w.to_str().unwrap()];
        if cmd == "search" {
            args.extend(["--out", out.to_str().unwrap(), "--quiet"]);
        }
        let msg = refused(&args);
        for want in ["nan.safetensors", "`conv1.weight`", "NaN", "element 17"] {
            assert!(msg.contains(want), "{cmd}: `{want}` not in: {msg}");
        }
        assert!(!out.join("searches").exists(), "search started: {msg}");
    }
}

#[test]
fn an_infinite_weight_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let w = edited_model(dir.path(), "inf.safetensors", "fc2.bias", |d| {
        d[3] = f32::NEG_INFINITY
    });
    let msg = refused(&["eval", "--weights", w.to_str().unwrap()]);
    for want in ["inf.safetensors", "`fc2.bias`", "infinity", "element 3"] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

#[test]
fn a_negative_running_variance_is_refused_at_load_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let w = edited_model(dir.path(), "var.safetensors", "bn2.running_var", |d| {
        d[5] = -0.25
    });
    let msg = refused(&["eval", "--weights", w.to_str().unwrap()]);
    for want in [
        "var.safetensors",
        "`bn2.running_var`",
        "negative",
        "element 5",
    ] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

/// Finite weights so large that the classifier's output overflows: every
/// logit is infinite or NaN at run time.
fn overflowing_model(dir: &Path) -> PathBuf {
    edited_model(dir, "huge.safetensors", "fc2.weight", |d| {
        d.iter_mut().for_each(|v| *v = 3.0e38)
    })
}

#[test]
fn logits_that_overflow_at_run_time_are_an_error_naming_the_model_not_an_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let w = overflowing_model(dir.path());
    let msg = refused(&["eval", "--weights", w.to_str().unwrap(), "--batch", "64"]);
    for want in [
        "model `",
        "huge.safetensors",
        "logits",
        "forward pass 1",
        "non-finite",
    ] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

#[test]
fn a_search_with_overflowing_logits_fails_without_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let w = overflowing_model(dir.path());
    let out = dir.path().join("out");
    let msg = refused(&[
        "search",
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--classes",
        "3",
        "--quiet",
    ]);
    for want in ["model `", "logits", "non-finite"] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
    assert!(!out.join("report.json").exists(), "a report was written");
}

fn search_refused(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let w = edited_model(dir.path(), "m.safetensors", "fc2.bias", |_| {});
    let out = dir.path().join("out");
    let mut args = vec![
        "search",
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let msg = refused(&args);
    let searched = std::fs::read_dir(out.join("searches"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(searched, 0, "a search ran before the error: {msg}");
    msg
}

#[test]
fn alpha_must_be_positive_and_finite() {
    // NaN and infinity would both be `null` in the resume key and share results.
    for bad in ["nan", "inf", "0", "-0.2"] {
        let msg = search_refused(&[&format!("--alpha={bad}")]);
        assert!(msg.contains("--alpha"), "--alpha {bad}: {msg}");
    }
}

#[test]
fn beta_must_be_finite_and_not_negative() {
    for bad in ["-5", "nan", "inf"] {
        let msg = search_refused(&[&format!("--beta={bad}")]);
        assert!(msg.contains("--beta"), "--beta {bad}: {msg}");
    }
}

#[test]
fn the_threshold_must_be_a_share_in_0_1() {
    for bad in ["2", "nan", "0", "-0.5", "inf"] {
        let msg = search_refused(&[&format!("--threshold={bad}")]);
        assert!(msg.contains("--threshold"), "--threshold {bad}: {msg}");
    }
}

#[test]
fn nan_step_size_and_search_share_are_refused() {
    let msg = search_refused(&["--lr=nan"]);
    assert!(msg.contains("--lr"), "{msg}");
    let msg = search_refused(&["--search-frac=nan"]);
    assert!(msg.contains("--search-frac"), "{msg}");
}

#[test]
fn auto_canvases_beyond_the_limit_are_refused_not_cut_down() {
    let msg = search_refused(&["--canvas", "auto:5000"]);
    assert!(
        msg.contains("--canvas") && msg.contains("auto:5000") && msg.contains("at most 64"),
        "{msg}"
    );
}

#[test]
fn more_auto_canvases_than_the_class_has_images_are_refused() {
    // 96% of each class (960 of 1000 images) goes to the search set: 40 remain.
    let msg = search_refused(&[
        "--canvas",
        "auto:50",
        "--search-frac",
        "0.96",
        "--classes",
        "2",
    ]);
    assert!(
        msg.contains("--canvas") && msg.contains("auto:50") && msg.contains("only 40"),
        "{msg}"
    );
}
