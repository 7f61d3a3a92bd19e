//! Training (`cwp train`): mini-batch SGD with momentum and weight decay, a
//! learning-rate schedule, BN in train mode, augmentation, all-to-one
//! backdoor poisoning and adversarial training; per-epoch evaluation,
//! atomic checkpoints and resume. Deterministic for a seed and thread count.

pub mod augment;
pub mod poison;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::attack::Attack;
use crate::backend::{Backend, SgdParams};
use crate::data::Dataset;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::eval;
use crate::graph::{Graph, ParamKind};
use crate::progress::Progress;
use crate::tensor::Tensor;
use crate::weights::{self, FileTensor, Model, OutTensor};
use crate::zoo::{self, ModelSpec};

use augment::Augment;
use poison::Poisoning;

/// How the learning rate moves over training.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Schedule {
    /// Cosine decay from `lr` to 0 over all steps.
    Cosine,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: usize,
        /// Factor.
        gamma: f32,
    },
    /// Constant.
    Constant,
}

/// `cosine`, `constant` or `step:EVERY:GAMMA` (the `--schedule` option).
impl std::str::FromStr for Schedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Schedule> {
        let arg = |msg: String| Error::arg("--schedule", msg);
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => match s.split(':').collect::<Vec<_>>().as_slice() {
                ["step", every, gamma] => Ok(Schedule::Step {
                    every: every
                        .parse()
                        .map_err(|e| arg(format!("EVERY must be a whole number: {e}")))?,
                    gamma: gamma
                        .parse()
                        .map_err(|e| arg(format!("GAMMA must be a number: {e}")))?,
                }),
                _ => Err(arg(format!(
                    "`{s}` is not cosine, constant or step:EVERY:GAMMA"
                ))),
            },
        }
    }
}

impl Schedule {
    /// The learning rate at `step` of `total` steps (`epoch` is the step's epoch).
    pub fn lr(&self, base: f32, step: usize, total: usize, epoch: usize) -> f32 {
        match self {
            Schedule::Cosine => {
                let t = step as f64 / total.max(1) as f64;
                (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
            }
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / (*every).max(1)) as i32),
            Schedule::Constant => base,
        }
    }
}

/// Everything that decides a training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// SGD momentum (0.9).
    pub momentum: f32,
    /// Weight decay on conv and linear weights (5e-4).
    pub weight_decay: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Seed of initialisation, shuffling, augmentation, poisoning and attacks.
    pub seed: u64,
    /// Augmentation.
    pub augment: Augment,
    /// Backdoor poisoning, if any.
    pub poison: Option<Poisoning>,
    /// Adversarial training attack, if any.
    pub adversarial: Option<Attack>,
    /// The attack used to report robust accuracy at the end, and on how many test images.
    pub robust_eval: Option<(Attack, usize)>,
    /// BN momentum (0.1).
    pub bn_momentum: f32,
    /// The command line, recorded in the weights' metadata.
    pub command: String,
    /// No progress output.
    pub quiet: bool,
}

