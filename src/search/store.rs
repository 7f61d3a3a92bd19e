//! Per-search result files, for resumable runs: each (class, canvas) result
//! is a JSON file under `DIR/searches/` whose name carries a key hashed from
//! everything that decides it (weights, data, options, class, canvas), so a
//! rerun with the same arguments reuses it and a changed argument does not.
//!
//! A stored file is trusted only when it proves itself: it carries a SHA-256
//! over its key and its result, and the result must be consistent (mask and
//! canvas sizes, positions in range, shares in [0, 1]). A file that fails is
//! never used: a run warns, naming the file, and searches again; `cwp merge`,
//! which cannot search, stops with an error naming it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Canvas, SearchConfig, SearchResult};
use crate::error::{Error, Result};

/// The results folder of a run.
pub struct Store {
    dir: PathBuf,
    input: Option<[usize; 3]>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    /// [`checksum`] of the key and the result; absent in files of older
    /// versions, which are therefore searched again.
    #[serde(default)]
    checksum: Option<String>,
    result: SearchResult,
}

/// SHA-256 over a key and the JSON of a result. The result is hashed as
/// serialised from its parsed form, which is canonical (field order and
/// shortest round-trip numbers), so the sum checks values, not spelling.
fn checksum(key: &str, result: &SearchResult) -> Result<String> {
    let body = serde_json::to_vec(result)
        .map_err(|e| Error::Msg(format!("cannot serialise a search result: {e}")))?;
    Ok(crate::io::sha256_hex(&[key.as_bytes(), &body]))
}

/// What a look-up in the store found.
#[derive(Debug)]
pub enum Lookup {
    /// No file for the key.
    Missing,
    /// A result that passed every check.
    Found(Box<SearchResult>),
    /// A file that is there but must not be used: the path and why.
    Bad(PathBuf, String),
}

/// Why a result cannot be what a search produced, if it cannot: checks on
/// its own numbers, and on the model input when known.
fn inconsistency(r: &SearchResult, input: Option<[usize; 3]>) -> Option<String> {
    let plane = r.mask.len();
    if let Some([c, h, w]) = input {
        if plane != h * w {
            return Some(format!(
                "its mask has {plane} values, the model's input {h}x{w} needs {}",
                h * w
            ));
        }
        if r.canvas.pixels.len() != c * h * w {
            return Some(format!(
                "its canvas has {} pixels, the model's input {c}x{h}x{w} needs {}",
                r.canvas.pixels.len(),
                c * h * w
            ));
        }
    }
    if plane == 0 || r.canvas.pixels.is_empty() || !r.canvas.pixels.len().is_multiple_of(plane) {
        return Some(format!(
            "its mask ({plane} values) does not fit its canvas ({} pixels)",
            r.canvas.pixels.len()
        ));
    }
    if r.mask.iter().any(|v| !(0.0..=1.0).contains(v)) {
        return Some("its mask has values outside [0, 1]".into());
    }
    let mean = r.mask.iter().map(|&v| v as f64).sum::<f64>() / plane as f64;
    if (mean - r.mask_mean).abs() > 1e-6 {
        return Some(format!(
            "its mask mean {} is not the mean of its mask ({mean})",
            r.mask_mean
        ));
    }
    if r.positions.is_empty() || r.positions.iter().any(|&p| p >= plane) {
        return Some(format!("its pattern positions are not in 0..{plane}"));
    }
    let mut seen = vec![false; plane];
    if r.positions
        .iter()
        .any(|&p| std::mem::replace(&mut seen[p], true))
    {
        return Some("its pattern repeats a position".into());
    }
    if r.power.k != r.positions.len() {
        return Some(format!(
            "its power is for k = {}, its pattern has {} positions",
            r.power.k,
            r.positions.len()
        ));
    }
    let share = |v: f64| (0.0..=1.0).contains(&v);
    let shares_ok = share(r.power.overall)
        && share(r.power.clean)
        && r.select_power.is_none_or(share)
        && r.soft_power.is_none_or(share)
        && r.power
            .per_source
            .iter()
            .all(|s| share(s.stamped) && share(s.clean))
        && r.sweep.iter().all(|&(k, v)| k <= plane && share(v));
    if !shares_ok {
        return Some("a predictive power outside [0, 1] or a k beyond the image".into());
    }
    if r.min_k.is_some_and(|k| k == 0 || k > plane) {
        return Some("its minimal k is not in 1..=pixels".into());
    }
    if r.examples
        .iter()
        .any(|e| !e.pixels.is_empty() && e.pixels.len() != r.canvas.pixels.len())
    {
        return Some("an example image does not have the canvas's size".into());
    }
    None
}

