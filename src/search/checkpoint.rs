//! Checkpoints of a mask optimisation in progress, so a run killed midway
//! (crash, out of memory, preemption, Ctrl-C) continues where it was.
//!
//! All searches of a run advance together, step by step; after `t` steps
//! the whole state is every search's mask, its last-epoch sums and its CE
//! curve with the open window. The random position needs nothing more:
//! the batch order of search s in epoch e is a pure function of (seed,
//! target, e) (see [`super::optimize::batch_order`]), so `t` fixes it.
//! Resuming from a checkpoint therefore gives bit for bit the outcome of an
//! uninterrupted run.
//!
//! One file per set of pending searches, `OUT/checkpoints/<hash>.ckpt`
//! (the hash is over their sorted result keys, so each shard and each
//! distinct run has its own), written atomically and checksummed: a
//! corrupt or mismatched checkpoint is ignored with a warning, never
//! trusted. A run whose pending searches are a subset of a checkpoint's
//! (killed while some results were already stored) resumes from it too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Version of the file layout; a file of another version is ignored.
pub const FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"CWPCKPT\0";

/// The in-progress state of one search.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchState {
    /// Mask `[H, W]` after the steps made so far.
    pub mask: Vec<f32>,
    /// Per-pixel sum of the masks after each update of the last epoch
    /// (empty until the last epoch starts).
    pub last_sum: Vec<f64>,
    /// Updates summed into `last_sum`.
    pub last_count: usize,
    /// Points of the CE curve logged so far: `(step, mean ce)`.
    pub curve: Vec<(usize, f32)>,
    /// The open window of the CE curve: sum of CE and steps in it.
    pub window: (f64, usize),
    /// The canvas `[C, H, W]` so far, for a search that learns it (else empty).
    pub canvas: Vec<f32>,
}

impl SearchState {
    /// A search before its first step: a uniform mask of `init`.
    pub fn new(init: f32, plane: usize) -> SearchState {
        SearchState {
            mask: vec![init; plane],
            last_sum: Vec::new(),
            last_count: 0,
            curve: Vec::new(),
            window: (0.0, 0),
            canvas: Vec::new(),
        }
    }

    /// Adds the current mask to the last-epoch sums.
    pub fn add_to_last_epoch(&mut self) {
        if self.last_sum.is_empty() {
            self.last_sum = vec![0.0; self.mask.len()];
        }
        for (s, &m) in self.last_sum.iter_mut().zip(&self.mask) {
            *s += m as f64;
        }
        self.last_count += 1;
    }

    /// The mask averaged over the last epoch (the final mask if no update
    /// was summed).
    pub fn last_epoch_mean(&self) -> Vec<f32> {
        if self.last_count == 0 {
            return self.mask.clone();
        }
        let n = self.last_count as f64;
        self.last_sum.iter().map(|&s| (s / n) as f32).collect()
    }
}

/// The state of all searches of a run after `t` steps.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// Steps made (every search has made `min(t, its total)` updates).
    pub t: usize,
    /// One per search, in job order.
    pub searches: Vec<SearchState>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    keys: Vec<String>,
    plane: usize,
    t: usize,
}

/// Where and how often the optimisation of one set of searches is saved.
pub struct Checkpoint {
    path: PathBuf,
    keys: Vec<String>,
    every: Duration,
    last_save: Instant,
}

