//! `cwp scan`: one detection run over many models, as an auditor of a model
//! hub or a competition round needs it. Every model is searched (and/or put
//! through Neural Cleanse) on one backend, its full report kept under
//! `OUT/models/<slug>/<method>/`, and one table (`scan.json`, `scan.html`)
//! made of all of them. A model that fails is a row with its error: one bad
//! checkpoint never costs the others' results. A finished (model, method)
//! leaves `row.json`, so a rerun (or another shard) skips it, and a killed
//! search resumes from its own checkpoints.

pub mod labels;
pub mod metrics;
pub mod page;
pub mod reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::{self, DataSpec, Dataset, Split};
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::search::checkpoint::Interrupts;
use crate::search::shard::Shard;
use crate::search::{self, RunInputs, SearchConfig};
use crate::weights::{LoadOptions, Model};
pub use labels::{Label, Labels};
pub use metrics::Detection;

/// A detection method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The class-wise pattern search and its verdict.
    Cwp,
    /// Neural Cleanse (Wang et al., S&P 2019) on the same engine.
    Nc,
}

impl Method {
    /// The method's name in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Cwp => "cwp",
            Method::Nc => "nc",
        }
    }

    /// Parses `--method`: `cwp`, `nc` or `both`.
    pub fn parse_list(s: &str) -> Result<Vec<Method>> {
        match s.trim() {
            "cwp" => Ok(vec![Method::Cwp]),
            "nc" => Ok(vec![Method::Nc]),
            "both" => Ok(vec![Method::Cwp, Method::Nc]),
            other => Err(Error::arg(
                "--method",
                format!("`{other}`: expected cwp, nc or both"),
            )),
        }
    }
}

/// The canvases `cwp scan` searches from unless told otherwise: the
/// search's default (the surest test image and a white one) plus a learned
/// canvas. On the detection benchmark the learned canvas's verdict finds
/// the most backdoors (random-colour patches no image or white canvas
/// holds among them) and, against clean references, flags no clean model.
pub const DEFAULT_CANVAS: &str = "auto:1+solid:1+learn:0.5";

/// How each model is scanned.
#[derive(Clone, Debug)]
pub struct ScanOptions {
    /// The methods, in the order they run on each model.
    pub methods: Vec<Method>,
    /// Architecture for weights files whose metadata does not name one.
    pub arch: Option<String>,
    /// Data for every model (else each model's training metadata names it).
    pub data: Option<String>,
    /// Search epochs (None: the search's default for the input size).
    pub epochs: Option<usize>,
    /// Search canvases (None: the search's default).
    pub canvas: Option<String>,
    /// The search's k-sweep (`default`, `none` or a list; None: default).
    pub k_sweep: Option<String>,
    /// Report images per class for the search's power (None: the default, all).
    pub eval_per_class: Option<usize>,
    /// Memory budget of one search (or Neural Cleanse) step, bytes.
    pub memory: usize,
    /// Neural Cleanse's steps per class (None: its default).
    pub nc_steps: Option<usize>,
    /// This process's share of the models.
    pub shard: Option<Shard>,
    /// Known-clean models of the same task (paths as given): scanned like
    /// the others, and each model is also judged against them.
    pub references: Vec<String>,
    /// The command line, for the reports.
    pub command: String,
    /// No per-model progress bars (the one line per model stays).
    pub quiet: bool,
}

impl ScanOptions {
    /// What decides a method's result besides the model: a finished row
    /// made under other settings is redone, never mixed in.
    fn settings(&self, method: Method) -> String {
        match method {
            Method::Cwp => format!(
                "cwp epochs={:?} canvas={:?} k_sweep={:?} eval_per_class={:?} data={:?} arch={:?}",
                self.epochs, self.canvas, self.k_sweep, self.eval_per_class, self.data, self.arch
            ),
            Method::Nc => format!(
                "nc steps={:?} data={:?} arch={:?}",
                self.nc_steps, self.data, self.arch
            ),
        }
    }
}

