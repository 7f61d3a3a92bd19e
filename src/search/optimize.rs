//! The mask optimisation of the method, batched: every search of a run
//! advances in the same step (one forward and one backward over all
//! searches' composites); each search's mask is then updated from its own
//! images only. Because every op is batch-invariant on the CPU, a batched run
//! gives bit for bit the masks of separate runs.

use super::checkpoint::{Checkpoint, Interrupts, SearchState, State};
use super::window::{Learners, Window, WindowOutput};
use crate::backend::Backend;
use crate::data::Dataset;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::progress::Progress;
use crate::tensor::{numel, Tensor};

/// The optimisation's hyper-parameters (authors' defaults in [`MaskConfig::default`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaskConfig {
    /// Passes over each search's set of other-class images.
    pub epochs: usize,
    /// Images per search per step (B).
    pub batch: usize,
    /// Weight of the cross-entropy term.
    pub alpha: f32,
    /// Weight of the L1 term `sum(m) / (H*W/2)`.
    pub beta: f32,
    /// Step of the signed-gradient update (f64: see `Backend::sign_step_clamp`).
    pub lr: f64,
    /// Initial mask value.
    pub init: f32,
    /// Seed of the batch order.
    pub seed: u64,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            epochs: 5,
            batch: 4,
            alpha: 0.2,
            beta: 0.8,
            lr: 0.02,
            init: 0.5,
            seed: 0,
        }
    }
}

/// What one step gives back, per search.
pub struct StepOutput {
    /// Updated masks `[S, H, W]`.
    pub masks: Tensor,
    /// Mean cross-entropy of each search's batch (before the update).
    pub ce: Vec<f32>,
    /// The loss gradient with respect to each mask `[S, H, W]`.
    pub dmask: Tensor,
    /// Logits of the composites `[S*B, K]`.
    pub logits: Tensor,
    /// Updated canvases `[S, C, H, W]` when `learn` was set (else None).
    pub canvases: Option<Tensor>,
}

/// One update of S searches: `canvases [S,C,H,W]`, `masks [S,H,W]`, `others
/// [S*B,C,H,W]` (search s owns rows s*B..(s+1)*B), `targets [S]`.
/// Loss of search s: `alpha * mean_b CE(f(x'), t_s) + beta * sum(m_s) / (H*W/2)`;
/// update `m = clamp(m - lr * sign(dL/dm), 0, 1)`. With `learn`, the
/// canvases take the same signed step on their own gradient,
/// `c = clamp(c - lr * sign(dL/dc), 0, 1)` (from the masks before the
/// update), and come back in [`StepOutput::canvases`].
pub fn step<B: Backend>(
    model: &DeviceModel<'_, B>,
    canvases: &Tensor,
    masks: &Tensor,
    others: &Tensor,
    targets: &[usize],
    cfg: &MaskConfig,
    learn: bool,
) -> Result<StepOutput> {
    let be = model.be;
    let s = targets.len();
    let [_, h, w] = model.graph.input;
    if s == 0 || others.shape().first() != Some(&(s * cfg.batch)) || masks.shape() != [s, h, w] {
        return Err(Error::Msg(format!(
            "search step: {s} searches need masks [{s}, {h}, {w}] and {} other images; got masks {:?}, others {:?}",
            s * cfg.batch,
            masks.shape(),
            others.shape()
        )));
    }
    let (mut c, mut m, o) = (be.upload(canvases)?, be.upload(masks)?, be.upload(others)?);
    let (labels, weights) = super::window::targets_on_device(be, targets, cfg)?;
    let learners = if learn { Learners::All } else { Learners::None };
    let out = super::window::advance(model, &mut c, &mut m, &o, &labels, &weights, cfg, &learners)?;
    let losses = be.download(&out.losses)?.into_data();
    let logits = be.download(&out.logits)?;
    let what = format!("model `{}`", model.label());
    crate::device_model::check_finite(&format!("{what}: logits"), 1, logits.data())?;
    crate::device_model::check_finite(&format!("{what}: cross-entropy"), 1, &losses)?;
    Ok(StepOutput {
        masks: be.download(&m)?,
        ce: mean_per_search(&losses, cfg.batch),
        dmask: be.download(&out.dmask)?,
        logits,
        canvases: learn.then(|| be.download(&c)).transpose()?,
    })
}