impl Checkpoint {
    /// The checkpoint of the searches whose result keys are `keys` (in job
    /// order) under `out/checkpoints/`, saved about every `every`.
    pub fn new(out: &Path, keys: Vec<String>, every: Duration) -> Result<Checkpoint> {
        let dir = out.join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut sorted: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        sorted.sort_unstable();
        let hash = crate::io::sha256_hex(&sorted);
        Ok(Checkpoint {
            path: dir.join(format!("{}.ckpt", &hash[..16])),
            keys,
            every,
            last_save: Instant::now(),
        })
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the interval since the last save (or the start) has passed.
    pub fn due(&self) -> bool {
        self.last_save.elapsed() >= self.every
    }

    /// Saves `state` atomically.
    pub fn save(&mut self, state: &State) -> Result<()> {
        let bytes = encode(&self.keys, state)?;
        crate::io::write_atomic(&self.path, &bytes)?;
        self.last_save = Instant::now();
        Ok(())
    }

    /// The saved state, if a checkpoint of these searches with masks of
    /// `plane` pixels and at most `longest` steps is there, or else one of
    /// a set of searches that holds all of these. A file that is
    /// unreadable, corrupt or of other searches is ignored with a warning
    /// naming it. Returns the state and the file it came from.
    pub fn load(&self, plane: usize, longest: usize) -> Option<(State, PathBuf)> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                return match decode(&bytes, &self.keys, plane, longest, false) {
                    Ok((state, _)) => Some((state, self.path.clone())),
                    Err(msg) => {
                        warn_ignored(&self.path, &msg);
                        None
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn_ignored(&self.path, &e.to_string());
                return None;
            }
        }
        let dir = self.path.parent()?;
        let mut others: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
            .collect();
        others.sort();
        for other in others {
            let Ok(bytes) = std::fs::read(&other) else {
                continue;
            };
            // Checkpoints of unrelated searches are no concern of this run.
            if let Ok((state, _)) = decode(&bytes, &self.keys, plane, longest, true) {
                return Some((state, other));
            }
        }
        None
    }
}

/// Deletes every checkpoint under `out/checkpoints/` whose searches are
/// all `stored` (its run finished, perhaps after resuming from it with
/// some results already stored); others' checkpoints stay. Also deletes
/// the temporary files of saves that a kill interrupted.
pub fn remove_finished(out: &Path, stored: impl Fn(&str) -> bool) -> Result<()> {
    crate::io::remove_stale_temps(&out.join("checkpoints"));
    let Ok(entries) = std::fs::read_dir(out.join("checkpoints")) else {
        return Ok(());
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.extension().is_none_or(|e| e != "ckpt") {
            continue;
        }
        let finished = read_header(&path).is_some_and(|h| h.keys.iter().all(|k| stored(k)));
        if finished {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(&path, e))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The header of a checkpoint file (read without its body).
fn read_header(path: &Path) -> Option<Header> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 16];
    f.read_exact(&mut head).ok()?;
    if &head[..8] != MAGIC {
        return None;
    }
    let n = usize::try_from(u64::from_le_bytes(head[8..].try_into().ok()?)).ok()?;
    let mut json = vec![0u8; n.min(1 << 30)];
    f.read_exact(&mut json).ok()?;
    serde_json::from_slice(&json).ok()
}

fn warn_ignored(path: &Path, msg: &str) {
    eprintln!(
        "warning: ignoring checkpoint {}: {msg}; starting from step 0",
        path.display()
    );
}

