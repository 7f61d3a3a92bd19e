//! Splitting one run over several processes (a Slurm job array, several
//! GPUs) and gathering it again. The run's (class, canvas) units are dealt
//! out round-robin: unit `j` belongs to shard `j % N`, so every shard gets
//! a similar mix of classes. Each shard stores its results as a plain run
//! does and leaves a manifest, `DIR/shards/I-of-N.json`, with the run's
//! header; [`merge`] reads manifests and results from one or more folders
//! (a shared one, or one per shard) and makes the report, without the model
//! or the data.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::store::{Lookup, Store};
use super::{summarise, RunHeader, RunReport, RunStats, SearchConfig, SearchResult};
use crate::error::{Error, Result};

/// Manifest format; a different one is refused rather than misread.
pub const FORMAT: u32 = 1;

/// Shard `index` of `count` (`--shard I/N`, `0 <= I < N`, so that
/// `--shard $SLURM_ARRAY_TASK_ID/N` with `--array=0-(N-1)` covers a run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, from 0.
    pub index: usize,
    /// How many shards the run is split into.
    pub count: usize,
}

impl Shard {
    /// Whether unit `j` of the run is this shard's.
    pub fn owns(&self, j: usize) -> bool {
        j % self.count == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Shard> {
        let bad = |why: &str| Error::arg("--shard", format!("`{s}`: {why}"));
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| bad("expected I/N, e.g. 0/4"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| bad("expected I/N with whole numbers, e.g. 0/4"))
        };
        let (index, count) = (parse(i)?, parse(n)?);
        if count == 0 {
            return Err(bad("N must be at least 1"));
        }
        if index >= count {
            return Err(bad("I counts from 0 and must be less than N"));
        }
        Ok(Shard { index, count })
    }
}

/// What one shard leaves behind besides its results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Which shard.
    pub shard: Shard,
    /// The run, identical in every shard of it (but for the command line
    /// and the device).
    pub header: RunHeader,
    /// This shard's own work.
    pub stats: RunStats,
}

impl Manifest {
    fn path(dir: &Path, shard: Shard) -> PathBuf {
        dir.join("shards")
            .join(format!("{}-of-{}.json", shard.index, shard.count))
    }

    /// SHA-256 of the manifest's canonical JSON (as serialised from its
    /// parsed form), so that an edited or damaged manifest is found out.
    fn checksum(&self) -> Result<String> {
        let body = serde_json::to_vec(self)
            .map_err(|e| Error::Msg(format!("cannot serialise a shard manifest: {e}")))?;
        Ok(crate::io::sha256_hex(&[&body]))
    }

    /// Writes the manifest atomically under `dir/shards/`, with a
    /// `checksum` field over the rest.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Manifest::path(dir, self.shard);
        let parent = dir.join("shards");
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let mut value = serde_json::to_value(self)
            .map_err(|e| Error::Msg(format!("cannot serialise a shard manifest: {e}")))?;
        if let Some(fields) = value.as_object_mut() {
            fields.insert("checksum".into(), self.checksum()?.into());
        }
        let text = serde_json::to_vec_pretty(&value)
            .map_err(|e| Error::Msg(format!("cannot serialise a shard manifest: {e}")))?;
        crate::io::write_atomic(&path, &text)
    }

    /// Every manifest under `dir/shards/`.
    pub fn load_all(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>> {
        let folder = dir.join("shards");
        let entries = match std::fs::read_dir(&folder) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&folder, e)),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut out = Vec::new();
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                Error::Msg(format!(
                    "{}: not a shard manifest of this tool ({e})",
                    path.display()
                ))
            })?;
            if m.format != FORMAT {
                return Err(Error::Msg(format!(
                    "{}: manifest format {} (this tool reads {FORMAT})",
                    path.display(),
                    m.format
                )));
            }
            #[derive(Deserialize)]
            struct Sum {
                checksum: Option<String>,
            }
            let sum = serde_json::from_slice::<Sum>(&bytes)
                .ok()
                .and_then(|s| s.checksum);
            let why = match sum {
                None => Some("has no checksum (written by an older version)"),
                Some(s) if s != m.checksum()? => {
                    Some("its checksum does not match its contents (edited or damaged)")
                }
                Some(_) => None,
            };
            if let Some(why) = why {
                return Err(Error::Msg(format!(
                    "{}: {why}; rerun shard {} with the same options to write it again",
                    path.display(),
                    m.shard
                )));
            }
            out.push((path, m));
        }
        Ok(out)
    }
}

/// Whether two headers describe the same run: same model, data, options
/// and units. The command line, the device and the memory budget (which
/// changes how searches share a pass, never a result) may differ between
/// shards.
fn same_run(a: &RunHeader, b: &RunHeader) -> bool {
    let options = |h: &RunHeader| SearchConfig {
        max_images: 0,
        ..h.config.clone()
    };
    a.model_id == b.model_id
        && a.data == b.data
        && options(a) == options(b)
        && a.units == b.units
        && a.input == b.input
}