/// Each search's mean cross-entropy from its B consecutive losses.
fn mean_per_search(losses: &[f32], batch: usize) -> Vec<f32> {
    losses
        .chunks(batch)
        .map(|l| (l.iter().map(|&v| v as f64).sum::<f64>() / batch as f64) as f32)
        .collect()
}

/// One search to optimise: a target class, a canvas and the images it is
/// optimised on (test images of the other classes).
pub struct Job<'a> {
    /// Target class.
    pub target: usize,
    /// Canvas pixels `[C, H, W]`.
    pub canvas: &'a [f32],
    /// Indices (in the dataset) of the search images, ascending.
    pub images: &'a [usize],
    /// Whether the canvas's pixels are optimised too (`learn:` canvases).
    pub learn: bool,
}

/// The outcome of one optimised search.
#[derive(Clone, Debug)]
pub struct Optimised {
    /// Final mask `[H, W]` (after the last update).
    pub mask: Vec<f32>,
    /// The mask averaged over the updates of the last epoch (the mean of
    /// the masks after each of its updates): it breaks the top-k ties of
    /// the final mask, which lives on a few dozen levels.
    pub mask_avg: Vec<f32>,
    /// Mean CE over each logged window of steps: `(step, ce)`.
    pub ce_curve: Vec<(usize, f32)>,
    /// The learned canvas `[C, H, W]` (for a job that learns it).
    pub canvas: Option<Vec<f32>>,
    /// Updates made.
    pub steps: usize,
    /// Of those, the updates this process made (not restored from a
    /// checkpoint): what the throughput figures count.
    pub steps_run: usize,
}

/// A seed per (run seed, target class, epoch): the batch order of a search
/// depends on nothing else, so batched and separate runs agree.
fn order_seed(seed: u64, target: usize, epoch: usize) -> u64 {
    let parts = [
        seed.to_le_bytes(),
        (target as u64).to_le_bytes(),
        (epoch as u64).to_le_bytes(),
    ];
    let hex = crate::io::sha256_hex(&[&parts[0], &parts[1], &parts[2]]);
    u64::from_str_radix(&hex[..16], 16).unwrap_or(seed)
}

/// The order in which a search for `target` visits its `images` in
/// `epoch` (consecutive batches of this order are its steps). A pure
/// function of its arguments: the step count alone fixes where a run's
/// randomness stands, so a checkpoint stores no RNG state.
pub fn batch_order(images: &[usize], seed: u64, target: usize, epoch: usize) -> Vec<usize> {
    crate::data::shuffled(images, order_seed(seed, target, epoch))
}

/// Bytes of device memory one image costs in a search step (its
/// activations kept for backward, their gradients, and the input copies).
pub fn bytes_per_image(graph: &Graph) -> usize {
    let acts: usize = graph.nodes.iter().map(|n| numel(&n.shape)).sum();
    // Activations, up to two live gradients of the same size, 4 bytes each.
    acts * 4 * 3
}

/// Most composites one step may put through the model within `memory`
/// bytes (at least one batch, so a step always runs).
pub fn max_images(graph: &Graph, memory: usize, batch: usize) -> usize {
    (memory / bytes_per_image(graph)).max(batch)
}

/// Most steps one window makes before the host reads its results.
const WINDOW_STEPS: usize = 64;
/// Host time after which a window ends early, so progress (and a
/// checkpoint that is due) is never far behind.
const WINDOW_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes of last-epoch masks one window keeps on the device.
const WINDOW_BYTES: usize = 64 << 20;
/// Most bytes of images kept on the device (and at most a quarter of the
/// step's memory budget).
const RESIDENT_IMAGE_BYTES: usize = 1 << 30;

/// Images of the dataset on the device, by ascending dataset index.
struct ImageSet<Buf> {
    rows: Vec<usize>,
    buf: Buf,
}

