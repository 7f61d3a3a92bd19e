//! Class-wise pattern search (Zhao et al. 2021), batched over classes and
//! canvases: choose canvases, optimise every mask together, extract top-k
//! patterns, measure their predictive power (with a k-sweep and the minimal k
//! for 90%), pick the best canvas per class, and judge whether one class is a
//! backdoor target. Each search's result is written atomically as soon as it
//! is done; a rerun with the same arguments skips finished searches.

pub mod canvas;
pub mod checkpoint;
pub mod optimize;
pub mod pattern;
pub mod protocol;
pub mod shard;
pub mod store;
pub mod verdict;
pub mod window;

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::eval;
use crate::progress::Progress;
use crate::weights::Model;

pub use canvas::{Canvas, CanvasSpec, Canvases};
pub use optimize::MaskConfig;
pub use pattern::Power;
pub use protocol::Protocol;
pub use verdict::Verdict;

/// Everything that decides a search run (besides the model and the data).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SearchConfig {
    /// Target classes.
    pub classes: Vec<usize>,
    /// How canvases are chosen (its display form, e.g. `auto:1`).
    pub canvas: String,
    /// Pattern size for the main predictive-power figure.
    pub top_k: usize,
    /// k values of the sweep (empty: no sweep, no minimal k).
    pub k_sweep: Vec<usize>,
    /// Predictive power the minimal k must reach.
    pub threshold: f64,
    /// Share of each class's test images in the search set.
    pub search_frac: f64,
    /// The mask optimisation.
    pub mask: MaskConfig,
    /// Other-class test images per source class for the sweep and the
    /// minimal k (None: all of them).
    pub sweep_per_class: Option<usize>,
    /// Other-class test images per source class for the predictive power
    /// at the default k (None: all of them, as the authors do).
    #[serde(default)]
    pub eval_per_class: Option<usize>,
    /// Stamped examples kept per search for the report.
    pub examples: usize,
    /// Images per forward pass when evaluating.
    pub eval_batch: usize,
    /// Most composites in one forward pass of the search step.
    pub max_images: usize,
    /// Which images are searched, chosen by and reported on.
    #[serde(default)]
    pub protocol: Protocol,
}

impl SearchConfig {
    /// Default predictive power the minimal k must reach.
    pub const DEFAULT_THRESHOLD: f64 = 0.9;
    /// Default share of each class's test images in the search set.
    pub const DEFAULT_SEARCH_FRAC: f64 = 0.2;
    /// Default selection images per class.
    pub const DEFAULT_SWEEP_PER_CLASS: Option<usize> = Some(100);
    /// Default report images per class (None: all, as the authors do).
    pub const DEFAULT_EVAL_PER_CLASS: Option<usize> = None;

    /// The authors' pattern size for an image: 50 at 32×32, 2500 at 224×224,
    /// i.e. about 5% of the pixels (`round(H*W*50/1024)`, 38 at 28×28).
    pub fn default_k(h: usize, w: usize) -> usize {
        match (h, w) {
            (32, 32) => 50,
            (224, 224) => 2500,
            _ => ((h * w) as f64 * 50.0 / 1024.0).round().max(1.0) as usize,
        }
    }

    /// The defaults for a model input: all classes, two canvases per class
    /// (the test image the model is surest of, as the authors pick by hand,
    /// and a white one, whose pixels can form a trigger that no image of the
    /// class contains), the authors' optimisation (5 epochs; 1 at ImageNet
    /// size), default k.
    pub fn defaults(input: [usize; 3], classes: usize) -> SearchConfig {
        SearchConfig::defaults_for(input, classes, Protocol::Cwp)
    }

    /// The defaults under `protocol` (see [`protocol`]): its epochs and
    /// default canvases; the rest as [`SearchConfig::defaults`].
    pub fn defaults_for(input: [usize; 3], classes: usize, protocol: Protocol) -> SearchConfig {
        let [_, h, w] = input;
        let mask = MaskConfig {
            epochs: protocol.default_epochs(h, w),
            ..MaskConfig::default()
        };
        SearchConfig {
            classes: (0..classes).collect(),
            canvas: protocol.default_canvas().into(),
            top_k: SearchConfig::default_k(h, w),
            k_sweep: pattern::default_sweep(h * w),
            threshold: SearchConfig::DEFAULT_THRESHOLD,
            search_frac: SearchConfig::DEFAULT_SEARCH_FRAC,
            mask,
            sweep_per_class: SearchConfig::DEFAULT_SWEEP_PER_CLASS,
            eval_per_class: SearchConfig::DEFAULT_EVAL_PER_CLASS,
            examples: 6,
            eval_batch: 256,
            max_images: 4096,
            protocol,
        }
    }

