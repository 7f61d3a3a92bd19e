//! The search step as it runs: a window of steps of S searches that never
//! leaves the backend. The images sit on the device; each step gathers its
//! batch there by row index, updates the masks (and learned canvases) in
//! place, and leaves its losses, finiteness counts and (in the last epoch)
//! its masks in window buffers. The host reads them once, when the window
//! ends (a progress point): no copy and no wait inside a step.
//!
//! `advance` is the one step computation; [`super::optimize::step`] (one
//! step from host tensors) and [`Window`] both run it, so the two agree bit
//! for bit.

use super::optimize::MaskConfig;
use crate::backend::Backend;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Prints `msg` to stderr the first time only.
fn warn_once(msg: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("warning: {msg}"));
}

/// What one step leaves on the device besides the updated masks.
pub(crate) struct Advanced<Buf> {
    /// Per-image cross-entropy `[S*B]`, before the update.
    pub losses: Buf,
    /// Logits of the composites `[S*B, K]`.
    pub logits: Buf,
    /// The loss gradient with respect to each mask `[S, H, W]`.
    pub dmask: Buf,
}

/// Which searches of a step learn their canvas.
pub(crate) enum Learners<Buf> {
    /// None: the canvases stay as they are.
    None,
    /// Every one.
    All,
    /// Those whose rows of these `[S,H,W]` flags are 1 (0 for the others:
    /// a zero gradient leaves a fixed canvas exactly as it is).
    Some(Buf),
}

/// One update of S searches on the device. `others [S*B,C,H,W]` (search s
/// owns rows s*B..(s+1)*B); `labels`/`weights` `[S*B]` (each search's
/// target, `alpha / B`). The masks take the signed step; the canvases of
/// the `learners` do too, from the masks before the update.
#[allow(clippy::too_many_arguments)]
pub(crate) fn advance<B: Backend>(
    model: &DeviceModel<'_, B>,
    canvases: &mut B::Buf,
    masks: &mut B::Buf,
    others: &B::Buf,
    labels: &B::Index,
    weights: &B::Buf,
    cfg: &MaskConfig,
    learners: &Learners<B::Buf>,
) -> Result<Advanced<B::Buf>> {
    let be = model.be;
    let [_, h, w] = model.graph.input;
    let x = be.composite(canvases, masks, others)?;
    let out = model.pass_on_device(x, labels, weights)?;
    let l1_grad = cfg.beta / ((h * w) as f32 / 2.0);
    let dmask = be.mask_grad(&out.dx, canvases, others, l1_grad)?;
    let dcanvas = match learners {
        Learners::None => None,
        Learners::All => Some(be.pattern_grad(&out.dx, masks)?),
        Learners::Some(flags) => Some(be.pattern_grad(&out.dx, &be.mul(masks, flags)?)?),
    };
    if let Some(dcanvas) = dcanvas {
        be.sign_step_clamp(canvases, &dcanvas, cfg.lr)?;
    }
    be.sign_step_clamp(masks, &dmask, cfg.lr)?;
    Ok(Advanced {
        losses: out.losses,
        logits: out.logits,
        dmask,
    })
}

/// The labels and weights of S searches' composites: each search's target
/// and `alpha / B`, repeated over its B images.
pub(crate) fn targets_on_device<B: Backend>(
    be: &B,
    targets: &[usize],
    cfg: &MaskConfig,
) -> Result<(B::Index, B::Buf)> {
    let labels: Vec<u32> = targets
        .iter()
        .flat_map(|&t| std::iter::repeat_n(t as u32, cfg.batch))
        .collect();
    let n = labels.len();
    let weights = Tensor::full(&[n], cfg.alpha / cfg.batch as f32);
    Ok((be.upload_index(&labels)?, be.upload(&weights)?))
}

/// What a window gives back to the host when it ends.
pub struct WindowOutput {
    /// Steps the window made.
    pub steps: usize,
    /// Cross-entropy of every composite of every step, `[steps][S*B]`.
    pub losses: Vec<f32>,
    /// Non-finite logits and mask-gradient values per step, `[steps][2]`.
    pub nonfinite: Vec<f32>,
    /// The masks after each step, `[steps][S*H*W]`, when the window keeps
    /// them (see [`Window::new`]); else empty.
    pub snapshots: Vec<f32>,
    /// The masks after the last step, `[S*H*W]`.
    pub masks: Vec<f32>,
    /// The canvases after the last step, `[S*C*H*W]`, when any search learns.
    pub canvases: Option<Vec<f32>>,
}

/// S searches advancing together for up to `len` steps with everything on
/// the backend (see the module's doc).
pub struct Window<'w, 'm, B: Backend> {
    model: &'w DeviceModel<'m, B>,
    cfg: &'w MaskConfig,
    images: &'w B::Buf,
    /// Rows of `images` each step composes, step-major: `[len][S*B]`.
    rows: B::Index,
    labels: B::Index,
    weights: B::Buf,
    learners: Learners<B::Buf>,
    canvases: B::Buf,
    masks: B::Buf,
    /// `[len, S*B]` cross-entropies, `[len, 2]` non-finite counts, and
    /// (when kept) `[len, S*H*W]` masks: one row per step.
    losses: B::Buf,
    nonfinite: B::Buf,
    snapshots: Option<B::Buf>,
    /// The step the device is at: what the ops above read, so every step
    /// submits the same work.
    cursor: B::Index,
    /// The second step's work, recorded for the steps after it.
    recording: Option<B::Recording>,
    len: usize,
    done: usize,
    searches: usize,
}

