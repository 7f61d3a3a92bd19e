//! Neural Cleanse (Wang et al., IEEE S&P 2019) on the classwise engine, the
//! baseline backdoor detectors are compared against: for every class t, the
//! smallest mask `m` (one H×W plane) and pattern `p` (C×H×W, raw [0, 1]
//! pixels: the model's normalisation is inside its graph) such that
//! `(1 - m) x + m p` sends clean images x to t. A backdoor target needs a
//! far smaller mask than the other classes: the MAD anomaly index of the
//! masks' L1 norms flags it.
//!
//! As the authors' example script runs it (see `shared/notes/anchors.md`):
//! tanh-parameterised mask and pattern started from U(0, 1), Adam (lr 0.1,
//! β 0.5/0.9), loss `mean CE(f(x'), t) + cost * |m|_1`, the cost schedule of
//! [`schedule`], the smallest-L1 mask among steps with ASR >= 0.99 kept,
//! raw L1 into the anomaly index (threshold 2, small side). Keras sums the
//! per-sample loss where this takes the mean: Adam is invariant to the
//! gradient's scale (up to its ε), so the steps agree.
//!
//! Beyond the original: every class advances in the same step (one forward
//! and backward over all classes' composites); each class's updates use only
//! its own images, so on the CPU a batched run gives bit for bit the masks
//! of the one-class-at-a-time run ([`CleanseConfig::sequential`]).

pub mod output;
pub mod param;
pub mod schedule;

use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::Backend;
use crate::data::Dataset;
use crate::device_model::{check_finite, DeviceModel};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::search::checkpoint::Interrupts;
use crate::search::verdict;
use crate::tensor::Tensor;
use param::{squash, squash_grad, unsquash, Adam, AdamParams};
use schedule::{Schedule, ScheduleParams};

/// The fewest classes the anomaly index can flag one of.
pub const MIN_CLASSES: usize = 3;

/// Settings of a Neural Cleanse run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CleanseConfig {
    /// Target classes to reverse-engineer (the anomaly index needs >= 3).
    pub classes: Vec<usize>,
    /// Most steps per class (the original: 1000).
    pub steps: usize,
    /// Mini-batches per step (the original: 31).
    pub mini_batches: usize,
    /// Clean images per mini-batch (the original: 32).
    pub batch: usize,
    /// The optimiser.
    pub adam: AdamParams,
    /// The cost schedule, best-mask rule and early stop.
    pub schedule: ScheduleParams,
    /// Seed of the initial masks and patterns and of the image order.
    pub seed: u64,
    /// Most composites per forward pass (classes are split into chunks).
    pub max_images: usize,
    /// One class after another (as the original runs it) instead of all
    /// classes in the same step; the same result bit for bit on the CPU.
    pub sequential: bool,
}

impl CleanseConfig {
    /// Default most steps per class: far fewer than the original's 1000 x 31
    /// x 32 images, so that Neural Cleanse of a 10-class smallcnn at 28x28
    /// costs about as much as one default `cwp search` of it (about 150k
    /// images through forward and backward either way).
    pub const DEFAULT_STEPS: usize = 60;
    /// Default mini-batches per step.
    pub const DEFAULT_MINI_BATCHES: usize = 8;
    /// Default images per mini-batch (the original's).
    pub const DEFAULT_BATCH: usize = 32;

    /// The defaults for a model with `num_classes` classes (all of them).
    pub fn defaults(num_classes: usize) -> CleanseConfig {
        CleanseConfig {
            classes: (0..num_classes).collect(),
            steps: Self::DEFAULT_STEPS,
            mini_batches: Self::DEFAULT_MINI_BATCHES,
            batch: Self::DEFAULT_BATCH,
            adam: AdamParams::default(),
            schedule: ScheduleParams::default(),
            seed: 0,
            max_images: usize::MAX,
            sequential: false,
        }
    }

