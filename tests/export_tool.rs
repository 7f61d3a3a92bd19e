//! `tools/export_safetensors.py` never runs code from a checkpoint unless
//! told to: a pickle that carries code is refused by default, before torch
//! is even imported (so this holds, and is tested, without torch), and
//! `--trust-pickle` is the only way past the check.

use std::path::Path;
use std::process::{Command, Output};

fn python_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn script() -> String {
    format!("{}/tools/export_safetensors.py", env!("CARGO_MANIFEST_DIR"))
}

/// Writes, with Python's own pickle, a checkpoint whose unpickling would
/// create `marker`: a plain pickle and torch's zip layout (`archive/data.pkl`).
fn write_malicious_checkpoints(dir: &Path, marker: &Path) {
    let code = format!(
        r#"
import collections, os, pickle, zipfile
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
state = collections.OrderedDict(weight=Payload())
with open("{dir}/plain.pth", "wb") as f:
    pickle.dump({{"state_dict": state}}, f)
with zipfile.ZipFile("{dir}/zipped.pth", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(state, protocol=2))
    z.writestr("archive/version", "3\n")
with open("{dir}/benign.pth", "wb") as f:
    pickle.dump(collections.OrderedDict(weight=[1.0, 2.0]), f)
"#,
        marker = marker.display(),
        dir = dir.display()
    );
    let o = Command::new("python3")
        .arg("-c")
        .arg(code)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn export(dir: &Path, name: &str, extra: &[&str]) -> Output {
    Command::new("python3")
        .arg(script())
        .arg(dir.join(name))
        .arg(dir.join("out.safetensors"))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_checkpoint_that_carries_code_is_refused_by_default_and_never_run() {
    if !python_available() {
        // The tool itself cannot run here, so it cannot run a payload either.
        eprintln!("skipped: python3 not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("code-ran");
    write_malicious_checkpoints(dir.path(), &marker);
    for name in ["plain.pth", "zipped.pth"] {
        let o = export(dir.path(), name, &[]);
        let msg = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name} was accepted: {msg}");
        assert!(
            msg.contains("refusing") && msg.contains("system") && msg.contains("--trust-pickle"),
            "{name}: {msg}"
        );
        assert!(msg.contains(name), "{name} not named: {msg}");
        assert!(!marker.exists(), "{name}: the pickle's code ran");
        assert!(!dir.path().join("out.safetensors").exists());
    }
}

#[test]
fn the_check_refuses_only_what_a_state_dict_does_not_need() {
    if !python_available() {
        eprintln!("skipped: python3 not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("code-ran");
    write_malicious_checkpoints(dir.path(), &marker);
    // A pickle of plain values passes the check (and then needs torch, or
    // fails for want of tensors): it is not refused as unsafe.
    let o = export(dir.path(), "benign.pth", &[]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(!msg.contains("refusing"), "{msg}");
}

#[test]
fn trust_pickle_is_a_documented_flag_that_warns() {
    if !python_available() {
        eprintln!("skipped: python3 not installed");
        return;
    }
    let o = Command::new("python3")
        .arg(script())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && help.contains("--trust-pickle"),
        "{help}"
    );
    // With the flag the check is skipped and a loud warning comes first
    // (on a harmless file: past the warning, torch runs whatever the file holds).
    let dir = tempfile::tempdir().unwrap();
    write_malicious_checkpoints(dir.path(), &dir.path().join("code-ran"));
    let o = export(dir.path(), "benign.pth", &["--trust-pickle"]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        msg.contains("WARNING") && msg.contains("--trust-pickle") && msg.contains("benign.pth"),
        "{msg}"
    );
}