impl<'w, 'm, B: Backend> Window<'w, 'm, B> {
    /// A window of `rows.len() / (S*B)` steps of the searches for `targets`
    /// from their `canvases [S,C,H,W]` and `masks [S,H,W]`. Step i composes
    /// rows `rows[i*S*B..(i+1)*S*B]` of `images` (search-major, B per
    /// search). `learn[s]` says whether search s learns its canvas. The
    /// masks after every step are kept for the host when a step from
    /// `snap_from` on is in the window (a run needs those of its last epoch).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'w DeviceModel<'m, B>,
        cfg: &'w MaskConfig,
        images: &'w B::Buf,
        rows: &[u32],
        targets: &[usize],
        learn: &[bool],
        canvases: &Tensor,
        masks: &Tensor,
        snap_from: usize,
    ) -> Result<Self> {
        let be = model.be;
        let s = targets.len();
        let [c, h, w] = model.graph.input;
        let per_step = s * cfg.batch;
        if s == 0
            || learn.len() != s
            || per_step == 0
            || !rows.len().is_multiple_of(per_step)
            || canvases.shape() != [s, c, h, w]
            || masks.shape() != [s, h, w]
        {
            return Err(Error::Msg(format!(
                "search window: {s} searches of {} images need canvases [{s}, {c}, {h}, {w}], \
                 masks [{s}, {h}, {w}], {s} learn flags and whole steps of rows; got canvases \
                 {:?}, masks {:?}, {} flags, {} rows",
                cfg.batch,
                canvases.shape(),
                masks.shape(),
                learn.len(),
                rows.len()
            )));
        }
        let len = rows.len() / per_step;
        let (labels, weights) = targets_on_device(be, targets, cfg)?;
        let learners = if learn.iter().all(|&l| l) {
            Learners::All
        } else if learn.iter().any(|&l| l) {
            let flags = Tensor::from_fn(&[s, h, w], |i| if learn[i / (h * w)] { 1.0 } else { 0.0 });
            Learners::Some(be.upload(&flags)?)
        } else {
            Learners::None
        };
        let snapshots = if snap_from < len {
            Some(be.zeros(&[len, s * h * w])?)
        } else {
            None
        };
        Ok(Window {
            model,
            cfg,
            images,
            rows: be.upload_index(rows)?,
            labels,
            weights,
            learners,
            canvases: be.upload(canvases)?,
            masks: be.upload(masks)?,
            losses: be.zeros(&[len, per_step])?,
            nonfinite: be.zeros(&[len, 2])?,
            snapshots,
            cursor: be.upload_index(&[0])?,
            recording: None,
            len,
            done: 0,
            searches: s,
        })
    }

    /// Steps made so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// True when every step of the window is made.
    pub fn is_full(&self) -> bool {
        self.done == self.len
    }

    /// Submits the next step; nothing is copied to or from the host and
    /// nothing waits for the device. The first step runs op by op (its
    /// launches load the kernels); the second is recorded as it runs, and
    /// later ones replay that recording where the backend can (one
    /// submission per step on a GPU).
    pub fn step(&mut self) -> Result<()> {
        if self.is_full() {
            return Err(Error::Msg(format!(
                "search window: all {} steps are made",
                self.len
            )));
        }
        let be = self.model.be;
        if self.done == 1 {
            self.recording = match be.record(&mut || self.submit()) {
                Ok(Some(r)) => Some(r),
                Ok(None) => {
                    self.submit()?;
                    None
                }
                // Nothing recorded has run (the cursor has not moved): the
                // step runs op by op instead, as every later one will. A
                // real failure of the step fails again here.
                Err(e) => {
                    warn_once(&format!(
                        "recording a search step failed ({e}); steps run op by op"
                    ));
                    self.submit()?;
                    None
                }
            };
        } else if let (2.., Some(r)) = (self.done, self.recording.as_ref()) {
            be.replay(r)?;
        } else {
            self.submit()?;
        }
        self.done += 1;
        Ok(())
    }

    /// The work of one step, reading where it stands from the cursor.
    fn submit(&mut self) -> Result<()> {
        let be = self.model.be;
        let per_step = self.searches * self.cfg.batch;
        let others = be.gather_rows(self.images, &self.rows, &self.cursor, per_step)?;
        let out = advance(
            self.model,
            &mut self.canvases,
            &mut self.masks,
            &others,
            &self.labels,
            &self.weights,
            self.cfg,
            &self.learners,
        )?;
        be.write_row(&mut self.losses, &self.cursor, &out.losses)?;
        be.count_nonfinite(&out.logits, &mut self.nonfinite, &self.cursor, 0)?;
        be.count_nonfinite(&out.dmask, &mut self.nonfinite, &self.cursor, 1)?;
        if let Some(snaps) = self.snapshots.as_mut() {
            be.write_row(snaps, &self.cursor, &self.masks)?;
        }
        be.advance_cursor(&mut self.cursor)
    }

    /// Reads the window's results back (the one wait of the window).
    pub fn finish(self) -> Result<WindowOutput> {
        let be = self.model.be;
        let per_step = self.searches * self.cfg.batch;
        let mut losses = be.download(&self.losses)?.into_data();
        losses.truncate(self.done * per_step);
        let mut nonfinite = be.download(&self.nonfinite)?.into_data();
        nonfinite.truncate(self.done * 2);
        let masks = be.download(&self.masks)?.into_data();
        let snapshots = match &self.snapshots {
            Some(b) => {
                let mut v = be.download(b)?.into_data();
                v.truncate(self.done * masks.len());
                v
            }
            None => Vec::new(),
        };
        let canvases = match self.learners {
            Learners::None => None,
            _ => Some(be.download(&self.canvases)?.into_data()),
        };
        Ok(WindowOutput {
            steps: self.done,
            losses,
            nonfinite,
            snapshots,
            masks,
            canvases,
        })
    }
}