impl<Buf> ImageSet<Buf> {
    fn upload<B: Backend<Buf = Buf>>(be: &B, test: &Dataset, rows: Vec<usize>) -> Result<Self> {
        let buf = be.upload(&test.batch(&rows))?;
        Ok(ImageSet { rows, buf })
    }

    /// Where dataset image `row` sits in the set.
    fn position(&self, row: usize) -> Result<u32> {
        self.rows
            .binary_search(&row)
            .map(|p| p as u32)
            .map_err(|_| {
                Error::Msg(format!(
                    "search images: image {row} was not put on the device"
                ))
            })
    }
}

/// Fails when step `step` (window entry `i`) made a non-finite logit or
/// mask-gradient value: a NaN gradient would slip into the mask through
/// the sign step and rank first in top-k.
fn nonfinite_check<B: Backend>(
    model: &DeviceModel<'_, B>,
    step: usize,
    out: &WindowOutput,
    i: usize,
    searches: usize,
    batch: usize,
) -> Result<()> {
    let [_, h, w] = model.graph.input;
    let sizes = [searches * batch * model.graph.num_classes, searches * h * w];
    for (j, what) in ["logits", "mask gradient"].iter().enumerate() {
        let bad = out.nonfinite[2 * i + j];
        if bad > 0.0 {
            return Err(crate::device_model::nonfinite_error(
                &format!("model `{}`: {what}", model.label()),
                step,
                bad as usize,
                sizes[j],
            ));
        }
    }
    Ok(())
}

/// Where a window stood in the run: each search's steps per epoch, its
/// total steps, its CE-curve interval, and the run step of the window's first.
struct Schedule<'a> {
    steps_per_epoch: &'a [usize],
    total: &'a [usize],
    log_every: &'a [usize],
    t0: usize,
}