    /// Checks the options against the model before any work starts.
    pub fn validate(&self, input: [usize; 3], num_classes: usize) -> Result<()> {
        let pixels = input[1] * input[2];
        if self.classes.is_empty() {
            return Err(Error::arg("--classes", "no class to search"));
        }
        if let Some(&c) = self.classes.iter().find(|&&c| c >= num_classes) {
            return Err(Error::arg(
                "--classes",
                format!(
                    "class {c} does not exist: the model has {num_classes} classes (0..{})",
                    num_classes - 1
                ),
            ));
        }
        if self.top_k == 0 || self.top_k > pixels {
            return Err(Error::arg(
                "--top-k",
                format!(
                    "{} is not in 1..={pixels} (the image has {pixels} pixels)",
                    self.top_k
                ),
            ));
        }
        if let Some(&k) = self.k_sweep.iter().find(|&&k| k == 0 || k > pixels) {
            return Err(Error::arg(
                "--k-sweep",
                format!("{k} is not in 1..={pixels}"),
            ));
        }
        let m = &self.mask;
        if m.epochs == 0 {
            return Err(Error::arg("--epochs", "at least one epoch is needed"));
        }
        if m.batch == 0 {
            return Err(Error::arg(
                "--batch",
                "at least one image per step is needed",
            ));
        }
        if !(m.lr > 0.0 && m.lr.is_finite()) {
            return Err(Error::arg("--lr", format!("{} must be positive", m.lr)));
        }
        // Without the cross-entropy term the mask only shrinks to nothing,
        // whatever the class: alpha must be positive. beta may be 0 (no
        // sparsity pressure), never negative (it would reward a larger mask).
        if !(m.alpha > 0.0 && m.alpha.is_finite()) {
            return Err(Error::arg(
                "--alpha",
                format!("{} must be a positive, finite number", m.alpha),
            ));
        }
        if !(m.beta >= 0.0 && m.beta.is_finite()) {
            return Err(Error::arg(
                "--beta",
                format!("{} must be a finite number, 0 or more", m.beta),
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(Error::arg(
                "--threshold",
                format!(
                    "{} is outside (0, 1]: it is a share of images",
                    self.threshold
                ),
            ));
        }
        if !(0.0..=1.0).contains(&m.init) {
            return Err(Error::arg(
                "--mask-init",
                format!("{} is outside [0, 1]", m.init),
            ));
        }
        if !(self.search_frac > 0.0 && self.search_frac <= 1.0) {
            return Err(Error::arg(
                "--search-frac",
                format!("{} is outside (0, 1]", self.search_frac),
            ));
        }
        Ok(())
    }
}

/// A stamped image kept for the report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Example {
    /// Index in the test set.
    pub index: usize,
    /// Its true class.
    pub label: usize,
    /// Prediction on the clean image.
    pub clean_pred: usize,
    /// Prediction with the pattern pasted in.
    pub stamped_pred: usize,
    /// The stamped image `[C, H, W]` in [0, 1], for the report's pictures
    /// (empty in results stored before it was kept).
    #[serde(default)]
    pub pixels: Vec<f32>,
}

/// The result of one (class, canvas) search.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SearchResult {
    /// Target class.
    pub class: usize,
    /// Its name.
    pub class_name: String,
    /// The canvas (pixels included).
    pub canvas: Canvas,
    /// Final mask `[H, W]`.
    pub mask: Vec<f32>,
    /// The mask averaged over the last epoch's updates: it breaks ties of
    /// the final mask in the top-k order (empty in results stored before
    /// it was kept).
    #[serde(default)]
    pub mask_avg: Vec<f32>,
    /// Mean of the mask (the L1 statistic, in [0, 1]).
    pub mask_mean: f64,
    /// Updates made.
    pub steps: usize,
    /// Mean CE over windows of steps.
    pub ce_curve: Vec<(usize, f32)>,
    /// The top-k positions (flat), largest mask first.
    pub positions: Vec<usize>,
    /// Predictive power at the default k on the report images (see
    /// [`RunReport::images`]).
    pub power: Power,
    /// Predictive power at the default k on the selection (sweep) images:
    /// what the best canvas of a class is chosen by (None in results stored
    /// before it was kept).
    #[serde(default)]
    pub select_power: Option<f64>,
    /// Predictive power of the optimised mask itself on the report images:
    /// the canvas blended in at the mask's values (every pixel), as the
    /// search optimised it. What proves a diffuse trigger, such as a
    /// blend, that the top-k cut of `power` loses (None in results stored
    /// before it was measured: filled in when such a run is resumed; left
    /// out of the JSON then, so the checksums of those results still hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_power: Option<f64>,
    /// The k-sweep `(k, power)` on the selection (sweep) images.
    pub sweep: Vec<(usize, f64)>,
    /// Smallest k whose power reaches the threshold (None: not reached).
    pub min_k: Option<usize>,
    /// A few stamped test images with their predictions.
    pub examples: Vec<Example>,
    /// Seconds of evaluation after the optimisation.
    pub eval_seconds: f64,
}