    /// Refuses settings that would make the run meaningless, naming the
    /// option (`images`: the clean images available).
    pub fn validate(&self, num_classes: usize, images: usize) -> Result<()> {
        if self.classes.is_empty() {
            return Err(Error::arg("--classes", "no class to reverse-engineer"));
        }
        for (i, &c) in self.classes.iter().enumerate() {
            if c >= num_classes {
                return Err(Error::arg(
                    "--classes",
                    format!(
                        "class {c} does not exist: the model has {num_classes} classes (0..{})",
                        num_classes.saturating_sub(1)
                    ),
                ));
            }
            if self.classes[..i].contains(&c) {
                return Err(Error::arg(
                    "--classes",
                    format!("class {c} is listed more than once; list each class once"),
                ));
            }
        }
        for (option, v) in [
            ("--steps", self.steps),
            ("--mini-batches", self.mini_batches),
            ("--batch", self.batch),
        ] {
            if v == 0 {
                return Err(Error::arg(option, "must be at least 1"));
            }
        }
        if self.batch > images {
            return Err(Error::arg(
                "--batch",
                format!(
                    "{} images per mini-batch, but the data has only {images}",
                    self.batch
                ),
            ));
        }
        let a = &self.adam;
        if !(a.lr.is_finite() && a.lr > 0.0) {
            return Err(Error::arg(
                "--lr",
                format!("must be a positive number, got {}", a.lr),
            ));
        }
        if !(self.schedule.init_cost.is_finite() && self.schedule.init_cost > 0.0) {
            return Err(Error::arg(
                "--init-cost",
                format!("must be a positive number, got {}", self.schedule.init_cost),
            ));
        }
        Ok(())
    }
}

/// One step of one class, as the original prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepLog {
    /// Attack success rate: mean over the step's mini-batches of the share
    /// of composites predicted as the class.
    pub asr: f64,
    /// Mean L1 of the mask over the mini-batches (before each update).
    pub l1: f64,
    /// Mean cross-entropy.
    pub ce: f64,
    /// The cost the step used.
    pub cost: f64,
}

/// The outcome for one class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassResult {
    /// The target class.
    pub class: usize,
    /// L1 of the kept mask (the sum of its values): what the anomaly index
    /// compares, as the original's `mad_outlier_detection.py` reads it back.
    pub l1: f64,
    /// ASR of the step whose mask was kept.
    pub asr: f64,
    /// Whether some step reached the ASR threshold. When none did, the
    /// last mask is kept; such a class ran at cost 0 throughout (the cost
    /// only rises after 5 successful steps), so its mask is large, and it
    /// is never flagged.
    pub reached: bool,
    /// The step (1-based) whose mask was kept.
    pub kept_step: usize,
    /// The cost at the end.
    pub cost: f64,
    /// Steps run.
    pub steps: usize,
    /// Whether the early-stop rule ended the class's run.
    pub early_stopped: bool,
    /// Every step's figures.
    pub history: Vec<StepLog>,
    /// The kept mask `[H, W]` (in the PNGs, not the JSON).
    #[serde(skip)]
    pub mask: Vec<f32>,
    /// The kept pattern `[C, H, W]` (in the PNGs, not the JSON).
    #[serde(skip)]
    pub pattern: Vec<f32>,
}

/// A whole Neural Cleanse run: what `cwp cleanse` writes and `cwp scan` reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CleanseReport {
    /// `nc`.
    pub method: String,
    /// The model as the caller names it (its file).
    pub model: String,
    /// Input shape `[C, H, W]`.
    pub shape: [usize; 3],
    /// The settings.
    pub config: CleanseConfig,
    /// The classes analysed (the order of `results` and `anomaly_index`).
    pub classes: Vec<usize>,
    /// Per class.
    pub results: Vec<ClassResult>,
    /// Median of the L1 norms.
    pub median: f64,
    /// Median absolute deviation of the L1 norms (unscaled).
    pub mad: f64,
    /// `(median - l1) / (1.4826 * MAD)` per class (positive below the
    /// median; the MAD floored at [`verdict::MIN_MAD`], negligible at the
    /// scale of raw L1 norms).
    pub anomaly_index: Vec<f64>,
    /// Classes below the median with an anomaly index above
    /// [`verdict::THRESHOLD`] that reached the ASR threshold (none when
    /// fewer than [`MIN_CLASSES`] were analysed).
    pub flagged: Vec<usize>,
    /// Wall-clock seconds of the optimisation.
    pub seconds: f64,
    /// Images through forward and backward.
    pub images: u64,
}