/// One (model, method) line of the table: `scan.json` is a list of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The model's path as given.
    pub model: String,
    /// `cwp` or `nc`.
    pub method: Method,
    /// Flagged classes, most anomalous first.
    pub flagged: Vec<usize>,
    /// The classes analysed.
    pub classes: Vec<usize>,
    /// The anomaly index of each class in `classes` (positive below the median).
    pub anomaly_index: Vec<f64>,
    /// The model's score: its largest anomaly index (what the ROC ranks).
    pub score: Option<f64>,
    /// Seconds the method took on the model (this run's, or the run that made it).
    pub seconds: f64,
    /// Clean test accuracy of the model on the data.
    pub clean_accuracy: Option<f64>,
    /// The model's full report, relative to the scan's folder.
    pub report: Option<String>,
    /// The size statistic per class (`classes` order) the anomaly index
    /// comes from, on a log scale: ln(mask mean) of the compared pattern
    /// (cwp) or ln(mask L1 norm) (nc). The reference verdict compares it
    /// with other models'. Empty in rows of older versions until the scan
    /// reads it back from the method's report.
    #[serde(default)]
    pub values: Vec<f64>,
    /// Classes whose pattern counts as evidence, the only ones a verdict
    /// flags: the compared pattern or its optimised mask reaches the
    /// threshold power (cwp, [`crate::search::SearchResult::proven`]), or the
    /// reversed trigger its attack success target (nc).
    #[serde(default)]
    pub proven: Vec<usize>,
    /// The verdict against the scan's reference models (`--reference`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub referenced: Option<Referenced>,
    /// Whether the model is one of the scan's references.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub reference: bool,
    /// For `cwp`: the verdict of each canvas kind every class was searched
    /// from (`natural` alone is the paper's method), beside the run's own.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub by_canvas: Vec<KindRow>,
    /// Ground truth from `--labels`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub label: Option<Label>,
    /// Why the model could not be scanned (then the figures are empty).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The model's identity (hash of its weights) and the settings: a row
    /// is reused only for the same model under the same settings.
    #[serde(default)]
    pub model_id: String,
    /// See `model_id`.
    #[serde(default)]
    pub settings: String,
}

/// The verdict of one canvas kind in a `cwp` row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KindRow {
    /// `learned`, `solid` or `natural`.
    pub kind: String,
    /// Flagged classes, most anomalous first.
    pub flagged: Vec<usize>,
    /// Anomaly index per class (the row's `classes` order).
    pub anomaly_index: Vec<f64>,
    /// The largest anomaly index.
    pub score: Option<f64>,
    /// See [`Row::values`].
    #[serde(default)]
    pub values: Vec<f64>,
    /// See [`Row::proven`].
    #[serde(default)]
    pub proven: Vec<usize>,
    /// See [`Row::referenced`].
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub referenced: Option<Referenced>,
}

/// A verdict against reference models (see
/// [`crate::search::verdict::against_reference`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Referenced {
    /// How many reference models it was compared with.
    pub references: usize,
    /// Flagged classes, most anomalous first.
    pub flagged: Vec<usize>,
    /// Anomaly index per class (the row's `classes` order).
    pub anomaly_index: Vec<f64>,
    /// The largest anomaly index.
    pub score: Option<f64>,
}

/// One verdict of a method on one model.
#[derive(Clone, Debug, Default)]
pub struct Judgement {
    /// Flagged classes (any order).
    pub flagged: Vec<usize>,
    /// Anomaly index per class.
    pub anomaly_index: Vec<f64>,
    /// See [`Row::values`].
    pub values: Vec<f64>,
    /// See [`Row::proven`].
    pub proven: Vec<usize>,
}

/// The anomaly figures a method hands back for one model.
pub struct Outcome {
    /// Classes analysed.
    pub classes: Vec<usize>,
    /// The method's verdict.
    pub main: Judgement,
    /// Clean test accuracy.
    pub clean_accuracy: Option<f64>,
    /// Per canvas kind (cwp): its verdict.
    pub by_canvas: Vec<(String, Judgement)>,
}