impl SearchResult {
    /// Whether the search's pattern counts as evidence: its top-k pattern
    /// or its optimised mask itself sends at least `threshold` of the
    /// other classes' images to the class. A search that failed (its mask
    /// collapsed, or it never reached the class) proves nothing, however
    /// small its mask.
    pub fn proven(&self, threshold: f64) -> bool {
        self.power.overall >= threshold || self.soft_power.is_some_and(|p| p >= threshold)
    }
}

/// Per-class summary: the best canvas and its figures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassSummary {
    /// The class.
    pub class: usize,
    /// Its name.
    pub name: String,
    /// Index into [`RunReport::searches`] of the best canvas: the highest
    /// power on the selection images.
    pub best: usize,
    /// Its predictive power at the default k on the selection images.
    #[serde(default)]
    pub select_power: Option<f64>,
    /// Its predictive power at the default k on the report images.
    pub power: f64,
    /// The clean share of other-class images classified as this class.
    pub clean: f64,
    /// Its minimal k.
    pub min_k: Option<usize>,
    /// Its mask mean.
    pub mask_mean: f64,
}

/// Everything a run produced: written as `report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// `classwise <version>`.
    pub tool: String,
    /// The command line.
    pub command: String,
    /// A label for the model (file name or a demo role).
    pub model_label: String,
    /// The model's architecture, shapes and metadata.
    pub model: serde_json::Value,
    /// The data spec and split sizes.
    pub data: String,
    /// Backend name.
    pub device: String,
    /// What decides the numbers: backend and precision (part of every
    /// search's key, so results of different numerics never mix).
    #[serde(default)]
    pub numerics: String,
    /// The configuration.
    pub config: SearchConfig,
    /// Clean test accuracy of the model.
    pub clean_accuracy: f64,
    /// Which images were searched, chose the best canvas, and gave the
    /// reported power, in words.
    #[serde(default)]
    pub images: String,
    /// Every search, in (class, canvas) order.
    pub searches: Vec<SearchResult>,
    /// One line per class.
    pub classes: Vec<ClassSummary>,
    /// Which canvas kind the verdict compares across classes (`learned`,
    /// `solid` or `natural`): like with like, never a white canvas against a
    /// photo.
    #[serde(default)]
    pub verdict_canvas: String,
    /// Per class (in `classes` order), the index into `searches` of the
    /// search the verdict compares: the class's best of `verdict_canvas`.
    #[serde(default)]
    pub verdict_searches: Vec<usize>,
    /// Anomaly analysis of ln(minimal k) (when a sweep ran), reported beside
    /// the verdict: "not reached" counts as more pixels than the image has.
    pub verdict_min_k: Option<Verdict>,
    /// Anomaly analysis of ln(mask mean), the mask's L1 norm as Neural
    /// Cleanse uses it: the verdict.
    pub verdict_mask: Verdict,
    /// The same analysis on the other canvas kind, for comparison (not
    /// the verdict): `(kind, verdict)`.
    #[serde(default)]
    pub other_verdicts: Vec<(String, Verdict)>,
    /// Classes judged to be backdoor targets: anomalous in `verdict_mask`
    /// and proven ([`SearchResult::proven`]: the top-k pattern or the
    /// optimised mask reaches the threshold power; none when fewer than 3
    /// classes were searched).
    pub flagged: Vec<usize>,
    /// Classes anomalous in `verdict_mask` but not flagged, because their
    /// compared search is not proven: a search that failed (its mask
    /// collapsed) is not a backdoor.
    #[serde(default)]
    pub unproven: Vec<usize>,
    /// Searches reused from an earlier run.
    pub reused: usize,
    /// Wall time of the optimisation, seconds.
    pub search_seconds: f64,
    /// Search steps per second (summed over searches) and images per second.
    pub steps_per_second: f64,
    /// Composite images through forward+backward per second.
    pub images_per_second: f64,
    /// Wall time of everything, seconds.
    pub total_seconds: f64,
}

/// Inputs of a run besides the configuration.
pub struct RunInputs<'a> {
    /// The model.
    pub model: &'a Model,
    /// A stable identity of the weights (e.g. a hash of the file), for resume.
    pub model_id: String,
    /// A label for reports.
    pub model_label: String,
    /// The test split (canvases, search sets, evaluation).
    pub test: &'a Dataset,
    /// The training split, for `train:` canvases.
    pub train: Option<&'a Dataset>,
    /// The command line for the report.
    pub command: String,
    /// No progress output.
    pub quiet: bool,
    /// Save the optimisation's state about this often (and on SIGINT or
    /// SIGTERM) under `out/checkpoints/`, and resume from it; None: no
    /// checkpoints. Never changes a result.
    pub checkpoint_every: Option<std::time::Duration>,
}

