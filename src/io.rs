//! Atomic file output: every file the tool writes goes to a temporary file in
//! the same folder first and is renamed into place, so a crash or an error
//! never leaves a half-written result behind.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically (temp file in the same folder + rename).
/// The parent folder must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".cwp-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    // Temp files are private (0600); results are ordinary files others may read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A temporary file of [`write_atomic`] older than this was left by a
/// process killed while writing: no write takes nearly so long, so one that
/// another process (a shard, say) is still writing is never removed.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Removes the `.cwp-*.tmp` files of [`write_atomic`] in `dir` untouched
/// for 15 minutes: what a kill during a save leaves behind. Nothing else is
/// touched, and a folder that cannot be read is left as it is.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let stale = name.starts_with(".cwp-")
            && name.ends_with(".tmp")
            && std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP);
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Fails unless a file could be created at `path` (its folder exists and is
/// writable), so long jobs can refuse bad output paths before they start.
pub fn check_writable(path: &Path, option: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(Error::arg(
            option,
            format!("{} is a folder, not a file", path.display()),
        ));
    }
    tempfile::Builder::new()
        .prefix(".cwp-probe-")
        .tempfile_in(dir)
        .map(|_| ())
        .map_err(|e| Error::arg(option, format!("cannot write to {}: {e}", path.display())))
}

/// True when `a` and `b` name the same existing file, also through symbolic
/// or hard links, so a command can refuse to write its output over an input.
/// A path that does not exist yet is no existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
    }
}

/// Hex SHA-256 of the concatenation of `parts` (fingerprints of runs and caches).
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `arg` quoted for a POSIX shell: unchanged when it holds only characters no
/// shell treats specially, otherwise in single quotes (a single quote inside
/// becomes `'\''`). Stored command lines can so be pasted into a shell.
pub fn shell_quote(arg: &str) -> String {
    // `=` and `~` start expansions in some shells when they lead a word.
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:,+=@%".contains(c);
    if !arg.is_empty() && !arg.starts_with('=') && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Words joined into one shell command line (see [`shell_quote`]).
pub fn shell_join<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    words
        .into_iter()
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a POSIX shell makes of `line`: its words, one per NUL.
    fn shell_words(line: &str) -> Vec<String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {line}"))
            .output()
            .expect("sh runs");
        assert!(out.status.success(), "sh -c failed on: {line}");
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_terminator('\0').map(str::to_string).collect()
    }

    #[test]
    fn a_quoted_command_line_gives_the_shell_back_every_argument() {
        let args = [
            "--out",
            "my results",
            "it's",
            "",
            "$HOME",
            "`date`",
            "a\"b\\c",
            "*.png",
            "~",
            "=x",
            "x;rm -rf y",
            "tab\there",
            "new\nline",
            "ünïcode",
            "--canvas=auto:1+solid:1",
            "3x32x32",
        ];
        let line = shell_join(args);
        assert_eq!(shell_words(&line), args, "{line}");
        // Arguments without special characters stay readable, unquoted.
        assert_eq!(
            shell_join([
                "cwp",
                "search",
                "--out",
                "runs/a-1",
                "--canvas=auto:1+solid:1"
            ]),
            "cwp search --out runs/a-1 --canvas=auto:1+solid:1"
        );
    }

    #[test]
    fn same_file_sees_through_other_spellings_and_links() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("in.safetensors");
        std::fs::write(&f, b"x").unwrap();
        let other = t.path().join("other.safetensors");
        std::fs::write(&other, b"x").unwrap();
        assert!(same_file(&f, &f));
        assert!(same_file(&f, &t.path().join(".").join("in.safetensors")));
        assert!(
            !same_file(&f, &other),
            "equal contents are not the same file"
        );
        assert!(!same_file(&f, &t.path().join("missing")));
        let hard = t.path().join("hard");
        std::fs::hard_link(&f, &hard).unwrap();
        assert!(same_file(&f, &hard));
        #[cfg(unix)]
        {
            let soft = t.path().join("soft");
            std::os::unix::fs::symlink(&f, &soft).unwrap();
            assert!(same_file(&soft, &f));
        }
    }
}
