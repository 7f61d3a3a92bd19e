//! The mask optimisation of the method, batched: every search of a run
//! advances in the same step (one forward and one backward over all
//! searches' composites); each search's mask is then updated from its own
//! images only. Because every op is batch-invariant on the CPU, a batched run
//! gives bit for bit the masks of separate runs.

use super::checkpoint::{Checkpoint, Interrupts, SearchState, State};
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
    let x = be.composite(&c, &m, &o)?;
    let labels: Vec<usize> = targets
        .iter()
        .flat_map(|&t| std::iter::repeat_n(t, cfg.batch))
        .collect();
    let weights = vec![cfg.alpha / cfg.batch as f32; labels.len()];
    let out = model.pass(x, &labels, &weights)?;
    let l1_grad = cfg.beta / ((h * w) as f32 / 2.0);
    let dmask = be.mask_grad(&out.dx, &c, &o, l1_grad)?;
    let canvases = if learn {
        let dcanvas = be.pattern_grad(&out.dx, &m)?;
        be.sign_step_clamp(&mut c, &dcanvas, cfg.lr)?;
        Some(be.download(&c)?)
    } else {
        None
    };
    be.sign_step_clamp(&mut m, &dmask, cfg.lr)?;
    let ce = out
        .losses
        .chunks(cfg.batch)
        .map(|l| (l.iter().map(|&v| v as f64).sum::<f64>() / cfg.batch as f64) as f32)
        .collect();
    Ok(StepOutput {
        masks: be.download(&m)?,
        ce,
        dmask: be.download(&dmask)?,
        logits: out.logits,
        canvases,
    })
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

    while state.t < longest {
        let t = state.t;
        let active: Vec<usize> = (0..jobs.len()).filter(|&s| t < total[s]).collect();
        for chunk in active.chunks(per_chunk) {
            let s_n = chunk.len();
            let mut canvases = Vec::with_capacity(s_n * per_image);
            let mut mask_data = Vec::with_capacity(s_n * plane);
            let mut idx = Vec::with_capacity(s_n * cfg.batch);
            for &s in chunk {
                let job = &jobs[s];
                let epoch = t / steps_per_epoch[s];
                if orders[s].0 != epoch {
                    orders[s] = (epoch, batch_order(job.images, cfg.seed, job.target, epoch));
                }
                let j = t % steps_per_epoch[s];
                idx.extend_from_slice(&orders[s].1[j * cfg.batch..(j + 1) * cfg.batch]);
                let st = &state.searches[s];
                canvases.extend_from_slice(if job.learn { &st.canvas } else { job.canvas });
                mask_data.extend_from_slice(&st.mask);
            }
            let targets: Vec<usize> = chunk.iter().map(|&s| jobs[s].target).collect();
            let learn = chunk.iter().any(|&s| jobs[s].learn);
            let out = step(
                model,
                &Tensor::new(&[s_n, c, h, w], canvases)?,
                &Tensor::new(&[s_n, h, w], mask_data)?,
                &test.batch(&idx),
                &targets,
                cfg,
                learn,
            )
            .map_err(|e| Error::Msg(format!("search step {}: {e}", t + 1)))?;
            // A NaN gradient would slip into the mask through the sign step
            // and rank first in top-k.
            crate::device_model::check_finite(
                &format!("model `{}`: mask gradient", model.label()),
                t + 1,
                out.dmask.data(),
            )?;
            for (k, &s) in chunk.iter().enumerate() {
                let st = &mut state.searches[s];
                st.mask
                    .copy_from_slice(&out.masks.data()[k * plane..(k + 1) * plane]);
                if let (true, Some(cv)) = (jobs[s].learn, &out.canvases) {
                    st.canvas
                        .copy_from_slice(&cv.data()[k * per_image..(k + 1) * per_image]);
                }
                if t >= total[s] - steps_per_epoch[s] {
                    st.add_to_last_epoch();
                }
                st.window.0 += out.ce[k] as f64;
                st.window.1 += 1;
                if (t + 1) % log_every[s] == 0 || t + 1 == total[s] {
                    st.curve
                        .push((t + 1, (st.window.0 / st.window.1 as f64) as f32));
                    st.window = (0.0, 0);
                }
            }
            progress.inc(s_n as u64);
        }
        state.t += 1;
        if let (Some(ck), Some(int)) = (checkpoint.as_deref_mut(), interrupts.as_mut()) {
            if let Some(signal) = int.received() {
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