/// Layout: magic, header length (u64) and JSON header, then per search the
/// mask (f32), the last-epoch count (u64) and sums (f64, only when the
/// count is not 0), the window (f64, u64), the curve length (u64) and its
/// points (u64 step, f32 bits), the learned canvas's length (u64) and its
/// values (f32); last the SHA-256 of everything before.
/// Numbers are little-endian.
fn encode(keys: &[String], state: &State) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(&Header {
        format: FORMAT,
        keys: keys.to_vec(),
        plane: state.searches.first().map_or(0, |s| s.mask.len()),
        t: state.t,
    })
    .map_err(|e| Error::Msg(format!("cannot serialise a checkpoint header: {e}")))?;
    let plane = state.searches.first().map_or(0, |s| s.mask.len());
    let mut out = Vec::with_capacity(64 + header.len() + state.searches.len() * plane * 12);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    let u64le = |out: &mut Vec<u8>, v: usize| out.extend_from_slice(&(v as u64).to_le_bytes());
    for s in &state.searches {
        out.extend(s.mask.iter().flat_map(|v| v.to_le_bytes()));
        u64le(&mut out, s.last_count);
        if s.last_count > 0 {
            out.extend(s.last_sum.iter().flat_map(|v| v.to_le_bytes()));
        }
        out.extend_from_slice(&s.window.0.to_le_bytes());
        u64le(&mut out, s.window.1);
        u64le(&mut out, s.curve.len());
        for &(step, ce) in &s.curve {
            u64le(&mut out, step);
            out.extend_from_slice(&ce.to_le_bytes());
        }
        u64le(&mut out, s.canvas.len());
        out.extend(s.canvas.iter().flat_map(|v| v.to_le_bytes()));
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// Reads bytes off the front of a checkpoint body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the file is truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> std::result::Result<usize, String> {
        let b = self.take(8)?;
        usize::try_from(u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .map_err(|_| "a count is out of range".to_string())
    }
    fn f64(&mut self) -> std::result::Result<f64, String> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn f32s(&mut self, n: usize) -> std::result::Result<Vec<f32>, String> {
        let b = self.take(n.checked_mul(4).ok_or("a length is out of range")?)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }
    fn f64s(&mut self, n: usize) -> std::result::Result<Vec<f64>, String> {
        let b = self.take(n.checked_mul(8).ok_or("a length is out of range")?)?;
        Ok(b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }
}

/// The state of the searches `keys` in a checkpoint file's bytes, with
/// the file's keys. Unless `subset`, the file must hold exactly these
/// searches; with it, any set that holds them all (its step is then capped
/// at `longest`: these searches are finished by then and change no more).
fn decode(
    bytes: &[u8],
    keys: &[String],
    plane: usize,
    longest: usize,
    subset: bool,
) -> std::result::Result<(State, Vec<String>), String> {
    if bytes.len() < MAGIC.len() + 8 + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a classwise checkpoint".into());
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err("its checksum does not match (a corrupt or truncated file)".into());
    }
    let mut r = Reader(&body[MAGIC.len()..]);
    let n = r.u64()?;
    let header: Header =
        serde_json::from_slice(r.take(n)?).map_err(|e| format!("its header is unreadable: {e}"))?;
    if header.format != FORMAT {
        return Err(format!(
            "format {} (this version reads {FORMAT})",
            header.format
        ));
    }
    let picks: Vec<usize> = if subset {
        keys.iter()
            .map(|k| header.keys.iter().position(|h| h == k))
            .collect::<Option<_>>()
            .ok_or("it does not hold all of these searches")?
    } else if header.keys == keys {
        (0..keys.len()).collect()
    } else {
        return Err("it belongs to other searches".into());
    };
    if header.plane != plane {
        return Err(format!(
            "its masks have {} pixels, not {plane}",
            header.plane
        ));
    }
    if header.t > longest && !subset {
        return Err(format!(
            "it is at step {}, past the run's {longest}",
            header.t
        ));
    }
    let mut all = Vec::with_capacity(header.keys.len());
    for _ in &header.keys {
        let mask = r.f32s(plane)?;
        let last_count = r.u64()?;
        let last_sum = if last_count > 0 {
            r.f64s(plane)?
        } else {
            Vec::new()
        };
        let window = (r.f64()?, r.u64()?);
        let points = r.u64()?;
        if points > longest {
            return Err("a CE curve is longer than the run".into());
        }
        let mut curve = Vec::with_capacity(points);
        for _ in 0..points {
            let step = r.u64()?;
            let ce = f32::from_le_bytes(r.take(4)?.try_into().unwrap_or_default());
            curve.push((step, ce));
        }
        let canvas_len = r.u64()?;
        if canvas_len > 64 * plane {
            return Err("a learned canvas has more than 64 channels".into());
        }
        let canvas = r.f32s(canvas_len)?;
        all.push(Some(SearchState {
            mask,
            last_sum,
            last_count,
            curve,
            window,
            canvas,
        }));
    }
    if !r.0.is_empty() {
        return Err("it has trailing bytes".into());
    }
    let searches = picks.iter().filter_map(|&i| all[i].take()).collect();
    let state = State {
        t: header.t.min(longest),
        searches,
    };
    Ok((state, header.keys))
}