/// What identifies a run and every search in it: written into each shard's
/// manifest so `cwp merge` can rebuild the report without the model or data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunHeader {
    /// `classwise <version>`.
    pub tool: String,
    /// The command line.
    pub command: String,
    /// A label for the model.
    pub model_label: String,
    /// A stable identity of the weights.
    pub model_id: String,
    /// The model's architecture, shapes and metadata.
    pub model: serde_json::Value,
    /// Model input `[C, H, W]`.
    pub input: [usize; 3],
    /// The data spec and split sizes.
    pub data: String,
    /// Class names of the data.
    pub class_names: Vec<String>,
    /// Backend name.
    pub device: String,
    /// Backend and precision (see [`RunReport::numerics`]).
    #[serde(default)]
    pub numerics: String,
    /// The configuration.
    pub config: SearchConfig,
    /// Clean test accuracy of the model.
    pub clean_accuracy: f64,
    /// The image sets of the run, in words (see [`RunReport::images`]).
    #[serde(default)]
    pub images: String,
    /// Every search of the run, in (class, canvas) order.
    pub units: Vec<Unit>,
}

/// One (class, canvas) search of a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Unit {
    /// Target class.
    pub class: usize,
    /// The canvas's id (e.g. `test:17`, `solid:1`).
    pub canvas: String,
    /// The key its result is stored under (see [`store::unit_key`]).
    pub key: String,
}

/// Work done by one invocation, for the throughput figures.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunStats {
    /// Searches optimised in this invocation.
    pub searched: usize,
    /// Searches found finished on disk.
    pub reused: usize,
    /// Wall time of the optimisation, seconds.
    pub search_seconds: f64,
    /// Search steps taken (summed over searches).
    pub steps: usize,
    /// Wall time of everything, seconds.
    pub total_seconds: f64,
}

/// Runs the whole search for `cfg` and writes per-search results under
/// `out/searches/`. Returns the report (the caller renders it).
pub fn run<B: Backend>(
    be: &B,
    inputs: &RunInputs<'_>,
    cfg: &SearchConfig,
    out: &Path,
) -> Result<RunReport> {
    let (header, results, stats) = execute(be, inputs, cfg, out, None)?;
    let searches = results.into_iter().flatten().collect();
    summarise(header, searches, stats)
}

/// Runs this shard's share of the searches of `cfg` (unit `j` of the run
/// belongs to shard `j % count`), writes their results under
/// `out/searches/` and the shard's manifest under `out/shards/`. Once every
/// shard has run, `cwp merge` (or [`shard::merge`]) makes the report.
pub fn run_shard<B: Backend>(
    be: &B,
    inputs: &RunInputs<'_>,
    cfg: &SearchConfig,
    out: &Path,
    which: shard::Shard,
) -> Result<shard::Manifest> {
    let (header, _, stats) = execute(be, inputs, cfg, out, Some(which))?;
    let manifest = shard::Manifest {
        format: shard::FORMAT,
        shard: which,
        header,
        stats,
    };
    manifest.save(out)?;
    Ok(manifest)
}

type Executed = (RunHeader, Vec<Option<SearchResult>>, RunStats);

/// The test images a run uses, per class (indices into the test set,
/// ascending): the search set the masks are optimised on, the selection
/// images (the sweep: best canvas, k-sweep, minimal k), and the report
/// images (the predictive power in the report).
pub struct ImageSets {
    /// The search set, per class (the target's own is left out of a
    /// search unless the protocol searches all images).
    pub search: Vec<Vec<usize>>,
    /// Selection images per class.
    pub select: Vec<Vec<usize>>,
    /// Report images per class.
    pub report: Vec<Vec<usize>>,
    /// Whether a search's own target class is searched and reported on.
    pub include_target: bool,
}

impl ImageSets {
    /// The sets of `cfg` over the test set's per-class indices.
    ///
    /// Selection: the first `sweep_per_class` images of each class (half of
    /// it for `all`), never more than half the class. Report, under the
    /// `cwp` protocol: the images after the selection ones, the first
    /// `eval_per_class` of them, so the best canvas is never chosen on the
    /// images its power is reported on. Under the authors' protocols: the
    /// first `eval_per_class` (all by default) images of the class, as
    /// their code evaluates.
    pub fn new(class_idx: &[Vec<usize>], cfg: &SearchConfig) -> ImageSets {
        let p = cfg.protocol;
        let search = if p.searches_all_images() {
            class_idx.to_vec()
        } else {
            data::per_class_sample(class_idx, cfg.search_frac, cfg.mask.seed)
        };
        let take = |v: &[usize], n: Option<usize>| -> Vec<usize> {
            v.iter().copied().take(n.unwrap_or(usize::MAX)).collect()
        };
        let mut select = Vec::new();
        let mut report = Vec::new();
        for idx in class_idx {
            let half = idx.len() / 2;
            let n_select = cfg.sweep_per_class.unwrap_or(half).min(half.max(1));
            let n_select = n_select.min(idx.len());
            select.push(idx[..n_select].to_vec());
            report.push(if p.reports_on_held_out_images() {
                take(&idx[n_select..], cfg.eval_per_class)
            } else {
                take(idx, cfg.eval_per_class)
            });
        }
        ImageSets {
            search,
            select,
            report,
            include_target: p.searches_all_images(),
        }
    }

