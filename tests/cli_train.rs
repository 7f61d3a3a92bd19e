//! `cwp train` refuses bad options with a clear message before any training
//! starts: nothing is written and the command returns at once.

use std::process::Command;
use std::time::Instant;

fn refused(args: &[&str], out_dir: &std::path::Path) -> String {
    let out = out_dir.join("m.safetensors");
    let mut all = vec!["train", "--arch", "smallcnn", "--epochs", "1", "--quiet"];
    if !args.contains(&"--out") {
        all.extend_from_slice(&["--out", out.to_str().unwrap()]);
    }
    all.extend_from_slice(args);
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(&all)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{args:?} was accepted");
    assert!(
        t.elapsed().as_secs() < 20,
        "{args:?}: the error came only after {:?}",
        t.elapsed()
    );
    assert!(
        std::fs::read_dir(out_dir).unwrap().next().is_none(),
        "{args:?} left files behind"
    );
    msg
}

#[test]
fn bad_training_options_are_clear_errors_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let msg = refused(&["--poison", "badnets:pos=middle", "--target", "0"], d);
    assert!(msg.contains("--trigger") && msg.contains("middle"), "{msg}");
    let msg = refused(&["--poison", "badnets", "--target", "10"], d);
    assert!(msg.contains("--target") && msg.contains("10"), "{msg}");
    let msg = refused(&["--adversarial", "pgd:1.5,0.1,10"], d);
    assert!(
        msg.contains("--adversarial") && msg.contains("1.5"),
        "{msg}"
    );
    let msg = refused(&["--adversarial", "fgsm:-0.1"], d);
    assert!(msg.contains("--adversarial"), "{msg}");
    let msg = refused(&["--out", "/nonexistent-dir/m.safetensors"], d);
    assert!(
        msg.contains("--out") && msg.contains("/nonexistent-dir"),
        "{msg}"
    );

    // A PNG trigger of the wrong size (5x4 for a 3x3 patch, and for a blend).
    let pngs = tempfile::tempdir().unwrap();
    let png = pngs.path().join("trigger.png");
    image::GrayImage::from_pixel(5, 4, image::Luma([255]))
        .save(&png)
        .unwrap();
    let patch = format!("badnets:size=3,fill={}", png.display());
    let msg = refused(&["--poison", &patch, "--target", "1"], d);
    assert!(msg.contains("trigger.png") && msg.contains("5x4"), "{msg}");
    let blend = format!("blend:alpha=0.2,pattern={}", png.display());
    let msg = refused(&["--poison", &blend, "--target", "1"], d);
    assert!(
        msg.contains("trigger.png") && msg.contains("28x28"),
        "{msg}"
    );
}

#[test]
fn a_momentum_or_weight_decay_that_would_make_the_weights_meaningless_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for bad in ["nan", "1", "-0.5", "inf"] {
        let msg = refused(&[&format!("--momentum={bad}")], d);
        assert!(msg.contains("--momentum"), "{bad}: {msg}");
    }
    for bad in ["nan", "-1e-4", "inf"] {
        let msg = refused(&[&format!("--weight-decay={bad}")], d);
        assert!(msg.contains("--weight-decay"), "{bad}: {msg}");
    }
}

/// Runs `cwp bench --device cpu` on the plans `[models, search, train,
/// convs]` for `seconds` a figure, with its JSON report in a temporary
/// folder; it must succeed. Returns the printed table and the report.
fn bench_cpu(plans: [&str; 4], seconds: &str) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let [models, search, train, convs] = plans;
    let o = Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(["bench", "--device", "cpu", "--models", models])
        .args(["--search", search, "--train", train, "--convs", convs])
        .args(["--seconds", seconds])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (text, report)
}

/// Runs `cwp bench --device cpu` with `args`; it must fail. Returns its
/// error output.
fn bench_refused(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(["bench", "--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `cwp bench --train` times the training step and writes it to the JSON
/// report, every other section left out with `none`; a malformed plan names
/// `--train`.
#[test]
fn cwp_bench_times_training_steps_and_refuses_a_bad_plan() {
    let (text, report) = bench_cpu(["none", "none", "smallcnn:4,8", "none"], "0.05");
    assert!(text.contains("training steps"), "{text}");
    let rows = report["train"].as_array().unwrap();
    let batches: Vec<u64> = rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [4, 8]);
    for r in rows {
        let ips = r["images_per_s"].as_f64().unwrap();
        assert!(ips.is_finite() && ips > 0.0, "{r}");
    }
    assert!(report["models"].as_array().unwrap().is_empty());
    assert!(report["search"].as_array().unwrap().is_empty());

    let msg = bench_refused(&["--train", "smallcnn:0"]);
    assert!(msg.contains("--train"), "{msg}");
}

/// The bench report names the arithmetic it timed: the CPU's reference by
/// default, the Winograd forward when `--cpu-forward winograd` asks for it
/// (the same path a search then takes); an unknown choice names the option.
#[test]
fn cwp_bench_reports_the_cpu_forward_it_timed() {
    let numerics = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("bench.json");
        let o = Command::new(env!("CARGO_BIN_EXE_cwp"))
            .args(["bench", "--device", "cpu", "--models", "none"])
            .args([
                "--search",
                "smallcnn:1",
                "--train",
                "none",
                "--convs",
                "none",
            ])
            .args(["--seconds", "0.05"])
            .args(extra)
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let n = report["numerics"].as_str().unwrap().to_string();
        assert!(text.contains(&format!("({n})")), "{text}");
        n
    };
    assert_eq!(numerics(&[]), "cpu fp32");
    assert_eq!(numerics(&["--cpu-forward", "direct"]), "cpu fp32");
    assert_eq!(
        numerics(&["--cpu-forward", "winograd"]),
        "cpu fp32 winograd-forward"
    );
    let msg = bench_refused(&["--cpu-forward", "fft"]);
    assert!(msg.contains("--cpu-forward"), "{msg}");
}

/// `cwp bench --convs` on the CPU times each distinct convolution of the
/// model once (forward, backward-data, backward-filter), with how many
/// layers share its shape, so a run can be set beside PyTorch's per layer.
#[test]
fn cwp_bench_times_each_distinct_convolution_on_the_cpu() {
    let (text, report) = bench_cpu(["none", "none", "none", "smallcnn:2"], "0.02");
    assert!(text.contains("convolution kernels"), "{text}");
    let rows = report["convs"].as_array().unwrap();
    let filters: Vec<Vec<u64>> = rows
        .iter()
        .map(|r| {
            let w = r["w"].as_array().unwrap();
            w.iter().map(|v| v.as_u64().unwrap()).collect()
        })
        .collect();
    // smallcnn: conv1..conv4, each its own shape.
    assert_eq!(
        filters,
        [
            [32, 1, 3, 3],
            [32, 32, 3, 3],
            [64, 32, 3, 3],
            [64, 64, 3, 3]
        ]
    );
    for r in rows {
        assert_eq!(r["x"][0].as_u64(), Some(2), "{r}");
        assert_eq!(r["count"].as_u64(), Some(1), "{r}");
        for t in r["tflops"].as_array().unwrap() {
            let t = t.as_f64().unwrap();
            assert!(t.is_finite() && t > 0.0, "{r}");
        }
    }
    let weighted = report["conv_tflops_weighted"].as_array().unwrap();
    assert_eq!(weighted.len(), 4);
}
