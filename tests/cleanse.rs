//! Neural Cleanse on the engine (`classwise::cleanse`, `cwp cleanse`):
//! batching the classes changes no bit; the kept mask follows the rule;
//! the shipped BadNets model's target is flagged; the files are written;
//! bad options are refused.

use std::path::Path;
use std::process::{Command, Output};

use classwise::backend::cpu::CpuBackend;
use classwise::cleanse::{self, CleanseConfig, CleanseReport};
use classwise::data::{self, DataSpec, Dataset, Split};
use classwise::device_model::DeviceModel;
use classwise::models::{self, Shipped};

fn test_set() -> Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap()
}

fn cleanse(shipped: &Shipped, test: &Dataset, cfg: &CleanseConfig) -> CleanseReport {
    let model = shipped.load().unwrap();
    let dm = DeviceModel::upload(&CpuBackend::REFERENCE, &model.graph, &model.params).unwrap();
    cleanse::run(&dm, test, cfg, shipped.slug, true).unwrap()
}

#[test]
fn classes_batched_together_give_the_bits_of_one_class_at_a_time() {
    let full = test_set();
    let idx: Vec<usize> = (0..300).collect();
    let test = full.subset(&idx);
    let mut cfg = CleanseConfig::defaults(10);
    cfg.classes = vec![0, 3, 7];
    cfg.steps = 7;
    cfg.mini_batches = 2;
    cfg.batch = 8;
    // Chunks of two classes and one: batching and chunking together.
    cfg.max_images = 16;
    // Short patience so that the cost schedule moves within the run.
    cfg.schedule.patience = 2;
    let batched = cleanse(&models::BACKDOORED, &test, &cfg);
    cfg.sequential = true;
    cfg.max_images = usize::MAX;
    let sequential = cleanse(&models::BACKDOORED, &test, &cfg);
    assert!(
        batched
            .results
            .iter()
            .any(|r| r.history.iter().any(|h| h.cost > 0.0)),
        "the cost never moved: the run does not exercise the schedule"
    );
    for (b, s) in batched.results.iter().zip(&sequential.results) {
        assert_eq!(b.class, s.class);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&b.mask), bits(&s.mask), "class {} mask", b.class);
        assert_eq!(
            bits(&b.pattern),
            bits(&s.pattern),
            "class {} pattern",
            b.class
        );
        assert_eq!(b.history, s.history, "class {} history", b.class);
        assert_eq!(b.l1.to_bits(), s.l1.to_bits());
    }
    assert_eq!(batched.anomaly_index, sequential.anomaly_index);
}

#[test]
fn masks_and_patterns_stay_in_the_unit_interval_and_the_kept_mask_meets_the_threshold() {
    let full = test_set();
    let idx: Vec<usize> = (0..400).collect();
    let test = full.subset(&idx);
    let mut cfg = CleanseConfig::defaults(10);
    cfg.classes = vec![0, 1, 2];
    cfg.steps = 12;
    cfg.mini_batches = 2;
    cfg.batch = 16;
    let r = cleanse(&models::BACKDOORED, &test, &cfg);
    for c in &r.results {
        assert_eq!(c.mask.len(), 28 * 28);
        assert_eq!(c.pattern.len(), 28 * 28);
        assert!(c
            .mask
            .iter()
            .chain(&c.pattern)
            .all(|v| (0.0..=1.0).contains(v)));
        let sum: f64 = c.mask.iter().map(|&m| m as f64).sum();
        assert_eq!(c.l1, sum);
        assert_eq!(c.steps, c.history.len());
        if c.reached {
            let kept = &c.history[c.kept_step - 1];
            assert!(kept.asr >= 0.99, "class {}: kept ASR {}", c.class, kept.asr);
            // No successful step had a smaller mean L1.
            assert!(c
                .history
                .iter()
                .filter(|h| h.asr >= 0.99)
                .all(|h| h.l1 >= kept.l1));
            assert_eq!(c.asr, kept.asr);
        }
    }
}

/// About 2 minutes of CPU time (38,400 images through forward and
/// backward; 254 s wall on a loaded 2-core machine):
/// run with `cargo test --release --test cleanse -- --ignored`. Measured:
/// class 0's mask L1 9.9 (the trigger has 9 pixels) against a median of
/// 55, anomaly index 2.4; no other class above 1.4.
#[test]
#[ignore = "minutes of CPU: run with --ignored"]
fn the_shipped_backdoored_model_has_its_target_flagged() {
    let test = test_set();
    let mut cfg = CleanseConfig::defaults(10);
    cfg.steps = 30;
    cfg.mini_batches = 4;
    let bad = cleanse(&models::BACKDOORED, &test, &cfg);
    let l1: Vec<f64> = bad.results.iter().map(|r| r.l1).collect();
    assert_eq!(
        bad.flagged,
        vec![0],
        "L1 {l1:?}, anomaly {:?}",
        bad.anomaly_index
    );
    let smallest = (0..10).min_by(|&a, &b| l1[a].total_cmp(&l1[b])).unwrap();
    assert_eq!(smallest, 0);
}