/// SIGINT and SIGTERM (what Slurm sends before it kills a job) while an
/// optimisation is armed: the first one only raises a flag, checked after
/// each step, so the state can be saved; a second one, or one while nothing
/// is armed, has its default effect (the process ends).
struct Signals {
    /// No optimisation armed: a signal has its default effect.
    idle: Arc<AtomicBool>,
    /// A signal arrived while armed: another one has its default effect.
    got: Arc<AtomicBool>,
    /// Which signal arrived.
    which: Arc<AtomicUsize>,
    /// Optimisations armed (several in one process under `cargo test`).
    armed: Mutex<usize>,
}

fn signals() -> std::result::Result<&'static Signals, String> {
    static SIGNALS: OnceLock<std::result::Result<Signals, String>> = OnceLock::new();
    SIGNALS
        .get_or_init(|| {
            use signal_hook::consts::{SIGINT, SIGTERM};
            use signal_hook::flag;
            let s = Signals {
                idle: Arc::new(AtomicBool::new(true)),
                got: Arc::new(AtomicBool::new(false)),
                which: Arc::new(AtomicUsize::new(0)),
                armed: Mutex::new(0),
            };
            // Actions run in the order registered: the default effect comes
            // first when idle or already signalled.
            for sig in [SIGINT, SIGTERM] {
                flag::register_conditional_default(sig, Arc::clone(&s.idle))
                    .and_then(|_| flag::register_conditional_default(sig, Arc::clone(&s.got)))
                    .and_then(|_| flag::register_usize(sig, Arc::clone(&s.which), sig as usize))
                    .and_then(|_| flag::register(sig, Arc::clone(&s.got)))
                    .map_err(|e| format!("cannot watch for signal {sig}: {e}"))?;
            }
            Ok(s)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// While alive, SIGINT and SIGTERM are caught for the optimisation to save
/// its state and stop (see [`Interrupts::received`]).
pub struct Interrupts {
    signals: &'static Signals,
    /// A signal was reported to the caller, who stops on it.
    reported: bool,
}

impl Interrupts {
    /// Starts catching SIGINT and SIGTERM.
    pub fn arm() -> Result<Interrupts> {
        let signals = signals().map_err(Error::Msg)?;
        let mut armed = signals.armed.lock().unwrap_or_else(|e| e.into_inner());
        if *armed == 0 {
            signals.which.store(0, Ordering::SeqCst);
            signals.got.store(false, Ordering::SeqCst);
            signals.idle.store(false, Ordering::SeqCst);
        }
        *armed += 1;
        Ok(Interrupts {
            signals,
            reported: false,
        })
    }

    /// The name of the signal caught, if one arrived: the caller saves
    /// and stops.
    pub fn received(&mut self) -> Option<&'static str> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        if !self.signals.got.load(Ordering::SeqCst) {
            return None;
        }
        self.reported = true;
        Some(match self.signals.which.load(Ordering::SeqCst) as i32 {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            _ => "a signal",
        })
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        let mut armed = self.signals.armed.lock().unwrap_or_else(|e| e.into_inner());
        *armed -= 1;
        if *armed == 0 {
            self.signals.idle.store(true, Ordering::SeqCst);
            // A signal that arrived after the last check still ends the process.
            if self.signals.got.load(Ordering::SeqCst) && !self.reported {
                let sig = self.signals.which.load(Ordering::SeqCst) as i32;
                let _ = signal_hook::low_level::emulate_default_handler(sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_file_left_by_a_killed_save_is_removed_but_a_fresh_one_of_a_live_shard_stays() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        let old = ck.join(".cwp-abc123.tmp");
        let fresh = ck.join(".cwp-def456.tmp");
        let other = ck.join("notes.txt");
        for p in [&old, &fresh, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for p in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
        }
        remove_finished(dir.path(), |_| true).unwrap();
        assert!(!old.exists(), "the stale temp file stayed");
        assert!(fresh.exists(), "a live save's temp file was deleted");
        assert!(other.exists(), "a file the tool did not write was deleted");
    }

    fn state() -> State {
        let mut a = SearchState::new(0.5, 6);
        a.mask = vec![0.0, 0.02, 0.5, 0.98, 1.0, 0.3];
        a.add_to_last_epoch();
        a.add_to_last_epoch();
        a.curve = vec![(1, 2.5), (2, f32::MIN_POSITIVE)];
        a.window = (0.125, 3);
        let mut b = SearchState::new(0.5, 6);
        // A learned canvas of 2 channels rides along.
        b.canvas = (0..12).map(|i| i as f32 / 11.0).collect();
        State {
            t: 7,
            searches: vec![a, b],
        }
    }

    fn keys() -> Vec<String> {
        vec!["aa".into(), "bb".into()]
    }

    #[test]
    fn a_saved_state_loads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::new(dir.path(), keys(), Duration::from_secs(1)).unwrap();
        assert_eq!(c.load(6, 10), None, "no file yet");
        c.save(&state()).unwrap();
        assert_eq!(c.load(6, 10), Some((state(), c.path().to_path_buf())));
        remove_finished(dir.path(), |_| true).unwrap();
        assert!(!c.path().exists());
    }

    #[test]
    fn the_file_is_named_by_the_set_of_searches() {
        let dir = tempfile::tempdir().unwrap();
        let every = Duration::from_secs(1);
        let a = Checkpoint::new(dir.path(), keys(), every).unwrap();
        let b = Checkpoint::new(dir.path(), vec!["bb".into(), "aa".into()], every).unwrap();
        let c = Checkpoint::new(dir.path(), vec!["aa".into()], every).unwrap();
        assert_eq!(a.path(), b.path());
        assert_ne!(a.path(), c.path());
    }

    #[test]
    fn a_corrupt_or_mismatched_checkpoint_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::new(dir.path(), keys(), Duration::from_secs(1)).unwrap();
        c.save(&state()).unwrap();
        // Another plane size or a run shorter than the saved step.
        assert_eq!(c.load(7, 10), None);
        assert_eq!(c.load(6, 6), None);
        // Each byte flipped in turn is caught.
        let good = std::fs::read(c.path()).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad, &keys(), 6, 10, false).is_err(), "byte {i}");
            assert!(decode(&bad, &keys(), 6, 10, true).is_err(), "byte {i}");
        }
        assert!(decode(&good[..good.len() - 1], &keys(), 6, 10, false).is_err());
        // The same keys in another order are other jobs.
        let swapped = vec!["bb".to_string(), "aa".to_string()];
        assert!(decode(&good, &swapped, 6, 10, false)
            .unwrap_err()
            .contains("other searches"));
    }

    #[test]
    fn a_run_of_some_of_a_checkpoints_searches_resumes_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let every = Duration::from_secs(1);
        let mut whole = Checkpoint::new(dir.path(), keys(), every).unwrap();
        whole.save(&state()).unwrap();
        // Search "aa" was stored; "bb" is left, and it finishes by step 5.
        let part = Checkpoint::new(dir.path(), vec!["bb".into()], every).unwrap();
        let (st, from) = part.load(6, 5).unwrap();
        assert_eq!(from, whole.path());
        assert_eq!(st.t, 5);
        assert_eq!(st.searches, vec![state().searches[1].clone()]);
        // A search the checkpoint does not hold: nothing to resume.
        let other = Checkpoint::new(dir.path(), vec!["cc".into()], every).unwrap();
        assert_eq!(other.load(6, 10), None);
        // The old checkpoint goes only once all its searches are stored.
        remove_finished(dir.path(), |k| k == "bb").unwrap();
        assert!(whole.path().exists());
        remove_finished(dir.path(), |k| k == "bb" || k == "aa").unwrap();
        assert!(!whole.path().exists());
    }
}