/// Takes a finished window of the searches `chunk` into their host state,
/// step by step as the steps were made: finiteness, the CE curve, the
/// last epoch's mask sums, then the masks (and learned canvases) it ended with.
fn absorb<B: Backend>(
    model: &DeviceModel<'_, B>,
    cfg: &MaskConfig,
    jobs: &[Job<'_>],
    at: &Schedule<'_>,
    chunk: &[usize],
    out: &WindowOutput,
    state: &mut State,
) -> Result<()> {
    let [c, h, w] = model.graph.input;
    let plane = h * w;
    let per_step = chunk.len() * cfg.batch;
    for i in 0..out.steps {
        let t = at.t0 + i;
        nonfinite_check(model, t + 1, out, i, chunk.len(), cfg.batch)?;
        let losses = &out.losses[i * per_step..(i + 1) * per_step];
        crate::device_model::check_finite(
            &format!("model `{}`: cross-entropy", model.label()),
            t + 1,
            losses,
        )?;
        let ce = mean_per_search(losses, cfg.batch);
        for (k, &s) in chunk.iter().enumerate() {
            let st = &mut state.searches[s];
            if t >= at.total[s] - at.steps_per_epoch[s] {
                let from = (i * chunk.len() + k) * plane;
                st.mask.copy_from_slice(&out.snapshots[from..from + plane]);
                st.add_to_last_epoch();
            }
            st.window.0 += ce[k] as f64;
            st.window.1 += 1;
            if (t + 1).is_multiple_of(at.log_every[s]) || t + 1 == at.total[s] {
                st.curve
                    .push((t + 1, (st.window.0 / st.window.1 as f64) as f32));
                st.window = (0.0, 0);
            }
        }
    }
    for (k, &s) in chunk.iter().enumerate() {
        let st = &mut state.searches[s];
        st.mask
            .copy_from_slice(&out.masks[k * plane..(k + 1) * plane]);
        if let (true, Some(cv)) = (jobs[s].learn, &out.canvases) {
            let per_image = c * plane;
            st.canvas
                .copy_from_slice(&cv[k * per_image..(k + 1) * per_image]);
        }
    }
    Ok(())
}

/// Optimises the masks of all `jobs` together on `test`, at most
/// `max_images` composites per forward pass (chunks of searches otherwise).
///
/// With a checkpoint, the run starts from its saved state when there is
/// one, saves its state whenever the checkpoint's interval has passed and
/// once at the end, and on SIGINT or SIGTERM saves and returns an error
/// that says how to continue. Resuming gives bit for bit the outcome of an
/// uninterrupted run.
pub fn optimise<B: Backend>(
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    jobs: &[Job<'_>],
    cfg: &MaskConfig,
    max_images: usize,
    progress: &mut Progress,
    mut checkpoint: Option<&mut Checkpoint>,
) -> Result<Vec<Optimised>> {
    let [c, h, w] = model.graph.input;
    let plane = h * w;
    let per_image = c * plane;
    let steps_per_epoch: Vec<usize> = jobs.iter().map(|j| j.images.len() / cfg.batch).collect();
    for (j, spe) in jobs.iter().zip(&steps_per_epoch) {
        if *spe == 0 {
            return Err(Error::arg(
                "--batch",
                format!(
                    "class {} has {} search images, fewer than one batch of {}",
                    j.target,
                    j.images.len(),
                    cfg.batch
                ),
            ));
        }
    }
    let total: Vec<usize> = steps_per_epoch.iter().map(|s| s * cfg.epochs).collect();
    let longest = total.iter().copied().max().unwrap_or(0);
    let per_chunk = (max_images / cfg.batch).max(1);
    // Each search's curve has about 200 points over its own steps, so it
    // does not depend on which other searches ran beside it.
    let log_every: Vec<usize> = total.iter().map(|&n| (n / 200).max(1)).collect();

    let saved = checkpoint.as_deref().and_then(|ck| ck.load(plane, longest));
    let resumed_at = saved.as_ref().map_or(0, |(st, _)| st.t);
    let mut state = match saved {
        Some((st, path)) => {
            eprintln!(
                "resuming from step {} of {longest} (checkpoint {})",
                st.t,
                path.display()
            );
            progress.inc(total.iter().map(|&n| st.t.min(n) as u64).sum());
            st
        }
        None => State {
            t: 0,
            searches: jobs
                .iter()
                .map(|j| {
                    let mut st = SearchState::new(cfg.init, plane);
                    if j.learn {
                        st.canvas = j.canvas.to_vec();
                    }
                    st
                })
                .collect(),
        },
    };
    let mut interrupts = checkpoint.is_some().then(Interrupts::arm).transpose()?;
    let mut orders: Vec<(usize, Vec<usize>)> =
        jobs.iter().map(|_| (usize::MAX, Vec::new())).collect();
    // Appends search s's images at step t: consecutive batches of its
    // epoch's order.
    let mut rows_at = |s: usize, t: usize, out: &mut Vec<usize>| {
        let job = &jobs[s];
        let epoch = t / steps_per_epoch[s];
        if orders[s].0 != epoch {
            orders[s] = (epoch, batch_order(job.images, cfg.seed, job.target, epoch));
        }
        let j = t % steps_per_epoch[s];
        out.extend_from_slice(&orders[s].1[j * cfg.batch..(j + 1) * cfg.batch]);
    };
    let budget = max_images * bytes_per_image(model.graph);
    let image_bytes = (budget / 4).min(RESIDENT_IMAGE_BYTES);
    let mut all_rows: Vec<usize> = jobs.iter().flat_map(|j| j.images.iter().copied()).collect();
    all_rows.sort_unstable();
    all_rows.dedup();
    // Every image of the run stays on the device when they fit; otherwise
    // each window brings the images it visits.
    let whole = if all_rows.len() * per_image * 4 <= image_bytes {
        Some(ImageSet::upload(model.be, test, all_rows)?)
    } else {
        None
    };

    while state.t < longest {
        let t0 = state.t;
        let active: Vec<usize> = (0..jobs.len()).filter(|&s| t0 < total[s]).collect();
        let n_active = active.len();
        // A window ends before any search finishes (the chunks change
        // then), and keeps its buffers of masks and images within bounds.
        let mut len = active
            .iter()
            .map(|&s| total[s])
            .min()
            .unwrap_or(t0)
            .saturating_sub(t0)
            .min(WINDOW_STEPS)
            .min((WINDOW_BYTES / (n_active * plane * 4).max(1)).max(1));
        if whole.is_none() {
            len = len.min((image_bytes / (n_active * cfg.batch * per_image * 4).max(1)).max(1));
        }
        let rows: Vec<Vec<usize>> = active
            .iter()
            .map(|&s| {
                let mut r = Vec::with_capacity(len * cfg.batch);
                (t0..t0 + len).for_each(|t| rows_at(s, t, &mut r));
                r
            })
            .collect();
        let window_set;
        let set = match &whole {
            Some(w) => w,
            None => {
                let mut needed: Vec<usize> = rows.iter().flatten().copied().collect();
                needed.sort_unstable();
                needed.dedup();
                window_set = ImageSet::upload(model.be, test, needed)?;
                &window_set
            }
        };
        let mut windows = Vec::new();
        for (c_i, chunk) in active.chunks(per_chunk).enumerate() {
            let mine = &rows[c_i * per_chunk..c_i * per_chunk + chunk.len()];
            let mut table = Vec::with_capacity(len * chunk.len() * cfg.batch);
            for i in 0..len {
                for r in mine {
                    for &row in &r[i * cfg.batch..(i + 1) * cfg.batch] {
                        table.push(set.position(row)?);
                    }
                }
            }
            let mut canvases = Vec::with_capacity(chunk.len() * per_image);
            let mut masks = Vec::with_capacity(chunk.len() * plane);
            for &s in chunk {
                let st = &state.searches[s];
                canvases.extend_from_slice(if jobs[s].learn {
                    &st.canvas
                } else {
                    jobs[s].canvas
                });
                masks.extend_from_slice(&st.mask);
            }
            let targets: Vec<usize> = chunk.iter().map(|&s| jobs[s].target).collect();
            let learn: Vec<bool> = chunk.iter().map(|&s| jobs[s].learn).collect();
            let snap_from = chunk
                .iter()
                .map(|&s| (total[s] - steps_per_epoch[s]).saturating_sub(t0))
                .min()
                .unwrap_or(len);
            windows.push(Window::new(
                model,
                cfg,
                &set.buf,
                &table,
                &targets,
                &learn,
                &Tensor::new(&[chunk.len(), c, h, w], canvases)?,
                &Tensor::new(&[chunk.len(), h, w], masks)?,
                snap_from,
            )?);
        }
        let started = std::time::Instant::now();
        let mut signal = None;
        for i in 0..len {
            for win in &mut windows {
                win.step()
                    .map_err(|e| Error::Msg(format!("search step {}: {e}", t0 + i + 1)))?;
            }
            signal = interrupts.as_mut().and_then(|int| int.received());
            if signal.is_some() || started.elapsed() >= WINDOW_TIME {
                break;
            }
        }
        let made = windows.first().map_or(0, |w| w.done());
        for (chunk, win) in active.chunks(per_chunk).zip(windows) {
            let out = win.finish()?;
            let at = Schedule {
                steps_per_epoch: &steps_per_epoch,
                total: &total,
                log_every: &log_every,
                t0,
            };
            absorb(model, cfg, jobs, &at, chunk, &out, &mut state)?;
        }
        progress.inc((made * n_active) as u64);
        state.t = t0 + made;
        if let Some(ck) = checkpoint.as_deref_mut() {
            if let Some(signal) = signal {
                ck.save(&state)?;
                return Err(Error::Interrupted(format!(
                    "interrupted by {signal} at step {} of {longest}; checkpoint saved to {}; \
                     rerun the same command to continue",
                    state.t,
                    ck.path().display()
                )));
            }
            if ck.due() {
                ck.save(&state)?;
            }
        }
    }
    // The evaluation that follows can take long too: a crash there resumes
    // with no step to redo.
    if let Some(ck) = checkpoint {
        ck.save(&state)?;
    }
    drop(interrupts);
    Ok(state
        .searches
        .into_iter()
        .zip(total)
        .map(|(st, steps)| Optimised {
            mask_avg: st.last_epoch_mean(),
            canvas: (!st.canvas.is_empty()).then(|| st.canvas.clone()),
            mask: st.mask,
            ce_curve: st.curve,
            steps,
            steps_run: steps - resumed_at.min(steps),
        })
        .collect())
}