/// Gathers a sharded run from `dirs` (the shards' `--out` folders, or one
/// shared folder): checks that their manifests describe one run, finds
/// every unit's result, and makes the report. A unit with no result is an
/// error naming the shards still to run. Returns the report and the data's
/// class names (for rendering it).
pub fn merge(dirs: &[PathBuf]) -> Result<(RunReport, Vec<String>)> {
    if dirs.is_empty() {
        return Err(Error::arg("DIR", "name at least one folder to merge"));
    }
    let mut manifests: Vec<(PathBuf, Manifest)> = Vec::new();
    for dir in dirs {
        if !dir.is_dir() {
            return Err(Error::Msg(format!("{}: no such folder", dir.display())));
        }
        manifests.extend(Manifest::load_all(dir)?);
    }
    let Some((first_path, first)) = manifests.first().cloned() else {
        return Err(Error::Msg(format!(
            "no shard manifests under {}: run `cwp search ... --shard I/N --out DIR` first",
            dirs.iter()
                .map(|d| d.join("shards").display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    // One manifest per shard; the same shard found twice (a folder named
    // twice, or a rerun) must agree.
    let mut by_shard: BTreeMap<usize, &Manifest> = BTreeMap::new();
    for (path, m) in &manifests {
        if m.header.numerics != first.header.numerics {
            return Err(Error::Msg(format!(
                "{} ran on `{}` but {} on `{}`: their masks may differ, so one report must not \
                 mix them; rerun the shards on one kind of device",
                first_path.display(),
                first.header.numerics,
                path.display(),
                m.header.numerics
            )));
        }
        if m.shard.count != first.shard.count || !same_run(&m.header, &first.header) {
            return Err(Error::Msg(format!(
                "{} and {} are shards of different runs (model, data, options or shard count \
                 differ); merge each run's folders on their own, or delete the stale manifest",
                first_path.display(),
                path.display()
            )));
        }
        by_shard.insert(m.shard.index, m);
    }
    let count = first.shard.count;
    let stores: Vec<Store> = dirs
        .iter()
        .map(|d| Store::at(d).expecting(first.header.input))
        .collect();
    let mut searches: Vec<SearchResult> = Vec::new();
    let mut missing: BTreeMap<usize, usize> = BTreeMap::new();
    for (j, unit) in first.header.units.iter().enumerate() {
        // A sound copy in any folder will do; with none, a bad copy is an
        // error naming it (merge cannot search again, the shard can).
        let mut bad = None;
        let mut found = None;
        for store in &stores {
            match store.lookup(&unit.key) {
                Lookup::Found(r) => {
                    found = Some(*r);
                    break;
                }
                Lookup::Bad(path, why) => bad = bad.or(Some((path, why))),
                Lookup::Missing => {}
            }
        }
        match (found, bad) {
            (Some(r), _) => searches.push(r),
            (None, Some((path, why))) => {
                return Err(Error::Msg(format!(
                    "{}: {why}. This result of shard {}/{count} (class {}, canvas {}) cannot be \
                     used; rerun that shard with the same options to search it again, then merge",
                    path.display(),
                    j % count,
                    unit.class,
                    unit.canvas
                )))
            }
            (None, None) => *missing.entry(j % count).or_default() += 1,
        }
    }
    if !missing.is_empty() {
        let list = missing
            .iter()
            .map(|(s, n)| {
                let state = if by_shard.contains_key(s) {
                    "results not found"
                } else {
                    "not run"
                };
                format!("shard {s}/{count}: {n} search(es), {state}")
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::Msg(format!(
            "the run is incomplete ({} of {} searches missing): {list}. Run the missing shards \
             with the same options, or name every shard's --out folder",
            missing.values().sum::<usize>(),
            first.header.units.len()
        )));
    }
    // Throughput over the shards that ran; the longest shard is the wall time.
    let mut stats = RunStats::default();
    for m in by_shard.values() {
        stats.searched += m.stats.searched;
        stats.reused += m.stats.reused;
        stats.search_seconds += m.stats.search_seconds;
        stats.steps += m.stats.steps;
        stats.total_seconds = stats.total_seconds.max(m.stats.total_seconds);
    }
    let mut header = first.header.clone();
    header.command = format!(
        "{} (shard {} of {count}; merged from {} manifest(s))",
        header.command,
        first.shard,
        by_shard.len()
    );
    let class_names = header.class_names.clone();
    Ok((summarise(header, searches, stats)?, class_names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_from_i_over_n_and_refuse_the_rest() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        for bad in ["4/4", "0/0", "1", "a/2", "1/-2", ""] {
            let e = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(e.contains("shard"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_unit_belongs_to_exactly_one_shard() {
        let shards: Vec<Shard> = (0..3).map(|index| Shard { index, count: 3 }).collect();
        for j in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.owns(j)).count(), 1, "unit {j}");
        }
    }
}