/// The figures of a finished search run: its verdict, and each canvas
/// kind's that every class was searched from.
pub fn cwp_outcome(report: &search::RunReport) -> Outcome {
    let classes = &report.config.classes;
    let threshold = report.config.threshold;
    let proven = |compared: &[usize]| -> Vec<usize> {
        classes
            .iter()
            .zip(compared)
            // A report read back from disk is not trusted to index right.
            .filter(|(_, &i)| report.searches.get(i).is_some_and(|r| r.proven(threshold)))
            .map(|(&c, _)| c)
            .collect()
    };
    let by_canvas = search::shared_kinds(classes, &report.searches)
        .into_iter()
        .map(|k| {
            let v = search::kind_verdict(classes, &report.searches, Some(k), threshold);
            let j = Judgement {
                proven: proven(&v.searches),
                flagged: v.flagged,
                anomaly_index: v.verdict.anomaly_index,
                values: v.verdict.values,
            };
            (k.to_string(), j)
        })
        .collect();
    Outcome {
        classes: report.verdict_mask.classes.clone(),
        main: Judgement {
            flagged: report.flagged.clone(),
            anomaly_index: report.verdict_mask.anomaly_index.clone(),
            values: report.verdict_mask.values.clone(),
            proven: proven(&report.verdict_searches),
        },
        clean_accuracy: Some(report.clean_accuracy),
        by_canvas,
    }
}

/// What a scan reads of a Neural Cleanse report (`cleanse.json`).
#[derive(Deserialize)]
struct CleanseFile {
    classes: Vec<usize>,
    results: Vec<CleanseClass>,
    #[serde(with = "crate::search::verdict::nonfinite")]
    anomaly_index: Vec<f64>,
    flagged: Vec<usize>,
}

#[derive(Deserialize)]
struct CleanseClass {
    class: usize,
    l1: f64,
    reached: bool,
}

impl CleanseFile {
    fn outcome(self) -> Outcome {
        Outcome {
            main: Judgement {
                flagged: self.flagged,
                anomaly_index: self.anomaly_index,
                values: self.results.iter().map(|r| r.l1.max(1e-9).ln()).collect(),
                proven: self
                    .results
                    .iter()
                    .filter(|r| r.reached)
                    .map(|r| r.class)
                    .collect(),
            },
            classes: self.classes,
            clean_accuracy: None,
            by_canvas: Vec::new(),
        }
    }
}

/// The figures of a finished Neural Cleanse run.
pub fn nc_outcome(r: &crate::cleanse::CleanseReport) -> Outcome {
    CleanseFile {
        classes: r.classes.clone(),
        results: r
            .results
            .iter()
            .map(|c| CleanseClass {
                class: c.class,
                l1: c.l1,
                reached: c.reached,
            })
            .collect(),
        anomaly_index: r.anomaly_index.clone(),
        flagged: r.flagged.clone(),
    }
    .outcome()
}

/// What a whole scan produced.
pub struct ScanSummary {
    /// Every row found for the listed models (this shard's and others').
    pub rows: Vec<Row>,
    /// Models (path as given) still without a row for some method.
    pub pending: Vec<String>,
    /// Rows this process made, reused and failed.
    pub made: usize,
    /// See `made`.
    pub reused: usize,
    /// See `made`.
    pub failed: usize,
    /// The detection figures per method (with labels).
    pub detection: Vec<Detection>,
}

/// The models named on the command line: files as they are, folders
/// searched (recursively, in name order) for `.safetensors` and `.onnx`.
pub fn list_models(args: &[PathBuf]) -> Result<Vec<String>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("safetensors" | "onnx")
            ) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut models: Vec<String> = Vec::new();
    for a in args {
        let found = if a.is_dir() {
            let mut v = Vec::new();
            walk(a, &mut v)?;
            if v.is_empty() {
                return Err(Error::arg(
                    "MODEL",
                    format!(
                        "{}: no .safetensors or .onnx file in this folder",
                        a.display()
                    ),
                ));
            }
            v
        } else {
            // A missing file stays in the list: it becomes a row with its error.
            vec![a.clone()]
        };
        for p in found {
            let s = p.to_string_lossy().into_owned();
            if models.contains(&s) {
                return Err(Error::arg(
                    "MODEL",
                    format!("{s} is listed more than once; list each model once"),
                ));
            }
            models.push(s);
        }
    }
    if models.is_empty() {
        return Err(Error::arg("MODEL", "no model to scan"));
    }
    Ok(models)
}