    /// The images a search for class `t` is optimised on, ascending.
    pub fn search_images(&self, t: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .search
            .iter()
            .enumerate()
            .filter(|(c, _)| self.include_target || *c != t)
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }

    /// The sets in words, for the report.
    pub fn describe(&self, cfg: &SearchConfig, names: &[String]) -> String {
        let total = |sets: &[Vec<usize>]| sets.iter().map(Vec::len).sum::<usize>();
        let range = |sets: &[Vec<usize>]| {
            let lo = sets.iter().map(Vec::len).min().unwrap_or(0);
            let hi = sets.iter().map(Vec::len).max().unwrap_or(0);
            if lo == hi {
                format!("{lo}")
            } else {
                format!("{lo}–{hi}")
            }
        };
        let target = if self.include_target {
            "target class included"
        } else {
            "target class left out"
        };
        let searched = if cfg.protocol.searches_all_images() {
            format!("every test image ({}), {target}", total(&self.search))
        } else {
            format!(
                "a seeded {:.0}% of each class's test images ({} per class), {target}",
                cfg.search_frac * 100.0,
                range(&self.search)
            )
        };
        let held_out = if cfg.protocol.reports_on_held_out_images() {
            "disjoint from the selection images"
        } else {
            "overlapping the selection images, as the authors' code evaluates"
        };
        format!(
            "Protocol {}. Masks optimised on {searched}. Best canvas, k-sweep and minimal k on \
             the selection images: the first {} test images of each class ({} classes). Power \
             reported on the report images: {} of each {}class, {held_out}.",
            cfg.protocol,
            range(&self.select),
            names.len().max(self.select.len()),
            range(&self.report),
            if self.include_target { "" } else { "other " },
        )
    }
}

