//! `cwp search` refuses bad input with a clear message, a non-zero exit, and
//! before any search starts (no result file is written).

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

fn model_file(dir: &Path, arch: &str, input: [usize; 3], classes: usize) -> PathBuf {
    let spec = ModelSpec::new(arch, input, classes);
    let graph = build(&spec).unwrap();
    let path = dir.join(format!(
        "{arch}_{}x{}_{classes}.safetensors",
        input[0], input[1]
    ));
    Model::new(&spec, init_params(&graph, 1))
        .unwrap()
        .save(&path)
        .unwrap();
    path
}

/// Runs a search that must fail; returns its message after checking that
/// nothing was searched.
fn refused(weights: &Path, extra: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec![
        "search",
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = cwp(&args);
    let msg = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure for {extra:?}");
    let searched = std::fs::read_dir(out.path().join("searches"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(searched, 0, "a search ran before the error: {msg}");
    msg
}

#[test]
fn k_larger_than_the_pixel_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = model_file(dir.path(), "smallcnn", [1, 28, 28], 10);
    let msg = refused(&w, &["--top-k", "785"]);
    assert!(msg.contains("--top-k") && msg.contains("784"), "{msg}");
    let msg = refused(&w, &["--k-sweep", "10,900"]);
    assert!(msg.contains("--k-sweep") && msg.contains("900"), "{msg}");
}

#[test]
fn an_unknown_class_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = model_file(dir.path(), "smallcnn", [1, 28, 28], 10);
    let msg = refused(&w, &["--classes", "2,12"]);
    assert!(msg.contains("--classes") && msg.contains("12"), "{msg}");
}

#[test]
fn a_canvas_index_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = model_file(dir.path(), "smallcnn", [1, 28, 28], 10);
    let msg = refused(&w, &["--canvas", "test:1000", "--classes", "4"]);
    assert!(
        msg.contains("--canvas") && msg.contains("out of range") && msg.contains("1000"),
        "{msg}"
    );
    let msg = refused(&w, &["--canvas", "shiny:3"]);
    assert!(msg.contains("--canvas"), "{msg}");
}

#[test]
fn weights_that_do_not_fit_the_data_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Channels: an RGB model on grey Fashion-MNIST.
    let rgb = model_file(dir.path(), "smallcnn", [3, 28, 28], 10);
    let msg = refused(&rgb, &[]);
    assert!(
        msg.contains("[1, 28, 28]") && msg.contains("[3, 28, 28]"),
        "{msg}"
    );
    // Size: a 32x32 model on 28x28 images.
    let big = model_file(dir.path(), "smallcnn", [1, 32, 32], 10);
    let msg = refused(&big, &[]);
    assert!(msg.contains("[1, 32, 32]"), "{msg}");
    // Classes: a 5-class model on a 10-class dataset.
    let five = model_file(dir.path(), "smallcnn", [1, 28, 28], 5);
    let msg = refused(&five, &[]);
    assert!(msg.contains("10 classes") && msg.contains('5'), "{msg}");
}

#[test]
fn a_shard_outside_the_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = model_file(dir.path(), "smallcnn", [1, 28, 28], 10);
    for bad in ["2/2", "0/0", "1-of-4"] {
        let msg = refused(&w, &["--shard", bad]);
        assert!(msg.contains("--shard") && msg.contains(bad), "{msg}");
    }
}

#[test]
fn merging_a_folder_without_shards_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = cwp(&["merge", dir.path().to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        msg.contains("no shard manifests") && msg.contains(dir.path().to_str().unwrap()),
        "{msg}"
    );
    assert!(!dir.path().join("report.json").exists());
    let o = cwp(&["merge", "/nonexistent/cwp-run"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/cwp-run"));
}