/// The folder of a model's results: its file stem and a hash of the path
/// as given, so two `model.safetensors` in different folders stay apart.
pub fn model_dir(out: &Path, model: &str) -> PathBuf {
    let stem = Path::new(model)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hash = crate::io::sha256_hex(&[model.as_bytes()]);
    out.join("models")
        .join(format!("{}-{}", crate::report::slug(&stem), &hash[..8]))
}

fn row_path(out: &Path, model: &str, method: Method) -> PathBuf {
    model_dir(out, model).join(method.name()).join("row.json")
}

fn read_row(path: &Path) -> Option<Row> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The data a model is scanned on: `--data`, else what its training
/// metadata names (`cwp train` records it), else an error that says so.
fn data_spec(model: &Model, opts: &ScanOptions) -> Result<DataSpec> {
    if let Some(d) = &opts.data {
        return d.parse();
    }
    let named = model
        .meta
        .extra
        .get("training")
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|t| t.get("data").and_then(|d| d.as_str()).map(str::to_string));
    let Some(named) = named else {
        return Err(Error::arg(
            "--data",
            "the model's metadata names no data set; give --data",
        ));
    };
    // Recorded as `KIND:DIR (split)`.
    let spec = named
        .rsplit_once(" (")
        .map_or(named.as_str(), |(s, _)| s)
        .to_string();
    spec.parse().map_err(|e: Error| {
        Error::arg(
            "--data",
            format!("the model's metadata names data `{named}`, which cannot be used ({e}); give --data"),
        )
    })
}

/// Test splits loaded so far, by spec and shape (a scan of a hub reuses one
/// or two data sets for every model).
#[derive(Default)]
struct DataCache {
    sets: BTreeMap<(String, [usize; 3]), Dataset>,
}

impl DataCache {
    fn test(&mut self, spec: &DataSpec, shape: [usize; 3]) -> Result<&Dataset> {
        let key = (spec.to_string(), shape);
        if !self.sets.contains_key(&key) {
            let d = data::load_resized(spec, Split::Test, Some(shape), 1.0)?;
            self.sets.insert(key.clone(), d);
        }
        Ok(&self.sets[&key])
    }
}

fn search_config(model: &Model, opts: &ScanOptions) -> Result<SearchConfig> {
    let g = &model.graph;
    let mut cfg = SearchConfig::defaults(g.input, g.num_classes);
    if let Some(c) = &opts.canvas {
        cfg.canvas = c.parse::<search::Canvases>()?.to_string();
    }
    if cfg.canvas.contains("train:") {
        return Err(Error::arg(
            "--canvas",
            "train: canvases are not available in a scan (it loads test splits only)",
        ));
    }
    if let Some(e) = opts.epochs {
        cfg.mask.epochs = e;
    }
    if let Some(k) = &opts.k_sweep {
        cfg.k_sweep = search::pattern::parse_k_sweep(k, cfg.k_sweep)?;
    }
    if opts.eval_per_class.is_some() {
        cfg.eval_per_class = opts.eval_per_class;
    }
    cfg.max_images = search::optimize::max_images(g, opts.memory, cfg.mask.batch);
    cfg.validate(g.input, g.num_classes)?;
    Ok(cfg)
}

/// A model as a scan holds it: loaded, its identity, its path as given.
struct Loaded<'a> {
    model: &'a Model,
    id: &'a str,
    label: &'a str,
}

