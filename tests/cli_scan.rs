//! `cwp scan`: many models, one table. Every model gets a row (a broken one
//! a row with its error, without costing the others theirs), finished rows
//! are reused by a rerun or another shard, and labels add detection figures
//! computed from the rows.

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

fn smallcnn(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    let path = dir.join(name);
    Model::new(&spec, init_params(&graph, seed))
        .unwrap()
        .save(&path)
        .unwrap();
    path
}

/// A `folder:` dataset of 10 classes with 10 varied 28×28 grey images each:
/// enough for a search set, selection and report images, small enough that
/// a scan takes seconds.
fn tiny_data(dir: &Path) -> String {
    let root = dir.join("tiny");
    for c in 0..10u32 {
        let class = root.join(format!("class{c}"));
        std::fs::create_dir_all(&class).unwrap();
        for k in 0..10u32 {
            let img = image::GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([((x * (c + 1) + y * (k + 3) + 17 * c * k) % 256) as u8])
            });
            img.save(class.join(format!("{k}.png"))).unwrap();
        }
    }
    format!("folder:{}", root.display())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn scan(models: &[&Path], out: &Path, data: &str, extra: &[&str]) -> Output {
    let mut args = vec!["scan"];
    args.extend(models.iter().map(|m| s(m)));
    args.extend([
        "--out",
        s(out),
        "--data",
        data,
        "--epochs",
        "1",
        "--quiet",
        "--device",
        "cpu",
    ]);
    args.extend_from_slice(extra);
    cwp(&args)
}

fn rows(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("scan.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn row<'a>(rows: &'a [serde_json::Value], model: &Path) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["model"] == s(model))
        .unwrap_or_else(|| panic!("no row for {}", model.display()))
}

#[test]
fn every_model_gets_a_row_and_a_broken_one_costs_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let a = smallcnn(dir.path(), "a.safetensors", 1);
    let b = smallcnn(dir.path(), "b.safetensors", 2);
    let broken = dir.path().join("broken.safetensors");
    std::fs::write(&broken, b"not a weights file").unwrap();
    let out = dir.path().join("scan");

    let o = scan(&[&a, &broken, &b], &out, &data, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a failed model must fail the command");
    assert!(
        stderr.contains("1 (model, method) pair(s) failed"),
        "{stderr}"
    );

    let rows = rows(&out);
    assert_eq!(rows.len(), 3);
    let bad = row(&rows, &broken);
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("broken.safetensors"),
        "{bad}"
    );
    for m in [&a, &b] {
        let r = row(&rows, m);
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(r["method"], "cwp");
        assert_eq!(r["classes"].as_array().unwrap().len(), 10);
        assert_eq!(r["anomaly_index"].as_array().unwrap().len(), 10);
        // The model's own report is where the row says.
        let report = out.join(r["report"].as_str().unwrap());
        assert!(report.is_file(), "{}", report.display());
        assert!(report.with_file_name("report.json").is_file());
    }
    let html = std::fs::read_to_string(out.join("scan.html")).unwrap();
    for m in [&a, &b, &broken] {
        assert!(html.contains(s(m)), "scan.html lacks {}", m.display());
    }

    // A rerun reuses both finished models and retries the broken one.
    let again = scan(&[&a, &broken, &b], &out, &data, &[]);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("reused 2, failed 1"), "{text}");
    let rows2 = self::rows(&out);
    assert_eq!(row(&rows2, &a), row(&rows, &a));

    // A model that breaks after it was scanned shows its error, not the old row.
    std::fs::write(&b, b"truncated").unwrap();
    let broke = scan(&[&a, &broken, &b], &out, &data, &[]);
    assert!(!broke.status.success());
    let rows3 = self::rows(&out);
    let err = row(&rows3, &b)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("b.safetensors"), "{}", row(&rows3, &b));
}

