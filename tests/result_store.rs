//! The search cache trusts a stored result only when it proves itself: a
//! checksum over its key and result, and sizes and values a search could
//! have produced. A run recomputes a file that fails, naming it; `cwp
//! merge`, which cannot recompute, stops with an error naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use classwise::backend::cpu::CpuBackend;
use classwise::data::{self, DataSpec, Dataset, Split};
use classwise::search::pattern::SourcePower;
use classwise::search::shard::merge;
use classwise::search::store::{Lookup, Store};
use classwise::search::{Canvas, Power, SearchConfig, SearchResult};
use classwise::train::init_params;
use classwise::weights::Model;
use classwise::zoo::{build, ModelSpec};

mod common;

/// A result a 1x4x4 search could have produced.
fn result() -> SearchResult {
    let mask: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
    let mask_mean = mask.iter().map(|&v| v as f64).sum::<f64>() / 16.0;
    SearchResult {
        class: 2,
        class_name: "two".into(),
        canvas: Canvas {
            id: "solid1".into(),
            source: "solid".into(),
            dataset_index: None,
            confidence: Some(0.25),
            margin: Some(1.5),
            pixels: vec![1.0; 16],
        },
        mask,
        mask_mean,
        steps: 10,
        ce_curve: vec![(5, 1.5), (10, 0.75)],
        positions: vec![15, 14, 13],
        power: Power {
            k: 3,
            overall: 0.5,
            clean: 0.125,
            per_source: vec![SourcePower {
                source: 0,
                images: 8,
                stamped: 0.5,
                clean: 0.125,
            }],
        },
        select_power: Some(0.5),
        soft_power: Some(0.75),
        mask_avg: Vec::new(),
        sweep: vec![(1, 0.25), (16, 1.0)],
        min_k: Some(16),
        examples: Vec::new(),
        eval_seconds: 0.5,
    }
}

const KEY: &str = "0123456789abcdef0123456789abcdef";

fn bad_reason(store: &Store) -> (PathBuf, String) {
    match store.lookup(KEY) {
        Lookup::Bad(path, why) => (path, why),
        other => panic!("expected a bad file, got {other:?}"),
    }
}

fn stored_file(dir: &Path) -> PathBuf {
    dir.join("searches").join(format!("{}.json", &KEY[..16]))
}

#[test]
fn a_saved_result_reads_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap().expecting([1, 4, 4]);
    assert!(matches!(store.lookup(KEY), Lookup::Missing));
    store.save(KEY, &result()).unwrap();
    match store.lookup(KEY) {
        Lookup::Found(r) => assert_eq!(*r, result()),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.load(KEY), Some(result()));
}

#[test]
fn an_edited_number_fails_the_checksum_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.save(KEY, &result()).unwrap();
    let path = stored_file(dir.path());
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["result"]["power"]["overall"] = serde_json::json!(0.75);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let (bad, why) = bad_reason(&store);
    assert_eq!(bad, path);
    assert!(why.contains("checksum"), "{why}");
    assert_eq!(store.load(KEY), None, "an edited result was used");
}

#[test]
fn a_file_without_a_checksum_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.save(KEY, &result()).unwrap();
    let path = stored_file(dir.path());
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("checksum");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let (_, why) = bad_reason(&store);
    assert!(why.contains("no checksum"), "{why}");
}

#[test]
fn unparsable_and_foreign_files_are_named_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let path = stored_file(dir.path());
    std::fs::write(&path, b"{\"key\": \"012").unwrap();
    let (bad, why) = bad_reason(&store);
    assert_eq!(bad, path);
    assert!(why.contains("not a stored search result"), "{why}");
    // Same file name (the key's first 16 digits), another search's key.
    let other = format!("{}ffff", &KEY[..16]);
    store.save(&other, &result()).unwrap();
    let (_, why) = bad_reason(&store);
    assert!(why.contains("different search"), "{why}");
}

/// Results whose checksum is right (they were saved as they are) but that
/// no search could have produced.
#[test]
fn inconsistent_results_are_not_used_even_with_a_valid_checksum() {
    type Edit = fn(&mut SearchResult);
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("short mask", |r| r.mask.truncate(15), "mask"),
        (
            "mask for another input",
            |r| {
                r.mask = vec![0.5; 4];
                r.mask_mean = 0.5;
                r.canvas.pixels = vec![1.0; 4];
                r.positions = vec![0];
                r.power.k = 1;
                r.sweep.clear();
                r.min_k = None;
            },
            "4x4",
        ),
        (
            "position out of range",
            |r| r.positions[1] = 16,
            "positions",
        ),
        ("repeated position", |r| r.positions[1] = 15, "repeats"),
        ("mask mean", |r| r.mask_mean = 0.1, "mask mean"),
        ("mask value", |r| r.mask[0] = 1.5, "outside [0, 1]"),
        ("power", |r| r.power.overall = 1.5, "outside [0, 1]"),
        ("k", |r| r.power.k = 4, "k = 4"),
        ("minimal k", |r| r.min_k = Some(17), "minimal k"),
    ];
    for (what, edit, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().expecting([1, 4, 4]);
        let mut r = result();
        edit(&mut r);
        store.save(KEY, &r).unwrap();
        let (bad, why) = bad_reason(&store);
        assert_eq!(bad, stored_file(dir.path()), "{what}");
        assert!(why.contains(want), "{what}: `{want}` not in: {why}");
    }
}

