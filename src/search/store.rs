//! Per-search result files, for resumable runs: each (class, canvas) result
//! is a JSON file under `DIR/searches/` whose name carries a key hashed from
//! everything that decides it (weights, data, options, class, canvas), so a
//! rerun with the same arguments reuses it and a changed argument does not.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Canvas, SearchConfig, SearchResult};
use crate::error::{Error, Result};

/// The results folder of a run.
pub struct Store {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    result: SearchResult,
}

/// The key of one search: a hash of every input that changes its result.
pub fn unit_key(
    model_id: &str,
    data: &str,
    cfg: &SearchConfig,
    target: usize,
    canvas: &Canvas,
) -> String {
    let settings = serde_json::json!({
        "format": 3,
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
        Ok(Store { dir })
    }

    /// The results under `out/searches/`, for reading only (nothing is created).
    pub fn at(out: &Path) -> Store {
        Store {
            dir: out.join("searches"),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.json", &key[..16.min(key.len())]))
    }

    /// The stored result for `key`, if a complete one is there.
    pub fn load(&self, key: &str) -> Option<SearchResult> {
        let text = std::fs::read_to_string(self.path(key)).ok()?;
        let stored: Stored = serde_json::from_str(&text).ok()?;
        (stored.key == key).then_some(stored.result)
    }

    /// Writes a result atomically.
    pub fn save(&self, key: &str, result: &SearchResult) -> Result<()> {
        let stored = Stored {
            key: key.to_string(),
            result: result.clone(),
        };
        let text = serde_json::to_vec(&stored)
            .map_err(|e| Error::Msg(format!("cannot serialise a search result: {e}")))?;
        crate::io::write_atomic(&self.path(key), &text)
    }
}