impl TrainConfig {
    /// The defaults of `cwp train` for a model spec.
    pub fn defaults(spec: &ModelSpec) -> TrainConfig {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: Schedule::Cosine,
            seed: 0,
            augment: Augment::default_for(spec.input),
            poison: None,
            adversarial: None,
            robust_eval: None,
            bn_momentum: 0.1,
            command: String::new(),
            quiet: true,
        }
    }

    /// How the model is trained: `natural`, `backdoor` or `adversarial`.
    pub fn kind(&self) -> &'static str {
        match (&self.poison, &self.adversarial) {
            (Some(_), _) => "backdoor",
            (None, Some(_)) => "adversarial",
            (None, None) => "natural",
        }
    }

    fn describe(&self, spec: &ModelSpec, data: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind(),
            "data": data,
            "arch": spec.arch,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule,
            "seed": self.seed,
            "augment": self.augment,
            "bn_momentum": self.bn_momentum,
            "poison": self.poison.as_ref().map(|p| serde_json::json!({
                "trigger": p.trigger.spec().to_string(), "target": p.target, "rate": p.rate,
            })),
            "adversarial": self.adversarial,
        })
    }

    /// Checks the options before any work starts.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::arg("--epochs", "at least one epoch is needed"));
        }
        if self.batch_size < 2 {
            return Err(Error::arg(
                "--batch",
                "batch norm needs at least 2 images per batch",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::arg(
                "--lr",
                format!("{} must be a positive number", self.lr),
            ));
        }
        // Momentum 1 never forgets a gradient and a negative one flips it;
        // either, like a NaN, makes the weights meaningless.
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::arg(
                "--momentum",
                format!("{} is outside [0, 1)", self.momentum),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::arg(
                "--weight-decay",
                format!("{} must be a finite number >= 0", self.weight_decay),
            ));
        }
        if let Some(p) = &self.poison {
            if p.target >= num_classes {
                return Err(Error::arg(
                    "--target",
                    format!("class {} does not exist ({num_classes} classes)", p.target),
                ));
            }
            if !(0.0..=1.0).contains(&p.rate) {
                return Err(Error::arg(
                    "--poison-rate",
                    format!("{} is outside [0, 1]", p.rate),
                ));
            }
        }
        if let Some(a) = &self.adversarial {
            a.validate("--adversarial")?;
        }
        Ok(())
    }
}

/// Figures of one epoch.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate at the epoch's last step.
    pub lr: f32,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy (on the images as trained: poisoned, augmented, adversarial).
    pub train_accuracy: f64,
    /// Clean test accuracy.
    pub test_accuracy: f64,
    /// Attack success rate of the trigger on the test set (backdoor runs).
    pub asr: Option<f64>,
    /// Wall time of the epoch's training steps, in seconds.
    pub seconds: f64,
}

/// PyTorch's default initialisation: conv and linear weights and biases
/// uniform in ±1/sqrt(fan_in) (kaiming_uniform with a = √5), BN γ = 1,
/// β = 0, running mean 0, running variance 1.
pub fn init_params(graph: &Graph, seed: u64) -> Vec<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut fan_in = 1usize;
    graph
        .params
        .iter()
        .map(|p| match p.kind {
            ParamKind::ConvWeight | ParamKind::LinearWeight => {
                fan_in = p.shape[1..].iter().product();
                let bound = 1.0 / (fan_in as f32).sqrt();
                Tensor::from_fn(&p.shape, |_| rng.random_range(-bound..bound))
            }
            ParamKind::Bias => {
                // A bias follows its weight, whose fan-in was just recorded.
                let bound = 1.0 / (fan_in as f32).sqrt();
                Tensor::from_fn(&p.shape, |_| rng.random_range(-bound..bound))
            }
            ParamKind::BnWeight | ParamKind::BnVar => Tensor::full(&p.shape, 1.0),
            ParamKind::BnBias | ParamKind::BnMean => Tensor::zeros(&p.shape),
        })
        .collect()
}

/// The training images `idx` as the model sees them: the trigger stamped and
/// the label set to the target on the poisoned ones (`poisoned[i]`), then
/// augmented. Nothing else is changed.
pub fn training_batch(
    train_set: &Dataset,
    idx: &[usize],
    poisoned: &[bool],
    poison: Option<&Poisoning>,
    augment: Augment,
    rng: &mut ChaCha8Rng,
) -> (Tensor, Vec<usize>) {
    let shape = train_set.shape();
    let per_image: usize = shape.iter().product();
    let mut x = train_set.batch(idx);
    let mut labels = train_set.batch_labels(idx);
    for (k, &i) in idx.iter().enumerate() {
        let img = &mut x.data_mut()[k * per_image..(k + 1) * per_image];
        if let (true, Some(p)) = (poisoned[i], poison) {
            p.trigger.apply(img);
            labels[k] = p.target;
        }
        augment.apply(img, shape, rng);
    }
    (x, labels)
}