/// Plans the run's units, searches those that are pending (and, for a
/// shard, its own), and stores each result as it is done. Units neither
/// stored nor searched here come back as `None`.
fn execute<B: Backend>(
    be: &B,
    inputs: &RunInputs<'_>,
    cfg: &SearchConfig,
    out: &Path,
    which: Option<shard::Shard>,
) -> Result<Executed> {
    let start = Instant::now();
    let model = inputs.model;
    let graph = &model.graph;
    let test = inputs.test;
    cfg.validate(graph.input, graph.num_classes)?;
    eval::check_fits(graph, test)?;
    if let Some(train) = inputs.train {
        eval::check_fits(graph, train)?;
    }
    let canvas_spec: Canvases = cfg.canvas.parse()?;
    let store = store::Store::open(out)?.expecting(graph.input);

    let dm = DeviceModel::upload(be, graph, &model.params)?.with_label(inputs.model_label.clone());
    let clean = pattern::clean_predictions(&dm, test, cfg.eval_batch)?;
    let labels = test.labels();
    let clean_accuracy =
        clean.iter().zip(labels).filter(|(p, y)| p == y).count() as f64 / test.len().max(1) as f64;

    let class_idx = test.class_indices();
    let sets = ImageSets::new(&class_idx, cfg);
    let numerics = be.numerics();

    // Canvases (errors such as an index out of range surface here, before any search).
    let mut units = Vec::new();
    for &t in &cfg.classes {
        let searched = sets.search_images(t);
        for canvas in canvas::choose_all(&canvas_spec, t, &dm, test, inputs.train, &sets.search[t])?
        {
            let key = store::unit_key(&inputs.model_id, test.name(), &numerics, cfg, t, &canvas);
            units.push((t, canvas, searched.clone(), key));
        }
    }

    let mine = |j: usize| which.is_none_or(|s| s.owns(j));
    let mut results: Vec<Option<SearchResult>> = units.iter().map(|u| store.load(&u.3)).collect();
    let reused = (0..units.len())
        .filter(|&j| mine(j) && results[j].is_some())
        .count();
    let pending: Vec<usize> = (0..units.len())
        .filter(|&j| mine(j) && results[j].is_none())
        .collect();
    // Results stored before the optimised mask's own power was measured
    // get it now (an evaluation, no search), so a resumed run judges every
    // class by the same evidence.
    for (j, (r, u)) in results.iter_mut().zip(&units).enumerate() {
        if let Some(r) = r.as_mut().filter(|r| mine(j) && r.soft_power.is_none()) {
            let p = soft_power(
                &dm,
                test,
                u.0,
                &r.canvas.pixels,
                &r.mask,
                &sets,
                &clean,
                cfg,
            )?;
            r.soft_power = Some(p);
            store.save(&u.3, r)?;
        }
    }

    let mut search_seconds = 0.0;
    let mut steps_total = 0usize;
    if !pending.is_empty() {
        let jobs: Vec<optimize::Job<'_>> = pending
            .iter()
            .map(|&i| optimize::Job {
                target: units[i].0,
                canvas: &units[i].1.pixels,
                images: &units[i].2,
                learn: units[i].1.source == "learn",
            })
            .collect();
        let total: u64 = jobs
            .iter()
            .map(|j| ((j.images.len() / cfg.mask.batch) * cfg.mask.epochs) as u64)
            .sum();
        let mut bar = Progress::new("search", total, inputs.quiet);
        let mut ckpt = match inputs.checkpoint_every {
            Some(every) => {
                let keys = pending.iter().map(|&i| units[i].3.clone()).collect();
                Some(checkpoint::Checkpoint::new(out, keys, every)?)
            }
            None => None,
        };
        let t0 = Instant::now();
        let optimised = optimize::optimise(
            &dm,
            test,
            &jobs,
            &cfg.mask,
            cfg.max_images,
            &mut bar,
            ckpt.as_mut(),
        )?;
        bar.finish();
        search_seconds = t0.elapsed().as_secs_f64();
        // Steps restored from a checkpoint took no time in this run.
        steps_total = optimised.iter().map(|o| o.steps_run).sum();

        let mut bar = Progress::new("evaluate", pending.len() as u64, inputs.quiet);
        for (&i, opt) in pending.iter().zip(optimised) {
            let (t, canvas, _, key) = &units[i];
            let mut canvas = canvas.clone();
            if let Some(learned) = &opt.canvas {
                canvas.pixels.clone_from(learned);
            }
            let r = evaluate(&dm, test, cfg, *t, canvas, opt, &sets, &clean)?;
            store.save(key, &r)?;
            results[i] = Some(r);
            bar.inc(1);
        }
        bar.finish();
    }
    if inputs.checkpoint_every.is_some() {
        let done: std::collections::HashSet<&str> = units
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_some())
            .map(|(u, _)| u.3.as_str())
            .collect();
        checkpoint::remove_finished(out, |key| done.contains(key))?;
    }
    let header = RunHeader {
        tool: format!("classwise {}", env!("CARGO_PKG_VERSION")),
        command: inputs.command.clone(),
        model_label: inputs.model_label.clone(),
        model_id: inputs.model_id.clone(),
        model: serde_json::json!({
            "arch": graph.arch,
            "input": graph.input,
            "num_classes": graph.num_classes,
            "params": graph.param_count(),
            "metadata": model.meta.extra,
        }),
        input: graph.input,
        data: format!("{} ({} images)", test.name(), test.len()),
        class_names: test.class_names().to_vec(),
        device: be.name(),
        numerics,
        config: cfg.clone(),
        clean_accuracy,
        images: sets.describe(cfg, test.class_names()),
        units: units
            .iter()
            .map(|(t, canvas, _, key)| Unit {
                class: *t,
                canvas: canvas.id.clone(),
                key: key.clone(),
            })
            .collect(),
    };
    let stats = RunStats {
        searched: pending.len(),
        reused,
        search_seconds,
        steps: steps_total,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    Ok((header, results, stats))
}

/// The kind of a canvas for the verdict's like-with-like comparison:
/// `learned` (pixels optimised with the mask), `solid` (a uniform image)
/// or `natural` (a real image).
pub fn canvas_kind(c: &Canvas) -> &'static str {
    match c.source.as_str() {
        "learn" => "learned",
        "solid" => "solid",
        _ => "natural",
    }
}

/// What a class's searches are ranked by: power on the selection images
/// (the report power for results stored before it was kept).
fn selection_power(r: &SearchResult) -> f64 {
    r.select_power.unwrap_or(r.power.overall)
}

/// The best of `candidates` (indices into `searches`): the highest
/// selection power, then the smaller minimal k, then the earlier search.
fn best_of(searches: &[SearchResult], candidates: impl Iterator<Item = usize>) -> Option<usize> {
    candidates.max_by(|&a, &b| {
        let (ra, rb) = (&searches[a], &searches[b]);
        selection_power(ra)
            .total_cmp(&selection_power(rb))
            .then(
                rb.min_k
                    .unwrap_or(usize::MAX)
                    .cmp(&ra.min_k.unwrap_or(usize::MAX)),
            )
            .then(b.cmp(&a))
    })
}