/// Runs `method` on one loaded model, writing its report under `dir`.
fn run_method<B: Backend>(
    be: &B,
    method: Method,
    m: &Loaded<'_>,
    test: &Dataset,
    opts: &ScanOptions,
    dir: &Path,
) -> Result<Outcome> {
    let (model, model_id, label) = (m.model, m.id, m.label);
    crate::eval::check_fits(&model.graph, test)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    match method {
        Method::Cwp => {
            let cfg = search_config(model, opts)?;
            let inputs = RunInputs {
                model,
                model_id: model_id.to_string(),
                model_label: label.to_string(),
                test,
                train: None,
                command: opts.command.clone(),
                quiet: opts.quiet,
                checkpoint_every: Some(std::time::Duration::from_secs(300)),
            };
            let report = search::run(be, &inputs, &cfg, dir)?;
            crate::report::write_run(&report, test.class_names(), dir)?;
            Ok(cwp_outcome(&report))
        }
        Method::Nc => {
            let g = &model.graph;
            let mut cfg = crate::cleanse::CleanseConfig::defaults(g.num_classes);
            if let Some(n) = opts.nc_steps {
                cfg.steps = n;
            }
            cfg.max_images = search::optimize::max_images(g, opts.memory, cfg.batch);
            cfg.validate(g.num_classes, test.len())?;
            let dm = DeviceModel::upload(be, g, &model.params)?.with_label(label);
            let r = crate::cleanse::run(&dm, test, &cfg, label, opts.quiet)?;
            crate::cleanse::output::write(&r, test.class_names(), dir)?;
            Ok(nc_outcome(&r))
        }
    }
}

/// `flagged` ordered by anomaly (most first), and the largest index.
pub(crate) fn rank(
    flagged: &[usize],
    classes: &[usize],
    index: &[f64],
) -> (Vec<usize>, Option<f64>) {
    let index_of = |c: usize| {
        classes
            .iter()
            .position(|&k| k == c)
            .map_or(f64::NEG_INFINITY, |i| index[i])
    };
    let mut ranked = flagged.to_vec();
    ranked.sort_by(|&a, &b| index_of(b).total_cmp(&index_of(a)).then(a.cmp(&b)));
    let score = index
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    (ranked, score)
}

/// The row of a finished method.
fn finished_row(model: &str, method: Method, o: Outcome, seconds: f64, report: String) -> Row {
    let (flagged, score) = rank(&o.main.flagged, &o.classes, &o.main.anomaly_index);
    let by_canvas = o
        .by_canvas
        .into_iter()
        .map(|(kind, j)| {
            let (flagged, score) = rank(&j.flagged, &o.classes, &j.anomaly_index);
            KindRow {
                kind,
                flagged,
                anomaly_index: j.anomaly_index,
                score,
                values: j.values,
                proven: j.proven,
                referenced: None,
            }
        })
        .collect();
    Row {
        model: model.to_string(),
        method,
        flagged,
        classes: o.classes,
        anomaly_index: o.main.anomaly_index,
        score,
        seconds,
        clean_accuracy: o.clean_accuracy,
        report: Some(report),
        values: o.main.values,
        proven: o.main.proven,
        referenced: None,
        reference: false,
        by_canvas,
        label: None,
        error: None,
        model_id: String::new(),
        settings: String::new(),
    }
}

fn error_row(model: &str, method: Method, e: &dyn std::fmt::Display, seconds: f64) -> Row {
    Row {
        model: model.to_string(),
        method,
        flagged: Vec::new(),
        classes: Vec::new(),
        anomaly_index: Vec::new(),
        score: None,
        seconds,
        clean_accuracy: None,
        report: None,
        values: Vec::new(),
        proven: Vec::new(),
        referenced: None,
        reference: false,
        by_canvas: Vec::new(),
        label: None,
        error: Some(e.to_string()),
        model_id: String::new(),
        settings: String::new(),
    }
}