/// What the optimisation of one class carries from step to step.
struct ClassState {
    target: usize,
    a: Vec<f64>,
    b: Vec<f64>,
    adam_a: Adam,
    adam_b: Adam,
    schedule: Schedule,
    history: Vec<StepLog>,
    best: Option<(Vec<f32>, Vec<f32>, usize)>,
    done: bool,
    early_stopped: bool,
    /// Sums over the current step's mini-batches: (asr, l1, ce, count).
    acc: (f64, f64, f64, usize),
    /// The image order of the current epoch: (epoch, order).
    order: (usize, Vec<usize>),
}

/// A seed per (run seed, purpose, class, epoch): what a class sees depends
/// on nothing else, so batched and one-at-a-time runs agree.
fn sub_seed(seed: u64, purpose: &[u8], class: usize, epoch: usize) -> u64 {
    let hex = crate::io::sha256_hex(&[
        &seed.to_le_bytes(),
        purpose,
        &(class as u64).to_le_bytes(),
        &(epoch as u64).to_le_bytes(),
    ]);
    u64::from_str_radix(&hex[..16], 16).unwrap_or(seed)
}

impl ClassState {
    /// The original's start: mask and pattern U(0, 1), mapped back through tanh.
    fn new(target: usize, shape: [usize; 3], cfg: &CleanseConfig) -> ClassState {
        let [c, h, w] = shape;
        let mut rng = ChaCha8Rng::seed_from_u64(sub_seed(cfg.seed, b"init", target, 0));
        let mut draw = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| unsquash(rng.random_range(0.0..1.0)))
                .collect()
        };
        let a = draw(h * w);
        let b = draw(c * h * w);
        ClassState {
            target,
            adam_a: Adam::new(a.len(), cfg.adam),
            adam_b: Adam::new(b.len(), cfg.adam),
            a,
            b,
            schedule: Schedule::new(cfg.schedule),
            history: Vec::new(),
            best: None,
            done: false,
            early_stopped: false,
            acc: (0.0, 0.0, 0.0, 0),
            order: (0, Vec::new()),
        }
    }

    fn mask(&self) -> Vec<f32> {
        self.a.iter().map(|&a| squash(a) as f32).collect()
    }

    fn pattern(&self) -> Vec<f32> {
        self.b.iter().map(|&b| squash(b) as f32).collect()
    }

    /// Closes a step: the schedule decides on its mean ASR and L1.
    fn end_step(&mut self) {
        let (asr, l1, ce, n) = self.acc;
        let n = n.max(1) as f64;
        let log = StepLog {
            asr: asr / n,
            l1: l1 / n,
            ce: ce / n,
            cost: self.schedule.cost(),
        };
        self.acc = (0.0, 0.0, 0.0, 0);
        let outcome = self.schedule.step(log.asr, log.l1);
        self.history.push(log);
        if outcome.keep {
            // The mask after the step's updates, as the original saves it.
            self.best = Some((self.mask(), self.pattern(), self.history.len()));
        }
        if outcome.stop {
            self.done = true;
            self.early_stopped = true;
        }
    }

    fn finish(self) -> ClassResult {
        let steps = self.history.len();
        let reached = self.best.is_some();
        let (mask, pattern, kept_step) = match self.best {
            Some(b) => b,
            None => (self.mask(), self.pattern(), steps),
        };
        ClassResult {
            class: self.target,
            l1: mask.iter().map(|&m| m as f64).sum(),
            asr: self
                .history
                .get(kept_step.wrapping_sub(1))
                .map_or(0.0, |l| l.asr),
            reached,
            kept_step,
            cost: self.schedule.cost(),
            steps,
            early_stopped: self.early_stopped,
            history: self.history,
            mask,
            pattern,
        }
    }
}

