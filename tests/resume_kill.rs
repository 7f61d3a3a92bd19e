//! A search killed midway continues from its checkpoint: `kill -9`, SIGTERM
//! (what Slurm sends before it kills a job) or a corrupt checkpoint never
//! change a result; the resumed report equals an uninterrupted run's, bit
//! for bit.
//!
//! The soak run of the target (killed and resumed at random for a given
//! time) is `#[ignore]`d: `CWP_SOAK_SECONDS=1800 cargo test --release
//! --test resume_kill -- --ignored --nocapture`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use classwise::search::{RunReport, SearchResult};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smallcnn_fmnist_badnets.safetensors")
}

/// A short run of 3 searches whose optimisation lasts a few seconds.
fn args(out: &Path, classes: &str, epochs: usize) -> Vec<String> {
    [
        "search",
        "--weights",
        model().to_str().unwrap(),
        "--data",
        "fashion-mnist",
        "--out",
        out.to_str().unwrap(),
        "--classes",
        classes,
        "--canvas",
        "solid:1",
        "--epochs",
        &epochs.to_string(),
        "--search-frac",
        "0.05",
        "--k-sweep",
        "8,64",
        "--sweep-per-class",
        "5",
        "--eval-per-class",
        "10",
        "--checkpoint-every",
        "0.2",
        "--memory",
        "64M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

const CLASSES: &str = "0,1,7";
const EPOCHS: usize = 2;

fn start(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cwp starts")
}

fn finish(child: Child) -> (Output, String) {
    let o = child.wait_with_output().expect("cwp runs");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    (o, err)
}

/// Runs to the end; returns stderr.
fn complete(args: &[String]) -> String {
    let (o, err) = finish(start(args));
    assert!(o.status.success(), "cwp failed: {err}");
    err
}

fn report(out: &Path) -> RunReport {
    let text = std::fs::read(out.join("report.json")).expect("report.json");
    serde_json::from_slice(&text).expect("a report")
}

/// The report of an uninterrupted run (shared by the tests of this file).
fn reference(classes: &str, epochs: usize) -> RunReport {
    timed_reference(classes, epochs).0
}

/// The report of an uninterrupted run and its wall time.
fn timed_reference(classes: &str, epochs: usize) -> (RunReport, Duration) {
    type Cache = Vec<(String, usize, RunReport, Duration)>;
    static REF: OnceLock<std::sync::Mutex<Cache>> = OnceLock::new();
    let cache = REF.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, r, d)) = cache.iter().find(|(c, e, ..)| c == classes && *e == epochs) {
        return (r.clone(), *d);
    }
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let err = complete(&args(dir.path(), classes, epochs));
    let took = t0.elapsed();
    assert!(!err.contains("resuming"), "{err}");
    let r = report(dir.path());
    cache.push((classes.to_string(), epochs, r.clone(), took));
    (r, took)
}

/// Every field of every search but the timing, masks compared as exact f32.
fn assert_same_searches(a: &RunReport, b: &RunReport) {
    assert_eq!(a.searches.len(), b.searches.len());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (x, y) in a.searches.iter().zip(&b.searches) {
        assert_eq!(bits(&x.mask), bits(&y.mask), "mask of class {}", x.class);
        assert_eq!(
            bits(&x.mask_avg),
            bits(&y.mask_avg),
            "mask_avg of class {}",
            x.class
        );
        let untimed = |r: &SearchResult| SearchResult {
            eval_seconds: 0.0,
            ..r.clone()
        };
        assert_eq!(untimed(x), untimed(y), "search of class {}", x.class);
    }
    assert_eq!(a.classes, b.classes);
    assert_eq!(a.verdict_mask, b.verdict_mask);
}