/// Scans `models` (paths as given) and the references of `opts` into
/// `out`, this shard's share of them, then writes the table of every row
/// found there. `log` gets one line per (model, method).
pub fn run<B: Backend>(
    be: &B,
    models: &[String],
    opts: &ScanOptions,
    labels: Option<&Labels>,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<ScanSummary> {
    // Caught for the whole scan, so that a signal between the searches (or
    // during an evaluation) also stops it cleanly, with the table written.
    let mut interrupts = Interrupts::arm()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut cache = DataCache::default();
    let (mut made, mut reused, mut failed) = (0, 0, 0);
    let mut all = models.to_vec();
    for r in &opts.references {
        if !all.contains(r) {
            all.push(r.clone());
        }
    }
    let models = &all[..];
    let mine: Vec<(usize, &String)> = models
        .iter()
        .enumerate()
        .filter(|(j, _)| opts.shard.is_none_or(|s| s.owns(*j)))
        .collect();
    let mut interrupted = None;
    'models: for (n, (_, model_path)) in mine.iter().enumerate() {
        let tag = format!("[{}/{}] {model_path}", n + 1, mine.len());
        let loaded = std::fs::read(model_path)
            .map_err(|e| Error::io(model_path, e))
            .and_then(|bytes| {
                let m = Model::from_bytes(
                    &bytes,
                    Path::new(model_path),
                    &LoadOptions {
                        arch: opts.arch.clone(),
                        ..LoadOptions::default()
                    },
                )?;
                let id = m.identity(&bytes);
                Ok((m, id))
            });
        for &method in &opts.methods {
            if let Some(signal) = interrupts.received() {
                interrupted = Some(Error::Interrupted(format!(
                    "interrupted by {signal} before {} of {model_path}; \
                     rerun the same command to continue",
                    method.name()
                )));
                break 'models;
            }
            let path = row_path(out, model_path, method);
            let dir = path.parent().expect("row path has a folder").to_path_buf();
            let settings = opts.settings(method);
            let (model, model_id) = match &loaded {
                Ok(v) => v,
                Err(e) => {
                    failed += 1;
                    log(&format!("{tag}: {}: cannot load: {e}", method.name()));
                    save_error(&dir, &error_row(model_path, method, e, 0.0))?;
                    continue;
                }
            };
            if let Some(r) = read_row(&path) {
                if r.model_id == *model_id && r.settings == settings && r.error.is_none() {
                    reused += 1;
                    log(&format!("{tag}: {}: done before, reused", method.name()));
                    continue;
                }
            }
            let t0 = Instant::now();
            let result = data_spec(model, opts).and_then(|spec| {
                let test = cache.test(&spec, model.graph.input)?;
                let m = Loaded {
                    model,
                    id: model_id,
                    label: model_path,
                };
                run_method(be, method, &m, test, opts, &dir)
            });
            let seconds = t0.elapsed().as_secs_f64();
            match result {
                Ok(o) => {
                    let page = match method {
                        Method::Cwp => "report.html",
                        Method::Nc => "cleanse.html",
                    };
                    let report = dir
                        .strip_prefix(out)
                        .unwrap_or(&dir)
                        .join(page)
                        .to_string_lossy()
                        .into_owned();
                    let mut row = finished_row(model_path, method, o, seconds, report);
                    row.model_id = model_id.clone();
                    row.settings = settings;
                    log(&format!(
                        "{tag}: {}: flagged {:?} (largest anomaly index {}) in {seconds:.1}s",
                        method.name(),
                        row.flagged,
                        row.score.map_or("-".into(), |s| format!("{s:.2}")),
                    ));
                    crate::io::write_atomic(&path, &to_json(&row)?)?;
                    let _ = std::fs::remove_file(dir.join("error.json"));
                    made += 1;
                }
                // A signal stops the scan, not just this model: its
                // search saved a checkpoint and the rerun continues it.
                Err(e @ Error::Interrupted(_)) => {
                    // Reported here: the signal ends the scan through its
                    // error, not by its default action.
                    let _ = interrupts.received();
                    log(&format!("{tag}: {}: {e}", method.name()));
                    interrupted = Some(e);
                    break 'models;
                }
                Err(e) => {
                    failed += 1;
                    log(&format!("{tag}: {}: failed: {e}", method.name()));
                    save_error(&dir, &error_row(model_path, method, &e, seconds))?;
                }
            }
        }
    }
    let (mut rows, pending) = collect(models, &opts.methods, labels, out);
    if !opts.references.is_empty() {
        reference::apply(&mut rows, &opts.references);
    }
    let detection = if labels.is_some() {
        detection(&rows, &opts.methods)
    } else {
        Vec::new()
    };
    crate::io::write_atomic(&out.join("scan.json"), &to_json(&rows)?)?;
    if labels.is_some() {
        crate::io::write_atomic(&out.join("detection.json"), &to_json(&detection)?)?;
    }
    let html = page::scan_page(&rows, &pending, &detection, &opts.command);
    crate::io::write_atomic(&out.join("scan.html"), html.as_bytes())?;
    if let Some(e) = interrupted {
        return Err(e);
    }
    Ok(ScanSummary {
        rows,
        pending,
        made,
        reused,
        failed,
        detection,
    })
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Msg(format!("cannot encode scan results: {e}")))
}