/// Where the per-epoch checkpoint of an output file lives.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".ckpt");
    out.with_file_name(name)
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(a.to_le_bytes());
    h.update(b.to_le_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

struct Checkpoint {
    epochs_done: usize,
    params: Vec<Tensor>,
    velocity: Vec<Tensor>,
    stats: Vec<EpochStats>,
    batches: i64,
}

fn save_checkpoint(path: &Path, graph: &Graph, fingerprint: &str, ck: &Checkpoint) -> Result<()> {
    let mut entries: Vec<(String, OutTensor<'_>)> = Vec::new();
    for (i, spec) in graph.params.iter().enumerate() {
        entries.push((spec.name.clone(), OutTensor::F32(&ck.params[i])));
        entries.push((
            format!("velocity.{}", spec.name),
            OutTensor::F32(&ck.velocity[i]),
        ));
    }
    let mut meta = BTreeMap::new();
    meta.insert("fingerprint".into(), fingerprint.to_string());
    meta.insert("epochs_done".into(), ck.epochs_done.to_string());
    meta.insert("batches".into(), ck.batches.to_string());
    meta.insert(
        "stats".into(),
        serde_json::to_string(&ck.stats).map_err(|e| Error::Msg(e.to_string()))?,
    );
    weights::write_tensors(path, &entries, &meta)
}

fn load_checkpoint(path: &Path, graph: &Graph, fingerprint: &str) -> Result<Checkpoint> {
    let file = weights::read_tensors(path)?;
    if file.metadata.get("fingerprint").map(String::as_str) != Some(fingerprint) {
        return Err(Error::format(
            path,
            "this checkpoint was made with other training options or data; rerun without --resume or with the same options",
        ));
    }
    let get = |name: &str| -> Result<Tensor> {
        match file.tensors.get(name) {
            Some(FileTensor::Float(t)) => Ok(t.clone()),
            _ => Err(Error::format(
                path,
                format!("checkpoint lacks tensor `{name}`"),
            )),
        }
    };
    let mut params = Vec::new();
    let mut velocity = Vec::new();
    for spec in &graph.params {
        params.push(get(&spec.name)?);
        velocity.push(get(&format!("velocity.{}", spec.name))?);
    }
    graph.check_params(&params)?;
    let num = |k: &str| -> Result<i64> {
        file.metadata
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::format(path, format!("checkpoint metadata lacks `{k}`")))
    };
    let stats = file
        .metadata
        .get("stats")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::format(path, "checkpoint metadata lacks `stats`"))?;
    Ok(Checkpoint {
        epochs_done: num("epochs_done")? as usize,
        params,
        velocity,
        stats,
        batches: num("batches")?,
    })
}

/// One SGD step of `graph` on the batch `x` with `labels`: the train-mode
/// forward (BN on batch statistics, running statistics updated), the mean
/// cross-entropy, the backward pass with parameter gradients and the
/// momentum update of every parameter at learning rate `lr`. Returns the
/// per-image losses and predicted classes. What `cwp train` runs for each
/// batch and what `cwp bench --train` times.
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: Backend>(
    be: &B,
    graph: &Graph,
    params: &mut [B::Buf],
    velocity: &mut [B::Buf],
    x: B::Buf,
    labels: &[usize],
    lr: f32,
    cfg: &TrainConfig,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let n = labels.len();
    let trace = graph.forward_train(be, params, x, cfg.bn_momentum)?;
    let (losses, dlogits) =
        be.softmax_cross_entropy(trace.logits(), labels, &vec![1.0 / n as f32; n])?;
    let preds = be.download(trace.logits())?.argmax_rows();
    let grads = graph.backward_params(be, params, &trace, dlogits)?;
    drop(trace);
    for (i, spec) in graph.params.iter().enumerate() {
        if let Some(g) = &grads[i] {
            let p = SgdParams {
                lr,
                momentum: cfg.momentum,
                weight_decay: if spec.kind.decays() {
                    cfg.weight_decay
                } else {
                    0.0
                },
            };
            be.sgd_step(&mut params[i], g, &mut velocity[i], p)?;
        }
    }
    Ok((losses, preds))
}