#[test]
fn the_gpu_path_emulated_follows_the_cpu_reference() {
    // The GPU's convolutions sum in another order (f32 rounding, about
    // 1e-6 relative on the gradients); Adam moves a parameter by at most
    // about lr = 0.1 per update whatever the gradient's scale, so over two
    // updates such differences stay near 1e-6 in the masks. A wrong
    // pattern or mask gradient moves whole pixels (0.1 and more).
    use classwise::backend::gpu::emu::EmuDriver;
    use classwise::backend::gpu::GpuBackend;
    let full = test_set();
    let idx: Vec<usize> = (0..64).collect();
    let test = full.subset(&idx);
    let mut cfg = CleanseConfig::defaults(10);
    cfg.classes = vec![0, 4, 9];
    cfg.steps = 2;
    cfg.mini_batches = 1;
    cfg.batch = 8;
    let cpu = cleanse(&models::BACKDOORED, &test, &cfg);
    let model = models::BACKDOORED.load().unwrap();
    let gpu = GpuBackend::new(EmuDriver::new());
    let dm = DeviceModel::upload(&gpu, &model.graph, &model.params).unwrap();
    let emu = cleanse::run(&dm, &test, &cfg, "emu", true).unwrap();
    for (c, e) in cpu.results.iter().zip(&emu.results) {
        for (what, a, b) in [
            ("mask", &c.mask, &e.mask),
            ("pattern", &c.pattern, &e.pattern),
        ] {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "class {} {what}: differs by {worst}", c.class);
        }
        assert_eq!(c.history.len(), e.history.len());
    }
}

fn cwp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .output()
        .expect("cwp runs")
}

fn badnets_file() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(models::BACKDOORED.file)
        .display()
        .to_string()
}

#[test]
fn cwp_cleanse_writes_json_pictures_and_a_page() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("nc");
    let o = cwp(&[
        "cleanse",
        "--weights",
        &badnets_file(),
        "--out",
        dir.to_str().unwrap(),
        "--classes",
        "0,1,2",
        "--steps",
        "2",
        "--mini-batches",
        "1",
        "--batch",
        "8",
        "--device",
        "cpu",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cleanse.json")).unwrap()).unwrap();
    assert_eq!(json["method"], "nc");
    assert_eq!(json["classes"], serde_json::json!([0, 1, 2]));
    assert_eq!(json["anomaly_index"].as_array().unwrap().len(), 3);
    assert!(json["flagged"].is_array());
    for r in json["results"].as_array().unwrap() {
        for key in ["l1", "asr", "reached", "cost", "steps"] {
            assert!(r.get(key).is_some(), "result without {key}: {r}");
        }
        assert_eq!(r["steps"], 2);
    }
    for c in 0..3 {
        for kind in ["mask", "pattern", "fusion"] {
            let png = std::fs::read(dir.join(format!("{kind}_{c}.png"))).unwrap();
            assert_eq!(&png[1..4], b"PNG");
        }
    }
    let html = std::fs::read_to_string(dir.join("cleanse.html")).unwrap();
    assert!(html.contains("Neural Cleanse") && html.contains("data:image/png;base64,"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// Runs a `cwp cleanse` that must fail; returns its message after checking
/// that no output folder was left.
fn refused(extra: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("nc");
    let weights = badnets_file();
    let mut args = vec![
        "cleanse",
        "--weights",
        &weights,
        "--out",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = cwp(&args);
    let msg = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure for {extra:?}");
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(!dir.exists(), "{extra:?} left {}", dir.display());
    msg
}

#[test]
fn bad_options_are_refused_naming_the_option() {
    for (extra, option) in [
        (&["--steps", "0"][..], "--steps"),
        (&["--mini-batches", "0"][..], "--mini-batches"),
        (&["--batch", "0"][..], "--batch"),
        (&["--batch", "20000"][..], "--batch"),
        (&["--classes", "10"][..], "--classes"),
        (&["--classes", "1,1,2"][..], "--classes"),
        (&["--classes", "one"][..], "--classes"),
        (&["--memory", "lots"][..], "--memory"),
    ] {
        let msg = refused(extra);
        assert!(msg.contains(option), "{extra:?}: {msg}");
    }
}