/// Keeps a failure where every shard's table finds it; a later success
/// removes it. A row an earlier run finished (for weights that have since
/// changed or broken) is removed, so the table shows the failure, not a
/// stale result.
fn save_error(dir: &Path, row: &Row) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let stale = dir.join("row.json");
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
    }
    crate::io::write_atomic(&dir.join("error.json"), &to_json(row)?)
}

/// Every row on disk for `models`, in model then method order, with their
/// labels; and the models some method has not finished for.
fn collect(
    models: &[String],
    methods: &[Method],
    labels: Option<&Labels>,
    out: &Path,
) -> (Vec<Row>, Vec<String>) {
    let mut rows = Vec::new();
    let mut pending = Vec::new();
    for m in models {
        for &method in methods {
            let path = row_path(out, m, method);
            let row = read_row(&path)
                .filter(|r| r.error.is_none())
                .map(|r| with_values(r, &path))
                .or_else(|| read_row(&path.with_file_name("error.json")));
            match row {
                Some(mut r) => {
                    r.label = labels.and_then(|l| l.find(m)).cloned();
                    rows.push(r);
                }
                None => {
                    if !pending.contains(m) {
                        pending.push(m.clone());
                    }
                }
            }
        }
    }
    (rows, pending)
}

/// A finished row with its per-class sizes: a row written before they
/// were kept gets them from the method's report beside it (and is saved
/// with them), so a scan made by an older version can still be judged
/// against references without searching again.
fn with_values(mut row: Row, path: &Path) -> Row {
    if !row.values.is_empty() {
        return row;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let outcome = match row.method {
        Method::Cwp => std::fs::read(dir.join("report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<search::RunReport>(&b).ok())
            .map(|r| cwp_outcome(&r)),
        Method::Nc => std::fs::read(dir.join("cleanse.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<CleanseFile>(&b).ok())
            .map(CleanseFile::outcome),
    };
    let Some(o) = outcome.filter(|o| o.classes == row.classes) else {
        return row;
    };
    row.values = o.main.values;
    row.proven = o.main.proven;
    for (kind, j) in o.by_canvas {
        if let Some(k) = row.by_canvas.iter_mut().find(|k| k.kind == kind) {
            k.values = j.values;
            k.proven = j.proven;
        }
    }
    if let Ok(json) = to_json(&row) {
        // Only a cache: the row is complete without it being saved.
        let _ = crate::io::write_atomic(path, &json);
    }
    row
}

/// Picks a row's flagged classes and score (the run's verdict, or one kind's).
type Pick<'a> = dyn Fn(&Row) -> Option<(Vec<usize>, Option<f64>)> + 'a;

/// The detection figures of each method over the labelled rows, and for
/// `cwp` also of each canvas kind's verdict (`cwp/natural` is the paper's
/// method alone).
fn detection(rows: &[Row], methods: &[Method]) -> Vec<Detection> {
    let mut out = Vec::new();
    for &method in methods {
        let ok: Vec<&Row> = rows
            .iter()
            .filter(|r| r.method == method && r.error.is_none() && r.label.is_some())
            .collect();
        let scored = |pick: &Pick<'_>| {
            ok.iter()
                .filter_map(|r| {
                    let l = r.label.as_ref()?;
                    let (flagged, score) = pick(r)?;
                    Some(metrics::Scored {
                        backdoored: l.backdoored,
                        target: l.target,
                        flagged,
                        score: score.unwrap_or(f64::NEG_INFINITY),
                        seconds: r.seconds,
                    })
                })
                .collect::<Vec<_>>()
        };
        out.push(metrics::detection(
            method.name(),
            &scored(&|r| Some((r.flagged.clone(), r.score))),
        ));
        let mut kinds: Vec<&str> = Vec::new();
        for r in &ok {
            for k in &r.by_canvas {
                if !kinds.contains(&k.kind.as_str()) {
                    kinds.push(&k.kind);
                }
            }
        }
        for &kind in &kinds {
            let pick = |r: &Row| {
                r.by_canvas
                    .iter()
                    .find(|k| k.kind == kind)
                    .map(|k| (k.flagged.clone(), k.score))
            };
            out.push(metrics::detection(
                &format!("{}/{kind}", method.name()),
                &scored(&pick),
            ));
        }
        // The same verdicts against the reference models, for the rows
        // that have one.
        if ok.iter().any(|r| r.referenced.is_some()) {
            let pick = |r: &Row| r.referenced.as_ref().map(|x| (x.flagged.clone(), x.score));
            out.push(metrics::detection(
                &format!("{}+ref", method.name()),
                &scored(&pick),
            ));
            for &kind in &kinds {
                let pick = |r: &Row| {
                    let k = r.by_canvas.iter().find(|k| k.kind == kind)?;
                    k.referenced.as_ref().map(|x| (x.flagged.clone(), x.score))
                };
                out.push(metrics::detection(
                    &format!("{}/{kind}+ref", method.name()),
                    &scored(&pick),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_list_parses_cwp_nc_both_and_refuses_the_rest() {
        assert_eq!(
            Method::parse_list("both").unwrap(),
            vec![Method::Cwp, Method::Nc]
        );
        assert_eq!(Method::parse_list("nc").unwrap(), vec![Method::Nc]);
        let e = Method::parse_list("neural").unwrap_err().to_string();
        assert!(e.contains("--method") && e.contains("neural"), "{e}");
    }

    #[test]
    fn models_with_one_file_name_in_two_folders_get_two_result_folders() {
        let out = Path::new("o");
        let a = model_dir(out, "x/model.safetensors");
        let b = model_dir(out, "y/model.safetensors");
        assert_ne!(a, b);
        assert!(a.starts_with("o/models"), "{a:?}");
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("model-"));
        assert_eq!(a, model_dir(out, "x/model.safetensors"));
    }

    #[test]
    fn folders_are_listed_recursively_in_name_order_and_repeats_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for f in ["b.safetensors", "a.onnx", "notes.txt", "sub/c.safetensors"] {
            std::fs::write(d.path().join(f), b"").unwrap();
        }
        let got = list_models(&[d.path().to_path_buf()]).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|p| {
                Path::new(p)
                    .strip_prefix(d.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["a.onnx", "b.safetensors", "sub/c.safetensors"]);
        let twice = [d.path().join("a.onnx"), d.path().join("a.onnx")];
        let e = list_models(&twice).unwrap_err().to_string();
        assert!(e.contains("more than once"), "{e}");
        std::fs::create_dir(d.path().join("empty")).unwrap();
        let e = list_models(&[d.path().join("empty")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no .safetensors or .onnx"), "{e}");
    }

    #[test]
    fn a_row_lists_flagged_classes_most_anomalous_first_and_scores_the_largest_index() {
        let o = Outcome {
            classes: vec![0, 1, 2, 3, 4],
            main: Judgement {
                flagged: vec![1, 4],
                anomaly_index: vec![0.1, 2.5, -1.0, f64::NAN, 6.0],
                ..Judgement::default()
            },
            clean_accuracy: Some(0.9),
            by_canvas: vec![(
                "solid".into(),
                Judgement {
                    flagged: vec![1],
                    anomaly_index: vec![0.0, 3.0, 0.0, 0.0, 1.0],
                    ..Judgement::default()
                },
            )],
        };
        let r = finished_row("m.onnx", Method::Nc, o, 1.5, "r.html".into());
        assert_eq!(r.flagged, [4, 1]);
        assert_eq!(r.score, Some(6.0));
        assert_eq!(r.by_canvas[0].flagged, [1]);
        assert_eq!(r.by_canvas[0].score, Some(3.0));
    }
}
