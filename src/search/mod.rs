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
pub mod shard;
pub mod store;
pub mod verdict;

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::error::{Error, Result};
use crate::eval::{self, DeviceModel};
use crate::progress::Progress;
use crate::weights::Model;

pub use canvas::{Canvas, CanvasSpec, Canvases};
pub use optimize::MaskConfig;
pub use pattern::Power;
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
}

impl SearchConfig {
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
        let [_, h, w] = input;
        let mask = MaskConfig {
            epochs: if h * w >= 224 * 224 { 1 } else { 5 },
            ..MaskConfig::default()
        };
        SearchConfig {
            classes: (0..classes).collect(),
            canvas: "auto:1+solid:1".into(),
            top_k: SearchConfig::default_k(h, w),
            k_sweep: pattern::default_sweep(h * w),
            threshold: 0.9,
            search_frac: 0.2,
            mask,
            sweep_per_class: Some(100),
            eval_per_class: None,
            examples: 6,
            eval_batch: 256,
            max_images: 4096,
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
    /// Predictive power at the default k on all other-class test images.
    pub power: Power,
    /// The k-sweep `(k, power)` on the sweep images.
    pub sweep: Vec<(usize, f64)>,
    /// Smallest k whose power reaches the threshold (None: not reached).
    pub min_k: Option<usize>,
    /// A few stamped test images with their predictions.
    pub examples: Vec<Example>,
    /// Seconds of evaluation after the optimisation.
    pub eval_seconds: f64,
}

/// Per-class summary: the best canvas and its figures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassSummary {
    /// The class.
    pub class: usize,
    /// Its name.
    pub name: String,
    /// Index into [`RunReport::searches`] of the best canvas (highest power).
    pub best: usize,
    /// Its predictive power at the default k.
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
    /// The configuration.
    pub config: SearchConfig,
    /// Clean test accuracy of the model.
    pub clean_accuracy: f64,
    /// Every search, in (class, canvas) order.
    pub searches: Vec<SearchResult>,
    /// One line per class.
    pub classes: Vec<ClassSummary>,
    /// Anomaly analysis of ln(minimal k) (when a sweep ran), reported beside
    /// the verdict: "not reached" counts as more pixels than the image has.
    pub verdict_min_k: Option<Verdict>,
    /// Anomaly analysis of ln(mask mean), the mask's L1 norm as Neural
    /// Cleanse uses it: the verdict.
    pub verdict_mask: Verdict,
    /// Classes judged to be backdoor targets (from `verdict_mask`; none
    /// when fewer than 3 classes were searched).
    pub flagged: Vec<usize>,
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
    /// The configuration.
    pub config: SearchConfig,
    /// Clean test accuracy of the model.
    pub clean_accuracy: f64,
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
    let store = store::Store::open(out)?;

    let dm = DeviceModel::upload(be, graph, &model.params)?;
    let clean = pattern::clean_predictions(&dm, test, cfg.eval_batch)?;
    let labels = test.labels();
    let clean_accuracy =
        clean.iter().zip(labels).filter(|(p, y)| p == y).count() as f64 / test.len().max(1) as f64;

    // The search set: a seeded share of each class's test images.
    let class_idx = test.class_indices();
    let sample = data::per_class_sample(&class_idx, cfg.search_frac, cfg.mask.seed);
    let first = |n: Option<usize>| -> Vec<Vec<usize>> {
        class_idx
            .iter()
            .map(|idx| idx.iter().copied().take(n.unwrap_or(usize::MAX)).collect())
            .collect()
    };
    let sweep_images = first(cfg.sweep_per_class);
    let eval_images = first(cfg.eval_per_class);