fn cwp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .output()
        .expect("cwp runs")
}

/// The result files of a run folder, by name.
fn result_files(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("searches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn a_rerun_recomputes_an_edited_or_truncated_result_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    let weights = dir.path().join("m.safetensors");
    Model::new(&spec, init_params(&graph, 1))
        .unwrap()
        .save(&weights)
        .unwrap();
    let out = dir.path().join("run");
    let search = || {
        let o = cwp(&[
            "search",
            "--weights",
            weights.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--classes",
            "3,5",
            "--canvas",
            "solid:1",
            "--epochs",
            "1",
            "--search-frac",
            "0.02",
            "--k-sweep",
            "none",
            "--eval-per-class",
            "5",
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        (String::from_utf8_lossy(&o.stderr).to_string(), report)
    };
    search();
    let files = result_files(&out);
    assert_eq!(files.len(), 2);
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();

    // One file gets an edited number, the other a truncated mask.
    let edit = |f: &Path, change: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        change(&mut v["result"]);
        std::fs::write(f, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    edit(&files[0], &|r| {
        let x = r["power"]["overall"].as_f64().unwrap();
        r["power"]["overall"] = serde_json::json!(if x < 0.5 { x + 0.25 } else { x - 0.25 });
    });
    edit(&files[1], &|r| {
        r["mask"].as_array_mut().unwrap().truncate(700);
    });
    let (msg, report) = search();
    for f in &files {
        assert!(
            msg.contains(&f.display().to_string()),
            "{} not named: {msg}",
            f.display()
        );
    }
    assert_eq!(report["reused"], 0, "a damaged result was reused");
    // The searches ran again and wrote what they wrote the first time.
    for (f, orig) in files.iter().zip(&originals) {
        let now: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let was: serde_json::Value = serde_json::from_slice(orig).unwrap();
        assert_eq!(
            now["result"]["mask"],
            was["result"]["mask"],
            "{}",
            f.display()
        );
        assert_eq!(
            now["result"]["power"],
            was["result"]["power"],
            "{}",
            f.display()
        );
    }
    // Now sound: reused, nothing to warn about.
    let (msg, report) = search();
    assert_eq!(report["reused"], 2, "{msg}");
    assert!(!msg.contains("warning"), "{msg}");
}

fn small_test_set() -> Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    let idx: Vec<usize> = (0..300).collect();
    test.subset(&idx)
}

/// A finished one-shard run of 3 small searches in `out`.
fn one_shard_run(out: &Path) {
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    let model = Model::new(&spec, classwise::selftest::formula_params(&graph)).unwrap();
    let test = small_test_set();
    let mut cfg = SearchConfig::defaults(model.graph.input, 10);
    cfg.classes = vec![1, 4, 8];
    cfg.canvas = "auto:1".into();
    cfg.search_frac = 0.1;
    cfg.mask.epochs = 1;
    cfg.k_sweep = vec![8, 64];
    cfg.sweep_per_class = Some(5);
    cfg.eval_per_class = Some(10);
    let inputs = classwise::search::RunInputs {
        model: &model,
        model_id: "formula".into(),
        model_label: "formula".into(),
        test: &test,
        train: None,
        command: "test".into(),
        quiet: true,
        checkpoint_every: None,
    };
    classwise::search::run_shard(
        &CpuBackend::REFERENCE,
        &inputs,
        &cfg,
        out,
        "0/1".parse().unwrap(),
    )
    .unwrap();
}

#[test]
fn merge_names_a_corrupt_result_file_and_a_corrupt_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_path_buf();
    one_shard_run(&out);
    merge(std::slice::from_ref(&out)).expect("a sound run merges");

    // A result with an edited number.
    let f = result_files(&out)[1].clone();
    let good = std::fs::read(&f).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let t = v["result"]["eval_seconds"].as_f64().unwrap();
    v["result"]["eval_seconds"] = serde_json::json!(t + 1.0);
    std::fs::write(&f, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = merge(std::slice::from_ref(&out)).unwrap_err().to_string();
    assert!(
        err.contains(&f.display().to_string()) && err.contains("checksum") && err.contains("0/1"),
        "{err}"
    );
    // Truncated mid-file.
    std::fs::write(&f, &good[..good.len() / 2]).unwrap();
    let err = merge(std::slice::from_ref(&out)).unwrap_err().to_string();
    assert!(err.contains(&f.display().to_string()), "{err}");
    std::fs::write(&f, &good).unwrap();
    merge(std::slice::from_ref(&out)).expect("the restored run merges");

    // A manifest with an edited number, then one cut short.
    let m = out.join("shards").join("0-of-1.json");
    let good = std::fs::read(&m).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["header"]["clean_accuracy"] = serde_json::json!(0.99);
    std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = merge(std::slice::from_ref(&out)).unwrap_err().to_string();
    assert!(
        err.contains(&m.display().to_string()) && err.contains("checksum"),
        "{err}"
    );
    std::fs::write(&m, &good[..good.len() - 10]).unwrap();
    let err = merge(std::slice::from_ref(&out)).unwrap_err().to_string();
    assert!(err.contains(&m.display().to_string()), "{err}");
}