/// The report of a run whose every search is done: the best canvas of
/// each class, then the verdicts across classes.
///
/// The verdict compares like with like: each class's best search from one
/// canvas kind, the first that every class has of `learned` (its pixels can
/// take any value, so it draws triggers of colours no canvas holds),
/// `solid` (a white canvas can hold a trigger no image of the class shows)
/// and `natural`. A class is
/// flagged only when it is anomalous and its compared pattern reaches the
/// threshold power on the report images, as Neural Cleanse counts only
/// masks whose attack succeeds.
pub fn summarise(
    header: RunHeader,
    searches: Vec<SearchResult>,
    stats: RunStats,
) -> Result<RunReport> {
    let cfg = header.config;
    let of_class = |t: usize| {
        searches
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.class == t)
            .map(|(i, _)| i)
    };
    let mut classes = Vec::new();
    for &t in &cfg.classes {
        let best = best_of(&searches, of_class(t))
            .ok_or_else(|| Error::Msg(format!("no search result for class {t}")))?;
        let r = &searches[best];
        classes.push(ClassSummary {
            class: t,
            name: r.class_name.clone(),
            best,
            select_power: r.select_power,
            power: r.power.overall,
            clean: r.power.clean,
            min_k: r.min_k,
            mask_mean: r.mask_mean,
        });
    }
    let kinds = shared_kinds(&cfg.classes, &searches);
    // With no kind shared by every class, each class's best is compared.
    let verdict_canvas = kinds.first().copied();
    let main = kind_verdict(&cfg.classes, &searches, verdict_canvas, cfg.threshold);
    let pixels = header.input[1] * header.input[2];
    let class_ids: Vec<usize> = classes.iter().map(|c| c.class).collect();
    let verdict_min_k = (!cfg.k_sweep.is_empty()).then(|| {
        let v: Vec<f64> = main
            .searches
            .iter()
            .map(|&i| (searches[i].min_k.unwrap_or(pixels + 1) as f64).ln())
            .collect();
        verdict::analyse("ln_min_k", &class_ids, &v)
    });
    let other_verdicts = kinds
        .iter()
        .skip(1)
        .map(|&k| {
            let v = kind_verdict(&cfg.classes, &searches, Some(k), cfg.threshold);
            (k.to_string(), v.verdict)
        })
        .collect();
    let KindVerdict {
        searches: verdict_searches,
        verdict: verdict_mask,
        flagged,
        unproven,
        ..
    } = main;
    let per_second = |n: usize| {
        if stats.search_seconds > 0.0 {
            n as f64 / stats.search_seconds
        } else {
            0.0
        }
    };
    Ok(RunReport {
        tool: header.tool,
        command: header.command,
        model_label: header.model_label,
        model: header.model,
        data: header.data,
        device: header.device,
        numerics: header.numerics,
        clean_accuracy: header.clean_accuracy,
        images: header.images,
        searches,
        classes,
        verdict_canvas: verdict_canvas.unwrap_or("best").to_string(),
        verdict_searches,
        verdict_min_k,
        verdict_mask,
        other_verdicts,
        flagged,
        unproven,
        reused: stats.reused,
        search_seconds: stats.search_seconds,
        steps_per_second: per_second(stats.steps),
        images_per_second: per_second(stats.steps * cfg.mask.batch),
        total_seconds: stats.total_seconds,
        config: cfg,
    })
}

/// The canvas kinds every class of `classes` has a search of, in the
/// verdict's order of preference: `learned`, `solid`, `natural`.
pub fn shared_kinds(classes: &[usize], searches: &[SearchResult]) -> Vec<&'static str> {
    ["learned", "solid", "natural"]
        .into_iter()
        .filter(|&k| {
            classes.iter().all(|&t| {
                searches
                    .iter()
                    .any(|r| r.class == t && canvas_kind(&r.canvas) == k)
            })
        })
        .collect()
}

/// The verdict on one canvas kind of a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KindVerdict {
    /// The kind (`learned`, `solid`, `natural`; `best` for each class's
    /// best search whatever its kind).
    pub kind: String,
    /// Per class, the index into the run's searches of the one compared:
    /// the class's best of the kind.
    pub searches: Vec<usize>,
    /// The anomaly analysis of ln(mask mean) over them.
    pub verdict: Verdict,
    /// Classes anomalous whose compared search is proven at the threshold
    /// power (none when fewer than 3 classes were searched).
    pub flagged: Vec<usize>,
    /// Classes anomalous whose compared search is not.
    pub unproven: Vec<usize>,
}

/// The verdict on the searches of `kind` (None: each class's best) for
/// `classes`: what [`summarise`] gives for the run's chosen kind, and what
/// a scan reports for each kind (the natural canvas alone is the paper's
/// method).
pub fn kind_verdict(
    classes: &[usize],
    searches: &[SearchResult],
    kind: Option<&str>,
    threshold: f64,
) -> KindVerdict {
    let compared: Vec<usize> = classes
        .iter()
        .filter_map(|&t| {
            let of_class = (0..searches.len()).filter(|&i| searches[i].class == t);
            let of_kind = of_class
                .clone()
                .filter(|&i| kind.is_none_or(|k| canvas_kind(&searches[i].canvas) == k));
            best_of(searches, of_kind).or_else(|| best_of(searches, of_class))
        })
        .collect();
    // Neural Cleanse's statistic, the mask's L1 norm, on a log scale: sizes
    // spread multiplicatively, and "far smaller" is a ratio.
    let values: Vec<f64> = compared
        .iter()
        .map(|&i| searches[i].mask_mean.max(1e-9).ln())
        .collect();
    let verdict = verdict::analyse("ln_mask_mean", classes, &values);
    let (mut flagged, mut unproven) = (Vec::new(), Vec::new());
    if classes.len() >= 3 {
        for (&c, &i) in classes.iter().zip(&compared) {
            if verdict.flagged.contains(&c) {
                if searches[i].proven(threshold) {
                    flagged.push(c);
                } else {
                    unproven.push(c);
                }
            }
        }
    }
    KindVerdict {
        kind: kind.unwrap_or("best").to_string(),
        searches: compared,
        verdict,
        flagged,
        unproven,
    }
}