fn checkpoints(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a run and waits until it has saved a checkpoint (and then
/// `extra` longer); panics if it ends first.
fn start_until_checkpoint(args: &[String], out: &Path, extra: Duration) -> Child {
    let mut child = start(args);
    let t0 = Instant::now();
    while checkpoints(out).is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before any checkpoint");
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(extra);
    child
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

/// `N` and `M` of the line "resuming from step N of M".
fn resumed_at(stderr: &str) -> Option<(usize, usize)> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("resuming from step "))?;
    let mut words = line["resuming from step ".len()..].split_whitespace();
    let n = words.next()?.parse().ok()?;
    let m = words.nth(1)?.parse().ok()?;
    Some((n, m))
}

#[test]
fn a_run_killed_midway_resumes_and_gives_the_uninterrupted_report_bit_for_bit() {
    let whole = reference(CLASSES, EPOCHS);
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path(), CLASSES, EPOCHS);
    let mut child = start_until_checkpoint(&a, dir.path(), Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL: nothing saved on the way out
    let (o, _) = finish(child);
    assert!(!o.status.success());
    assert!(
        !dir.path().join("report.json").exists(),
        "the run was not killed midway"
    );

    let err = complete(&a);
    let (n, m) = resumed_at(&err).unwrap_or_else(|| panic!("did not resume: {err}"));
    assert!(0 < n && n < m, "resumed at step {n} of {m}");
    assert_same_searches(&whole, &report(dir.path()));
    assert_eq!(
        checkpoints(dir.path()),
        Vec::<PathBuf>::new(),
        "checkpoint left after success"
    );
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_with_a_message_and_the_rerun_completes() {
    let whole = reference(CLASSES, EPOCHS);
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path(), CLASSES, EPOCHS);
    let child = start_until_checkpoint(&a, dir.path(), Duration::from_millis(100));
    signal(&child, "-TERM");
    let (o, err) = finish(child);
    assert!(!o.status.success(), "exit status after SIGTERM");
    assert_eq!(
        o.status.code(),
        Some(1),
        "an error exit, not death by signal: {err}"
    );
    let saved = checkpoints(dir.path());
    assert_eq!(saved.len(), 1);
    assert!(
        err.contains("interrupted by SIGTERM at step")
            && err.contains(&saved[0].display().to_string())
            && err.contains("rerun the same command"),
        "{err}"
    );

    let err = complete(&a);
    let (n, m) = resumed_at(&err).unwrap_or_else(|| panic!("did not resume: {err}"));
    assert!(0 < n && n < m, "resumed at step {n} of {m}");
    assert_same_searches(&whole, &report(dir.path()));
}

#[test]
fn a_corrupt_checkpoint_is_ignored_with_a_warning_naming_it() {
    let whole = reference(CLASSES, EPOCHS);
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path(), CLASSES, EPOCHS);
    let mut child = start_until_checkpoint(&a, dir.path(), Duration::from_millis(100));
    child.kill().unwrap();
    finish(child);
    let path = checkpoints(dir.path()).remove(0);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let err = complete(&a);
    assert!(
        err.contains("warning: ignoring checkpoint") && err.contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(
        resumed_at(&err),
        None,
        "resumed from a corrupt checkpoint: {err}"
    );
    assert_same_searches(&whole, &report(dir.path()));
}

/// The step a checkpoint file holds (its header: magic, u64 length, JSON).
fn saved_step(path: &Path) -> Option<usize> {
    let bytes = std::fs::read(path).ok()?;
    let n = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(16..16 + n)?).ok()?;
    header["t"].as_u64().map(|t| t as usize)
}

/// A small deterministic generator for the soak run's kill times.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The target: runs of mixed searches, killed (`kill -9` or SIGTERM) and
/// resumed at random for `CWP_SOAK_SECONDS` (default 1800), never change a
/// result, and each resume starts from the last checkpoint saved before the
/// kill (so at most one checkpoint interval of work is lost).
#[test]
#[ignore]
fn soak_runs_killed_and_resumed_at_random_never_change_a_result() {
    let budget = Duration::from_secs_f64(
        std::env::var("CWP_SOAK_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1800.0),
    );
    let mut rng: u64 = std::env::var("CWP_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    eprintln!("soak: {budget:?}, seed {rng}");
    let mixes = [("0,1,7", 2), ("2,3", 3), ("4,5,6,8,9", 1)];
    let t0 = Instant::now();
    let (mut runs, mut kills) = (0, 0);
    // At least one kill, however short the budget.
    while t0.elapsed() < budget || kills == 0 {
        let (classes, epochs) = mixes[runs % mixes.len()];
        let (whole, took) = timed_reference(classes, epochs);
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path(), classes, epochs);
        let mut saved: Option<usize> = None;
        loop {
            let mut child = start(&a);
            // Kill at a random time within 1.5 times an uninterrupted
            // run's (start-up included), or let the run finish.
            let span = (took.as_millis() as u64 * 3 / 2).max(1);
            let wait = Duration::from_millis(next(&mut rng) % span);
            let t = Instant::now();
            while t.elapsed() < wait && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            if child.try_wait().unwrap().is_none() {
                if next(&mut rng).is_multiple_of(2) {
                    child.kill().unwrap();
                } else {
                    signal(&child, "-TERM");
                }
                kills += 1;
            }
            let (o, err) = finish(child);
            match (saved, resumed_at(&err)) {
                (Some(s), Some((n, m))) => assert_eq!(n, s.min(m), "{err}"),
                (None, None) => {}
                // Killed after the last result was stored: nothing to search.
                (Some(_), None) if o.status.success() && report(dir.path()).reused > 0 => {}
                // Killed again before it reached the optimisation (loading the
                // model and data, choosing canvases): the checkpoint is still
                // there for the next run, which must resume from it.
                (Some(_), None) if !o.status.success() && !err.contains("warning") => {}
                (s, r) => panic!("saved at {s:?}, resumed at {r:?} ({}): {err}", o.status),
            }
            if o.status.success() {
                break;
            }
            assert!(
                o.status.code() != Some(1) || err.contains("interrupted by SIGTERM"),
                "failed: {err}"
            );
            saved = checkpoints(dir.path()).first().and_then(|p| saved_step(p));
        }
        assert_same_searches(&whole, &report(dir.path()));
        runs += 1;
        eprintln!("soak: run {runs} ({classes}) equal after {kills} kills so far");
    }
}