    // Canvases (errors such as an index out of range surface here, before any search).
    let mut units = Vec::new();
    for &t in &cfg.classes {
        let others: Vec<usize> = {
            let mut v: Vec<usize> = sample
                .iter()
                .enumerate()
                .filter(|(c, _)| *c != t)
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            v.sort_unstable();
            v
        };
        for canvas in canvas::choose_all(&canvas_spec, t, &dm, test, inputs.train, &sample[t])? {
            let key = store::unit_key(&inputs.model_id, test.name(), cfg, t, &canvas);
            units.push((t, canvas, others.clone(), key));
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

    let mut search_seconds = 0.0;
    let mut steps_total = 0usize;
    if !pending.is_empty() {
        let jobs: Vec<optimize::Job<'_>> = pending
            .iter()
            .map(|&i| optimize::Job {
                target: units[i].0,
                canvas: &units[i].1.pixels,
                images: &units[i].2,
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
        steps_total = optimised.iter().map(|o| o.steps).sum();

        let mut bar = Progress::new("evaluate", pending.len() as u64, inputs.quiet);
        for (&i, opt) in pending.iter().zip(optimised) {
            let (t, canvas, _, key) = &units[i];
            let r = evaluate(
                &dm,
                test,
                cfg,
                *t,
                canvas.clone(),
                opt,
                &eval_images,
                &sweep_images,
                &clean,
            )?;
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
        config: cfg.clone(),
        clean_accuracy,
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

/// The report of a run whose every search is done: the best canvas of
/// each class, then the verdicts across classes.
pub fn summarise(
    header: RunHeader,
    searches: Vec<SearchResult>,
    stats: RunStats,
) -> Result<RunReport> {
    let cfg = header.config;
    let mut classes = Vec::new();
    for &t in &cfg.classes {
        let best = searches
            .iter()
            .enumerate()
            .filter(|(_, r)| r.class == t)
            .max_by(|a, b| {
                a.1.power
                    .overall
                    .total_cmp(&b.1.power.overall)
                    .then(
                        b.1.min_k
                            .unwrap_or(usize::MAX)
                            .cmp(&a.1.min_k.unwrap_or(usize::MAX)),
                    )
                    .then(b.0.cmp(&a.0))
            })
            .map(|(i, _)| i)
            .ok_or_else(|| Error::Msg(format!("no search result for class {t}")))?;
        let r = &searches[best];
        classes.push(ClassSummary {
            class: t,
            name: r.class_name.clone(),
            best,
            power: r.power.overall,
            clean: r.power.clean,
            min_k: r.min_k,
            mask_mean: r.mask_mean,
        });
    }
    let pixels = header.input[1] * header.input[2];
    let class_ids: Vec<usize> = classes.iter().map(|c| c.class).collect();
    let verdict_min_k = (!cfg.k_sweep.is_empty()).then(|| {
        let v: Vec<f64> = classes
            .iter()
            .map(|c| (c.min_k.unwrap_or(pixels + 1) as f64).ln())
            .collect();
        verdict::analyse("ln_min_k", &class_ids, &v)
    });
    // Neural Cleanse's statistic, the mask's L1 norm, on a log scale: sizes
    // spread multiplicatively, and "far smaller" is a ratio.
    let verdict_mask = verdict::analyse(
        "ln_mask_mean",
        &class_ids,
        &classes
            .iter()
            .map(|c| c.mask_mean.max(1e-9).ln())
            .collect::<Vec<_>>(),
    );
    let flagged = if classes.len() >= 3 {
        verdict_mask.flagged.clone()
    } else {
        Vec::new()
    };
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
        clean_accuracy: header.clean_accuracy,
        searches,
        classes,
        verdict_min_k,
        verdict_mask,
        flagged,
        reused: stats.reused,
        search_seconds: stats.search_seconds,
        steps_per_second: per_second(stats.steps),
        images_per_second: per_second(stats.steps * cfg.mask.batch),
        total_seconds: stats.total_seconds,
        config: cfg,
    })
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
    class_idx: &[Vec<usize>],
    sweep_images: &[Vec<usize>],
    clean: &[usize],
) -> Result<SearchResult> {
    let t0 = Instant::now();
    let order = pattern::top_k(&opt.mask, &opt.mask_avg, opt.mask.len());
    let positions = order[..cfg.top_k].to_vec();
    let power = pattern::predictive_power(
        dm,
        test,
        target,
        &canvas.pixels,
        &positions,
        class_idx,
        clean,
        cfg.eval_batch,
    )?;
    let mut power_at = |k: usize| -> Result<f64> {
        Ok(pattern::predictive_power(
            dm,
            test,
            target,
            &canvas.pixels,
            &order[..k],
            sweep_images,
            clean,
            cfg.eval_batch,
        )?
        .overall)
    };
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
    let min_k = if cfg.k_sweep.is_empty() {
        None
    } else {
        pattern::minimal_k(&sweep, cfg.threshold, &mut power_at)?
    };
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
        sweep,
        min_k,
        examples,
        eval_seconds: t0.elapsed().as_secs_f64(),
    })
}