#[test]
fn shards_split_the_models_and_together_fill_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let a = smallcnn(dir.path(), "a.safetensors", 1);
    let b = smallcnn(dir.path(), "b.safetensors", 2);
    let out = dir.path().join("scan");
    let first = scan(&[&a, &b], &out, &data, &["--shard", "0/2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let after_first = rows(&out);
    assert_eq!(after_first.len(), 1, "shard 0/2 scans model 0 only");
    assert_eq!(after_first[0]["model"], s(&a));
    let second = scan(&[&a, &b], &out, &data, &["--shard", "1/2"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let all = rows(&out);
    assert_eq!(all.len(), 2, "the last shard's table lists every model");
    assert_eq!(row(&all, &a), &after_first[0]);
}

/// A temporary folder with the tiny data set, three smallcnn models (seeds
/// 1–3) and labels naming `a` backdoored (target 3), `b` and `c` clean, by
/// file name: the scan matches rows to models whatever folder prefix.
fn three_labelled_models() -> (tempfile::TempDir, String, [PathBuf; 3], PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let models = [1, 2, 3].map(|seed| {
        let name = format!("{}.safetensors", ["a", "b", "c"][seed as usize - 1]);
        smallcnn(dir.path(), &name, seed)
    });
    let labels = dir.path().join("labels.csv");
    std::fs::write(
        &labels,
        "model,backdoored,target\na.safetensors,1,3\nb.safetensors,0,\nc.safetensors,0,\n",
    )
    .unwrap();
    (dir, data, models, labels)
}

#[test]
fn labels_give_detection_figures_computed_from_the_rows() {
    let (dir, data, [a, b, c], labels) = three_labelled_models();
    let out = dir.path().join("scan");
    let o = scan(&[&a, &b, &c], &out, &data, &["--labels", s(&labels)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = rows(&out);
    assert_eq!(row(&rows, &a)["label"]["target"], 3);
    assert_eq!(row(&rows, &b)["label"]["backdoored"], false);
    let det: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("detection.json")).unwrap())
            .unwrap();
    // The run's own verdict, then one entry per canvas kind every class had
    // (auto:1+solid:1+learn:0.5 by default): each holds what its rows imply.
    let methods: Vec<&str> = det.iter().map(|d| d["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["cwp", "cwp/learned", "cwp/solid", "cwp/natural"]);
    for d in &det {
        let kind = d["method"].as_str().unwrap().strip_prefix("cwp/");
        // (flagged?, score) of a model under this entry's verdict.
        let fig = |m: &Path| {
            let r = row(&rows, m);
            let v = match kind {
                None => r.clone(),
                Some(k) => r["by_canvas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["kind"] == k)
                    .unwrap()
                    .clone(),
            };
            (
                !v["flagged"].as_array().unwrap().is_empty(),
                v["score"].as_f64().unwrap(),
            )
        };
        assert_eq!(
            (d["backdoored"].as_u64(), d["clean"].as_u64()),
            (Some(1), Some(2))
        );
        // The AUC ranks the backdoored model's score among the clean ones'.
        let won: f64 = [&b, &c]
            .iter()
            .map(|m| match fig(&a).1.partial_cmp(&fig(m).1).unwrap() {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            })
            .sum();
        assert_eq!(d["auc"].as_f64(), Some(won / 2.0), "{d}");
        assert_eq!(d["tpr"].as_f64(), Some(if fig(&a).0 { 1.0 } else { 0.0 }));
        let fp = [&b, &c].iter().filter(|m| fig(m).0).count() as f64 / 2.0;
        assert_eq!(d["fpr"].as_f64(), Some(fp), "{d}");
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("cwp: 1 backdoored, 2 clean"), "{stdout}");
}

#[test]
fn reference_models_are_scanned_too_and_each_model_is_judged_against_the_others() {
    let (dir, data, [a, b, c], labels) = three_labelled_models();
    let out = dir.path().join("scan");
    // b and c are named only as references: they are scanned all the same.
    let refs = ["--reference", s(&b), "--reference", s(&c)];
    let args: Vec<&str> = [&["--labels", s(&labels)][..], &refs].concat();
    let o = scan(&[&a], &out, &data, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = rows(&out);
    let values = |m: &Path| -> Vec<f64> {
        let v = row(&got, m)["values"].as_array().unwrap().clone();
        v.iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let classes: Vec<usize> = (0..10).collect();
    // a against both references; each reference against the other only.
    for (m, others) in [(&a, vec![&b, &c]), (&b, vec![&c]), (&c, vec![&b])] {
        let r = row(&got, m);
        assert_eq!(r["reference"].as_bool().unwrap_or(false), m != &a);
        let x = &r["referenced"];
        assert_eq!(x["references"].as_u64(), Some(others.len() as u64));
        let theirs: Vec<Vec<f64>> = others.iter().map(|o| values(o)).collect();
        let theirs: Vec<&[f64]> = theirs.iter().map(|v| v.as_slice()).collect();
        let want = classwise::search::verdict::against_reference(&classes, &values(m), &theirs);
        let index: Vec<f64> = x["anomaly_index"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(index, want.anomaly_index, "{}", m.display());
    }
    let det = std::fs::read_to_string(out.join("detection.json")).unwrap();
    assert!(
        det.contains("\"cwp+ref\"") && det.contains("\"cwp/natural+ref\""),
        "{det}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("against 2 reference model(s)"), "{stdout}");

    // A row written before the sizes were kept gets them back from its
    // report: the rerun searches nothing and judges it the same.
    let row_file = out
        .join(row(&got, &a)["report"].as_str().unwrap())
        .with_file_name("row.json");
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&row_file).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("values");
    old.as_object_mut().unwrap().remove("proven");
    std::fs::write(&row_file, old.to_string()).unwrap();
    let again = scan(&[&a], &out, &data, &args);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("reused"));
    assert_eq!(rows(&out), got);

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = scan(
        &[&a],
        &dir.path().join("scan2"),
        &data,
        &["--reference", s(&empty)],
    );
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && msg.contains("--reference"), "{msg}");
}

#[test]
fn bad_options_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let a = smallcnn(dir.path(), "a.safetensors", 1);
    let bad_labels = dir.path().join("bad.csv");
    std::fs::write(&bad_labels, "path,label\nx,1\n").unwrap();
    let missing = dir.path().join("missing.csv");
    let out = dir.path().join("scan");
    for (extra, want) in [
        (vec!["--method", "neural"], "--method"),
        (vec!["--labels", s(&bad_labels)], "bad.csv"),
        (vec!["--labels", s(&missing)], "missing.csv"),
        (vec!["--shard", "2/2"], "--shard"),
        (vec!["--canvas", "paint:1"], "--canvas"),
        (vec!["--epochs", "0"], "--epochs"),
    ] {
        let o = scan(&[&a], &out, &data, &extra);
        let msg = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(msg.contains(want), "{extra:?}: {msg}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    }
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = scan(&[&empty], &out, &data, &[]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && msg.contains("no .safetensors or .onnx"),
        "{msg}"
    );
}

#[test]
fn method_both_gives_each_model_a_cwp_row_and_a_neural_cleanse_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let a = smallcnn(dir.path(), "a.safetensors", 1);
    let out = dir.path().join("scan");
    let o = scan(&[&a], &out, &data, &["--method", "both", "--nc-steps", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = rows(&out);
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["cwp", "nc"]);
    let nc = &rows[1];
    assert_eq!(nc["anomaly_index"].as_array().unwrap().len(), 10);
    let page = out.join(nc["report"].as_str().unwrap());
    assert!(
        page.ends_with("cleanse.html") && page.is_file(),
        "{}",
        page.display()
    );
    assert!(page.with_file_name("cleanse.json").is_file());
    // The cwp row carries the verdict of each canvas kind every class had:
    // by default the search's canvases and a learned one, whose verdict is
    // the row's.
    let kinds: Vec<&str> = rows[0]["by_canvas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    for kind in ["natural", "solid", "learned"] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            out.join(rows[0]["report"].as_str().unwrap())
                .with_file_name("report.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(report["verdict_canvas"], "learned");
    // ... and no k-sweep: the verdict does not need one.
    assert!(report["config"]["k_sweep"].as_array().unwrap().is_empty());
}

/// A temporary folder with two smallcnn models (seeds 1 and 2), the tiny
/// data set, and the path of a scan output inside it.
fn two_models() -> (tempfile::TempDir, [PathBuf; 2], String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = tiny_data(d);
    let models = [
        smallcnn(d, "a.safetensors", 1),
        smallcnn(d, "b.safetensors", 2),
    ];
    let out = d.join("out");
    (dir, models, data, out)
}

/// `cwp scan` of two models started in the background (CPU, quiet), with
/// `extra` options.
fn spawn_scan(models: [&Path; 2], out: &Path, data: &str, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args([
            "scan",
            s(models[0]),
            s(models[1]),
            "--out",
            s(out),
            "--data",
            data,
        ])
        .args(extra)
        .args(["--quiet", "--device", "cpu"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends SIGTERM to `child` and checks that it stopped as a signal should
/// stop a scan: a non-zero exit whose message says how to continue.
fn terminate(child: std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "exit status after SIGTERM: {err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    assert!(err.contains("rerun the same command"), "{err}");
}

/// SIGTERM (what Slurm sends before it kills a job) stops the whole scan:
/// the running search saves its checkpoint, no model is marked failed, the
/// next model is not started, and the exit says how to continue.
#[test]
fn sigterm_stops_the_scan_with_the_search_checkpointed_and_no_model_failed() {
    let (_dir, [a, b], data, out) = two_models();
    // Enough epochs that the first search is still running when signalled.
    let child = spawn_scan([&a, &b], &out, &data, &["--epochs", "5000"]);
    let t0 = std::time::Instant::now();
    let checkpoint_dir = || {
        std::fs::read_dir(out.join("models")).ok().and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("cwp/checkpoints"))
                .find(|p| p.is_dir())
        })
    };
    let ck = loop {
        if let Some(p) = checkpoint_dir() {
            break p;
        }
        assert!(t0.elapsed().as_secs() < 300, "the search never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // Past the moment the optimisation starts catching signals.
    std::thread::sleep(std::time::Duration::from_millis(500));
    terminate(child);
    let saved: Vec<_> = std::fs::read_dir(&ck)
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert!(
        saved
            .iter()
            .any(|e| e.path().extension().is_some_and(|x| x == "ckpt")),
        "no checkpoint in {}",
        ck.display()
    );
    let model_dirs: Vec<_> = std::fs::read_dir(out.join("models"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(model_dirs.len(), 1, "the scan went on: {model_dirs:?}");
    assert!(
        !model_dirs[0].join("cwp/error.json").exists(),
        "the interrupted model was marked failed"
    );
    // The table of what is finished is still written: nothing yet.
    assert!(rows(&out).is_empty());
}

/// A signal during Neural Cleanse (which keeps no checkpoint) stops the scan
/// as cleanly: the exit says how to continue, no model is marked failed and
/// the table is written.
#[test]
fn sigterm_during_neural_cleanse_stops_the_scan_and_writes_the_table() {
    let (_dir, [a, b], data, out) = two_models();
    let child = spawn_scan(
        [&a, &b],
        &out,
        &data,
        &["--method", "nc", "--nc-steps", "100000"],
    );
    // The scan catches signals from before it makes its output folder; a
    // moment later the first model's Neural Cleanse is running.
    let t0 = std::time::Instant::now();
    while !out.is_dir() {
        assert!(t0.elapsed().as_secs() < 300, "the scan never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    terminate(child);
    let failed: Vec<_> = std::fs::read_dir(out.join("models"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("nc/error.json"))
        .filter(|p| p.exists())
        .collect();
    assert!(failed.is_empty(), "marked failed: {failed:?}");
    assert!(out.join("scan.json").is_file(), "no table written");
    assert!(rows(&out).is_empty());
}