/// The power of a search's optimised mask itself (see
/// [`SearchResult::soft_power`]) on the report images.
#[allow(clippy::too_many_arguments)]
fn soft_power<B: Backend>(
    dm: &DeviceModel<'_, B>,
    test: &Dataset,
    target: usize,
    canvas: &[f32],
    mask: &[f32],
    sets: &ImageSets,
    clean: &[usize],
    cfg: &SearchConfig,
) -> Result<f64> {
    let p = pattern::predictive_power(
        dm,
        test,
        target,
        canvas,
        pattern::Paste::Blend(mask),
        &sets.report,
        clean,
        cfg.eval_batch,
        sets.include_target,
    )?;
    Ok(p.overall)
}

/// Top-k pattern, predictive power, sweep, minimal k and examples of one
/// optimised search.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: Backend>(
    dm: &DeviceModel<'_, B>,
    test: &Dataset,
    cfg: &SearchConfig,
    target: usize,
    canvas: Canvas,
    opt: optimize::Optimised,
    sets: &ImageSets,
    clean: &[usize],
) -> Result<SearchResult> {
    let t0 = Instant::now();
    let order = pattern::top_k(&opt.mask, &opt.mask_avg, opt.mask.len());
    let positions = order[..cfg.top_k].to_vec();
    let power_on = |images: &[Vec<usize>], k: usize| {
        pattern::predictive_power(
            dm,
            test,
            target,
            &canvas.pixels,
            pattern::Paste::Stamp(&order[..k]),
            images,
            clean,
            cfg.eval_batch,
            sets.include_target,
        )
    };
    let power = power_on(&sets.report, cfg.top_k)?;
    let soft_power = soft_power(
        dm,
        test,
        target,
        &canvas.pixels,
        &opt.mask,
        sets,
        clean,
        cfg,
    )?;
    let mut power_at = |k: usize| -> Result<f64> { Ok(power_on(&sets.select, k)?.overall) };
    // The default k joins the sweep: for a solid canvas power rises and
    // falls with k, and a window around it could fall between sweep points.
    let mut ks = cfg.k_sweep.clone();
    if !ks.is_empty() && !ks.contains(&cfg.top_k) {
        ks.push(cfg.top_k);
        ks.sort_unstable();
    }
    let mut sweep = Vec::new();
    for &k in &ks {
        sweep.push((k, power_at(k)?));
    }
    let select_power = match sweep.iter().find(|&&(k, _)| k == cfg.top_k) {
        Some(&(_, p)) => p,
        None => power_at(cfg.top_k)?,
    };
    let min_k = if cfg.k_sweep.is_empty() {
        None
    } else {
        pattern::minimal_k(&sweep, cfg.threshold, &mut power_at)?
    };
    let class_idx = &sets.report;
    // A few stamped images, one from each of the first other classes.
    let plane = opt.mask.len();
    let mut examples = Vec::new();
    for (source, idx) in class_idx.iter().enumerate() {
        if examples.len() >= cfg.examples {
            break;
        }
        if source == target || idx.is_empty() {
            continue;
        }
        let i = idx[idx.len() / 2];
        let mut x = test.batch(&[i]);
        pattern::stamp_batch(&mut x, &canvas.pixels, &positions, plane);
        examples.push(Example {
            index: i,
            label: source,
            clean_pred: clean[i],
            stamped_pred: dm.predict(&x)?[0],
            pixels: x.into_data(),
        });
    }
    let mask_mean = opt.mask.iter().map(|&v| v as f64).sum::<f64>() / plane as f64;
    Ok(SearchResult {
        class: target,
        class_name: test
            .class_names()
            .get(target)
            .cloned()
            .unwrap_or_else(|| target.to_string()),
        canvas,
        mask_mean,
        steps: opt.steps,
        ce_curve: opt.ce_curve,
        mask: opt.mask,
        mask_avg: opt.mask_avg,
        positions,
        power,
        select_power: Some(select_power),
        soft_power: Some(soft_power),
        sweep,
        min_k,
        examples,
        eval_seconds: t0.elapsed().as_secs_f64(),
    })
}