/// The key of one search: a hash of every input that changes its result,
/// the backend's numerics included (a CPU and a GPU mask may differ, and a
/// report must never mix them silently).
pub fn unit_key(
    model_id: &str,
    data: &str,
    numerics: &str,
    cfg: &SearchConfig,
    target: usize,
    canvas: &Canvas,
) -> String {
    let settings = serde_json::json!({
        "format": 4,
        "numerics": numerics,
        "protocol": cfg.protocol,
        "mask": cfg.mask,
        "top_k": cfg.top_k,
        "k_sweep": cfg.k_sweep,
        "threshold": cfg.threshold,
        "search_frac": cfg.search_frac,
        "sweep_per_class": cfg.sweep_per_class,
        "eval_per_class": cfg.eval_per_class,
        "examples": cfg.examples,
        "target": target,
        "canvas_id": canvas.id,
        "canvas_index": canvas.dataset_index,
    })
    .to_string();
    let pixels: &[u8] = bytemuck::cast_slice(&canvas.pixels);
    crate::io::sha256_hex(&[
        model_id.as_bytes(),
        data.as_bytes(),
        settings.as_bytes(),
        pixels,
    ])
}

impl Store {
    /// Opens (creating) `out/searches/`.
    pub fn open(out: &Path) -> Result<Store> {
        let dir = out.join("searches");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Store { dir, input: None })
    }

    /// The results under `out/searches/`, for reading only (nothing is created).
    pub fn at(out: &Path) -> Store {
        Store {
            dir: out.join("searches"),
            input: None,
        }
    }

    /// Also checks that every result fits a model input `[C, H, W]` (mask
    /// and canvas sizes) before it is used.
    pub fn expecting(mut self, input: [usize; 3]) -> Store {
        self.input = Some(input);
        self
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.json", &key[..16.min(key.len())]))
    }

    /// The stored result for `key`, if a sound one is there. A file that
    /// is there but fails a check (see [`Store::lookup`]) is not used: a
    /// warning naming it goes to stderr, and the search is to be run again
    /// (its new result replaces the file).
    pub fn load(&self, key: &str) -> Option<SearchResult> {
        match self.lookup(key) {
            Lookup::Found(r) => Some(*r),
            Lookup::Missing => None,
            Lookup::Bad(path, why) => {
                eprintln!(
                    "warning: {}: {why}; not using it, searching again",
                    path.display()
                );
                None
            }
        }
    }

    /// Looks `key` up: missing, a result that passed every check (it parses,
    /// its checksum matches its key and result, its key is `key`, and it is
    /// consistent), or a bad file and why.
    pub fn lookup(&self, key: &str) -> Lookup {
        let path = self.path(key);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Missing,
            Err(e) => return Lookup::Bad(path, format!("cannot be read ({e})")),
        };
        let bad = |why: String| Lookup::Bad(path.clone(), why);
        let stored: Stored = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => return bad(format!("not a stored search result ({e})")),
        };
        if stored.key != key {
            return bad("holds the result of a different search (its key differs)".into());
        }
        let Some(sum) = &stored.checksum else {
            return bad("has no checksum (written by an older version)".into());
        };
        match checksum(key, &stored.result) {
            Ok(s) if &s == sum => {}
            _ => return bad("its checksum does not match its contents (edited or damaged)".into()),
        }
        match inconsistency(&stored.result, self.input) {
            Some(why) => bad(why),
            None => Lookup::Found(Box::new(stored.result)),
        }
    }

    /// Writes a result atomically, with its checksum.
    pub fn save(&self, key: &str, result: &SearchResult) -> Result<()> {
        let stored = Stored {
            key: key.to_string(),
            checksum: Some(checksum(key, result)?),
            result: result.clone(),
        };
        let text = serde_json::to_vec(&stored)
            .map_err(|e| Error::Msg(format!("cannot serialise a search result: {e}")))?;
        crate::io::write_atomic(&self.path(key), &text)
    }
}