/// Trains a model of `spec` on `train`, evaluating on `test` after every
/// epoch, checkpointing next to `out` after every epoch, and writing the
/// final weights (with metadata) to `out`. With `resume`, continues from the
/// checkpoint of an interrupted run with the same options.
pub fn train<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    train_set: &Dataset,
    test_set: &Dataset,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
) -> Result<(Model, Vec<EpochStats>)> {
    let graph = zoo::build(spec)?;
    cfg.validate(graph.num_classes)?;
    eval::check_fits(&graph, train_set)?;
    eval::check_fits(&graph, test_set)?;
    crate::io::check_writable(out, "--out")?;
    if let Some(p) = &cfg.poison {
        p.trigger.check_fits(graph.input)?;
    }
    let fingerprint = crate::io::sha256_hex(&[
        format!("{spec:?}").as_bytes(),
        cfg.describe(spec, train_set.name()).to_string().as_bytes(),
        format!("{} {}", train_set.len(), test_set.len()).as_bytes(),
    ]);
    let ckpt_path = checkpoint_path(out);
    // A kill while a checkpoint or the weights were being saved leaves a
    // temp file beside them.
    match ckpt_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => crate::io::remove_stale_temps(d),
        _ => crate::io::remove_stale_temps(Path::new(".")),
    }

    let mut ck = if resume && ckpt_path.exists() {
        load_checkpoint(&ckpt_path, &graph, &fingerprint)?
    } else {
        let params = init_params(&graph, cfg.seed);
        let velocity = graph
            .params
            .iter()
            .map(|p| Tensor::zeros(&p.shape))
            .collect();
        Checkpoint {
            epochs_done: 0,
            params,
            velocity,
            stats: Vec::new(),
            batches: 0,
        }
    };

    let poisoned: Vec<bool> = {
        let mut v = vec![false; train_set.len()];
        if let Some(p) = &cfg.poison {
            for i in poison::poison_indices(train_set.labels(), p.target, p.rate, cfg.seed) {
                v[i] = true;
            }
        }
        v
    };
    let steps_per_epoch = {
        let n = train_set.len() / cfg.batch_size;
        // A last batch of one image cannot give batch statistics; it is dropped.
        n + usize::from(train_set.len() % cfg.batch_size >= 2)
    };
    let total_steps = steps_per_epoch * cfg.epochs;

    let mut params: Vec<B::Buf> = ck
        .params
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<_>>()?;
    let mut velocity: Vec<B::Buf> = ck
        .velocity
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<_>>()?;

    for epoch in ck.epochs_done..cfg.epochs {
        let start = Instant::now();
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 1, epoch as u64));
            for i in (1..order.len()).rev() {
                let j = rng.random_range(0..=i);
                order.swap(i, j);
            }
        }
        let mut bar = Progress::new(
            &format!("epoch {}/{}", epoch + 1, cfg.epochs),
            steps_per_epoch as u64,
            cfg.quiet,
        );
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = cfg.lr;
        for (step, chunk) in order
            .chunks(cfg.batch_size)
            .enumerate()
            .take(steps_per_epoch)
        {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 2 + epoch as u64, step as u64));
            let (x, labels) = training_batch(
                train_set,
                chunk,
                &poisoned,
                cfg.poison.as_ref(),
                cfg.augment,
                &mut rng,
            );
            let xb = match &cfg.adversarial {
                Some(attack) => {
                    let seed = mix(cfg.seed, 3 + epoch as u64, step as u64);
                    crate::attack::pgd_on_device(be, &graph, &params, &x, &labels, attack, seed)?
                }
                None => be.upload(&x)?,
            };
            lr = cfg
                .schedule
                .lr(cfg.lr, epoch * steps_per_epoch + step, total_steps, epoch);
            let (losses, preds) =
                train_step(be, &graph, &mut params, &mut velocity, xb, &labels, lr, cfg)?;
            ck.batches += 1;
            let batch_loss: f64 = losses.iter().map(|&l| l as f64).sum();
            if !batch_loss.is_finite() {
                return Err(Error::Msg(format!(
                    "training diverged at epoch {} step {}: the loss is {batch_loss}; lower --lr",
                    epoch + 1,
                    step + 1
                )));
            }
            loss_sum += batch_loss;
            correct += preds.iter().zip(&labels).filter(|(p, y)| p == y).count();
            seen += labels.len();
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.1}%",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64
            ));
        }
        bar.finish();
        let seconds = start.elapsed().as_secs_f64();

        let host: Vec<Tensor> = params
            .iter()
            .map(|b| be.download(b))
            .collect::<Result<_>>()?;
        let dm = DeviceModel::new(be, &graph, std::mem::take(&mut params))?;
        let test_accuracy = eval::accuracy(&dm, test_set, 256, |_| {})?.accuracy;
        let asr = match &cfg.poison {
            Some(p) => Some(eval::attack_success(&dm, test_set, &p.trigger, p.target, 256)?.asr),
            None => None,
        };
        params = dm.into_params();
        let stats = EpochStats {
            epoch: epoch + 1,
            lr,
            loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_accuracy,
            asr,
            seconds,
        };
        if !cfg.quiet {
            eprintln!(
                "epoch {}/{}: loss {:.4}, train acc {:.2}%, test acc {:.2}%{} ({:.1}s)",
                stats.epoch,
                cfg.epochs,
                stats.loss,
                100.0 * stats.train_accuracy,
                100.0 * stats.test_accuracy,
                asr.map(|a| format!(", ASR {:.2}%", 100.0 * a))
                    .unwrap_or_default(),
                seconds
            );
        }
        ck.stats.push(stats);
        ck.epochs_done = epoch + 1;
        ck.params = host;
        ck.velocity = velocity
            .iter()
            .map(|b| be.download(b))
            .collect::<Result<_>>()?;
        save_checkpoint(&ckpt_path, &graph, &fingerprint, &ck)?;
    }

    let mut model = Model::new(spec, ck.params.clone())?;
    model.batches_tracked = ck.batches;
    let last = ck.stats.last().cloned();
    let mut training = cfg.describe(spec, train_set.name());
    if let Some(s) = &last {
        training["clean_accuracy"] = serde_json::json!(s.test_accuracy);
        model
            .meta
            .extra
            .insert("clean_accuracy".into(), format!("{:.4}", s.test_accuracy));
        if let (Some(asr), Some(p)) = (s.asr, &cfg.poison) {
            training["attack_success_rate"] = serde_json::json!(asr);
            model
                .meta
                .extra
                .insert("attack_success_rate".into(), format!("{asr:.4}"));
            model
                .meta
                .extra
                .insert("trigger".into(), p.trigger.spec().to_string());
            model
                .meta
                .extra
                .insert("target".into(), p.target.to_string());
        }
    }
    if let Some((attack, n)) = &cfg.robust_eval {
        let dm = DeviceModel::new(be, &graph, params)?;
        let r = eval::robust_accuracy(&dm, test_set, attack, 256, Some(*n), cfg.seed, |_| {})?;
        training["robust_accuracy"] = serde_json::json!(r.robust_accuracy);
        training["robust_eval"] = serde_json::json!({"attack": attack, "images": r.images});
        model.meta.extra.insert(
            "robust_accuracy".into(),
            format!("{:.4}", r.robust_accuracy),
        );
        if !cfg.quiet {
            eprintln!(
                "robust accuracy (eps {}, {} steps of {}, {} images): {:.2}%",
                attack.eps,
                attack.steps,
                attack.step,
                r.images,
                100.0 * r.robust_accuracy
            );
        }
    }
    training["epochs_log"] =
        serde_json::to_value(&ck.stats).map_err(|e| Error::Msg(e.to_string()))?;
    model
        .meta
        .extra
        .insert("training".into(), training.to_string());
    model
        .meta
        .extra
        .insert("trained".into(), cfg.kind().to_string());
    if !cfg.command.is_empty() {
        model
            .meta
            .extra
            .insert("command".into(), cfg.command.clone());
    }
    model.save(out)?;
    // The finished weights supersede the checkpoint.
    let _ = std::fs::remove_file(&ckpt_path);
    Ok((model, ck.stats))
}
