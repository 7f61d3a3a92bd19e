//! The Python halves of the prepared GPU check (`scripts/gpu-check.sh`):
//! the PyTorch peers' plan and the report that turns the run's files into
//! ratios and the accuracy gate. They run on a GPU machine only rarely, so
//! what can break without a GPU is held here (the peers' plan once failed
//! there on its first line of work).

use std::path::Path;
use std::process::Command;

fn python_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn python(code: &str) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(code)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python3 failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_torch_peers_plan_lists_each_workload_once_with_the_issue_targets_first() {
    if !python_available() {
        eprintln!("skipped: python3 not installed");
        return;
    }
    // plan() needs no torch: it only lists the workloads.
    let out = python(
        r#"
import sys
sys.path.insert(0, "benches")
import gpu_peers
for smoke in (False, True):
    p = gpu_peers.plan(smoke)
    keys = [(k, a, tuple(i), s, c) for k, a, i, s, c in p]
    assert p and len(keys) == len(set(keys)), (smoke, len(keys), len(set(keys)))
full = gpu_peers.plan(False)
print(full[0][:2], full[0][3:], full[1][:2], full[1][3:])
"#,
    );
    assert_eq!(
        out.trim(),
        "('search', 'resnet18') (1, 'authors') ('search', 'resnet18') (40, 'fp32')",
        "the authors' loop and the batched search at S = 40 come first"
    );
}

/// A search report with one search per class whose power and positions are
/// given: the fields of report.json that the gate reads.
fn search_report(dir: &Path, flagged: &[usize], searches: &[(usize, f64, [usize; 10])]) {
    std::fs::create_dir_all(dir).unwrap();
    let rows: Vec<serde_json::Value> = searches
        .iter()
        .map(|(class, power, positions)| {
            serde_json::json!({"class": class, "canvas": {"id": "solid1"},
                               "power": {"overall": power}, "positions": positions})
        })
        .collect();
    let doc = serde_json::json!({"flagged": flagged, "searches": rows});
    std::fs::write(dir.join("report.json"), doc.to_string()).unwrap();
}

#[test]
fn the_report_holds_each_gate_search_against_fp32_by_power_and_first_positions() {
    if !python_available() {
        eprintln!("skipped: python3 not installed");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gate = work.path().join("gate").join("badnets");
    let first = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    let mut moved = first;
    moved[8] = 40;
    moved[9] = 41;
    search_report(
        &gate.join("fp32"),
        &[0],
        &[(0, 0.99, first), (1, 0.50, first)],
    );
    // Within a point and 9 positions shared: passes.
    search_report(
        &gate.join("tf32x3"),
        &[0],
        &[
            (0, 0.985, first),
            (1, 0.509, {
                let mut p = first;
                p[9] = 40;
                p
            }),
        ],
    );
    // Two points off on one search, two positions moved on the other.
    search_report(
        &gate.join("bf16"),
        &[0],
        &[(0, 0.97, first), (1, 0.50, moved)],
    );
    // Another class flagged, everything else identical.
    search_report(
        &gate.join("fp32-seed1"),
        &[1],
        &[(0, 0.99, first), (1, 0.50, first)],
    );
    std::fs::write(work.path().join("steps.txt"), "").unwrap();
    let o = Command::new("python3")
        .arg(format!("{}/scripts/gpu_check_report.py", root()))
        .arg(work.path())
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("gpu-check.json")).unwrap())
            .unwrap();
    let g = &doc["gate"]["badnets"];
    assert_eq!(g["tf32x3"]["pass"], true, "{g}");
    assert_eq!(g["tf32x3"]["fewest_first10_shared"], 9);
    assert_eq!(g["bf16"]["pass"], false);
    assert_eq!(g["bf16"]["searches_failing"], 2);
    assert!((g["bf16"]["worst_power_diff_pt"].as_f64().unwrap() - 2.0).abs() < 1e-9);
    assert_eq!(g["bf16"]["fewest_first10_shared"], 8);
    assert_eq!(g["fp32-seed1"]["same_flagged"], false);
    assert_eq!(g["fp32-seed1"]["pass"], false);
    assert!(
        g.get("fp32").is_none(),
        "the reference is not compared with itself"
    );
    // The rows behind the summary travel in gate.json.
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("gate.json")).unwrap())
            .unwrap();
    assert_eq!(
        rows["badnets"]["bf16"]["rows"][1]["first10_shared"], 8,
        "{rows}"
    );
}

/// `scripts/sass_loops.py` (instructions issued per tensor-core instruction
/// in each GEMM main loop, read off `cuobjdump -sass`) on a listing made up
/// for it: a loop whose copies are skipped in its last iterations (a
/// forward branch over them) and a loop without HMMA, which is not
/// reported.
#[test]
fn the_sass_loop_counter_counts_each_way_through_a_tensor_core_loop() {
    if !python_available() {
        eprintln!("skipped: python3 not installed");
        return;
    }
    let listing = r#"
        Function : k_one
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*0020*/               @P0 BRA 0x60 ;
        /*0030*/                   LDGSTS.E [R4], desc[UR4][R6.64] ;
        /*0040*/                   LDGSTS.E [R5], desc[UR4][R8.64] ;
        /*0050*/                   IADD3 R6, R6, 0x40, RZ ;
        /*0060*/                   LDS R10, [R11] ;
        /*0070*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*0080*/                   HMMA.16816.F32.BF16 R24, R16, R22, R24 ;
        /*0090*/              @!P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        Function : k_two
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0010*/              @!P0 BRA 0x0 ;
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.sass");
    std::fs::write(&path, listing).unwrap();
    let o = Command::new("python3")
        .arg(Path::new(root()).join("scripts/sass_loops.py"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    // Through the copies: 9 instructions (0x10..0x90); over them: 6.
    assert_eq!(
        out.trim(),
        "k_one: 2 HMMA per iteration; instructions issued: 9-9 (4.5-4.5 per HMMA), 6 in the last iterations"
    );
}