impl ClassState {
    /// The clean images of mini-batch `u` (counted over all steps):
    /// consecutive batches of a per-class, per-epoch shuffle of `pool`.
    fn batch_indices(&mut self, pool: &[usize], cfg: &CleanseConfig, u: usize) -> &[usize] {
        let per_epoch = pool.len() / cfg.batch;
        let (epoch, j) = (u / per_epoch, u % per_epoch);
        if self.order.0 != epoch || self.order.1.is_empty() {
            let seed = sub_seed(cfg.seed, b"order", self.target, epoch);
            self.order = (epoch, crate::data::shuffled(pool, seed));
        }
        &self.order.1[j * cfg.batch..(j + 1) * cfg.batch]
    }
}

/// One mini-batch of the classes in `chunk`: one forward and backward over
/// their composites, then each class's Adam update from its own images.
fn mini_batch<B: Backend>(
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    pool: &[usize],
    cfg: &CleanseConfig,
    states: &mut [ClassState],
    chunk: &[usize],
    u: usize,
) -> Result<()> {
    let be = model.be;
    let [c, h, w] = model.graph.input;
    let plane = h * w;
    let bsz = cfg.batch;
    let s_n = chunk.len();
    let mut masks = Vec::with_capacity(s_n * plane);
    let mut patterns = Vec::with_capacity(s_n * c * plane);
    let mut idx = Vec::with_capacity(s_n * bsz);
    for &i in chunk {
        let st = &mut states[i];
        masks.extend(st.mask());
        patterns.extend(st.pattern());
        idx.extend_from_slice(st.batch_indices(pool, cfg, u));
    }
    let mm = be.upload(&Tensor::new(&[s_n, h, w], masks)?)?;
    let pp = be.upload(&Tensor::new(&[s_n, c, h, w], patterns)?)?;
    let oo = be.upload(&test.batch(&idx))?;
    let x = be.composite(&pp, &mm, &oo)?;
    let labels: Vec<usize> = chunk
        .iter()
        .flat_map(|&i| std::iter::repeat_n(states[i].target, bsz))
        .collect();
    let weights = vec![1.0 / bsz as f32; labels.len()];
    let out = model.pass(x, &labels, &weights)?;
    let dmask = be.download(&be.mask_grad(&out.dx, &pp, &oo, 0.0)?)?;
    let dpat = be.download(&be.pattern_grad(&out.dx, &mm)?)?;
    let what = format!("model `{}`", model.label());
    check_finite(
        &format!("{what}: Neural Cleanse mask gradient"),
        u + 1,
        dmask.data(),
    )?;
    check_finite(
        &format!("{what}: Neural Cleanse pattern gradient"),
        u + 1,
        dpat.data(),
    )?;
    let masks = be.download(&mm)?;
    let pred = out.logits.argmax_rows();
    for (k, &i) in chunk.iter().enumerate() {
        let st = &mut states[i];
        let rows = k * bsz..(k + 1) * bsz;
        let hits = pred[rows.clone()]
            .iter()
            .filter(|&&p| p == st.target)
            .count();
        let ce = out.losses[rows].iter().map(|&l| l as f64).sum::<f64>() / bsz as f64;
        let l1: f64 = masks.data()[k * plane..(k + 1) * plane]
            .iter()
            .map(|&m| m as f64)
            .sum();
        // d|m|_1/dm = 1: the mask is never negative.
        let cost = st.schedule.cost();
        let ga: Vec<f64> = dmask.data()[k * plane..(k + 1) * plane]
            .iter()
            .zip(&st.a)
            .map(|(&g, &a)| (g as f64 + cost) * squash_grad(a))
            .collect();
        let image = c * plane;
        let gb: Vec<f64> = dpat.data()[k * image..(k + 1) * image]
            .iter()
            .zip(&st.b)
            .map(|(&g, &b)| g as f64 * squash_grad(b))
            .collect();
        st.adam_a.step(&mut st.a, &ga);
        st.adam_b.step(&mut st.b, &gb);
        st.acc.0 += hits as f64 / bsz as f64;
        st.acc.1 += l1;
        st.acc.2 += ce;
        st.acc.3 += 1;
    }
    Ok(())
}

/// Runs Neural Cleanse on `model` with the clean images of `test` (the test
/// split, all classes, as the original uses its clean set). `label` names
/// the model in the report and in errors.
pub fn run<B: Backend>(
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    cfg: &CleanseConfig,
    label: &str,
    quiet: bool,
) -> Result<CleanseReport> {
    let g = model.graph;
    cfg.validate(g.num_classes, test.len())?;
    if test.shape() != g.input {
        return Err(Error::Msg(format!(
            "Neural Cleanse: the data's images are {:?}, the model takes {:?}",
            test.shape(),
            g.input
        )));
    }
    let shape = g.input;
    let pool: Vec<usize> = (0..test.len()).collect();
    let mut states: Vec<ClassState> = cfg
        .classes
        .iter()
        .map(|&t| ClassState::new(t, shape, cfg))
        .collect();
    let groups: Vec<Vec<usize>> = if cfg.sequential {
        (0..states.len()).map(|i| vec![i]).collect()
    } else {
        vec![(0..states.len()).collect()]
    };
    let per_chunk = (cfg.max_images / cfg.batch).max(1);
    let total = (states.len() * cfg.steps * cfg.mini_batches) as u64;
    let mut progress = Progress::new("cleanse", total, quiet);
    let start = Instant::now();
    let mut images = 0u64;
    // Ctrl-C or SIGTERM ends the run between mini-batches with an error
    // that a scan recognises (it stops and still writes its table). The
    // run keeps no checkpoint: it is minutes long, and a rerun starts it
    // again.
    let mut interrupts = Interrupts::arm()?;
    for group in &groups {
        for step in 0..cfg.steps {
            let active: Vec<usize> = group.iter().copied().filter(|&i| !states[i].done).collect();
            if active.is_empty() {
                break;
            }
            for j in 0..cfg.mini_batches {
                if let Some(signal) = interrupts.received() {
                    return Err(Error::Interrupted(format!(
                        "Neural Cleanse of {label} interrupted by {signal} at step {} of {}; \
                         nothing of it is kept: rerun the same command to run it again",
                        step + 1,
                        cfg.steps
                    )));
                }
                let u = step * cfg.mini_batches + j;
                for chunk in active.chunks(per_chunk) {
                    mini_batch(model, test, &pool, cfg, &mut states, chunk, u).map_err(|e| {
                        Error::Msg(format!("Neural Cleanse step {}: {e}", step + 1))
                    })?;
                    images += (chunk.len() * cfg.batch) as u64;
                }
                progress.inc(active.len() as u64);
            }
            for &i in &active {
                states[i].end_step();
                if states[i].done {
                    let left = cfg.steps - states[i].history.len();
                    progress.inc((left * cfg.mini_batches) as u64);
                }
            }
        }
    }
    drop(interrupts);
    let seconds = start.elapsed().as_secs_f64();
    progress.finish();
    let results: Vec<ClassResult> = states.into_iter().map(ClassState::finish).collect();
    let l1: Vec<f64> = results.iter().map(|r| r.l1).collect();
    let v = verdict::analyse("mask_l1", &cfg.classes, &l1);
    // Fewer than 3 classes have no spread to measure an outlier against.
    let flagged = v
        .flagged
        .iter()
        .copied()
        .filter(|c| results.iter().any(|r| r.class == *c && r.reached))
        .filter(|_| results.len() >= MIN_CLASSES)
        .collect();
    Ok(CleanseReport {
        method: "nc".into(),
        model: label.to_string(),
        shape,
        config: cfg.clone(),
        classes: cfg.classes.clone(),
        results,
        median: v.median,
        mad: v.mad,
        anomaly_index: v.anomaly_index,
        flagged,
        seconds,
        images,
    })
}
