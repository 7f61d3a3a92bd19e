//! `cwp`: the command line of classwise. Parsing and printing only; every
//! capability is a library function.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use classwise::attack::Attack;
use classwise::backend::{Backend, Device};
use classwise::data::{self, DataSpec, Split};
use classwise::demo::DemoConfig;
use classwise::device_model::DeviceModel;
use classwise::eval;
use classwise::search::optimize::MaskConfig;
use classwise::search::{self, Canvases, RunInputs, RunReport, SearchConfig};
use classwise::train::augment::Augment;
use classwise::train::poison::{Poisoning, TriggerSpec};
use classwise::train::{self, Schedule, TrainConfig};
use classwise::units::{self, format_count, parse_count};
use classwise::weights::{LoadOptions, Model};
use classwise::zoo::{self, ModelSpec};

/// `println!` that fails the command, instead of panicking, when standard
/// output cannot be written (`cwp zoo > /dev/full`).
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// `print!` that fails the command instead of panicking (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot write to standard output: {e}")
}

#[derive(Parser)]
#[command(
    name = "cwp",
    version,
    about = "Class-wise pattern search: what has an image classifier learned?"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the architectures: input shape, parameters, FLOPs per image.
    Zoo(ZooArgs),
    /// Logits, mean cross-entropy and input gradient of a model on a tensor file.
    Forward(ForwardArgs),
    /// Accuracy (overall, per class, confusion), attack success rate, robust accuracy.
    Eval(EvalArgs),
    /// Train a model: natural, backdoored (--poison) or adversarial (--adversarial).
    Train(TrainArgs),
    /// Search every class's pattern (the paper's method), batched; report in --out.
    Search(SearchArgs),
    /// Gather the shards of a `cwp search --shard I/N` run into one report.
    Merge(MergeArgs),
    /// Neural Cleanse (Wang et al. 2019), all classes batched: per-class trigger masks and the
    /// MAD anomaly index of their L1 norms; report in --out.
    Cleanse(CleanseArgs),
    /// The paper's three settings on one page: the embedded natural, backdoored and adversarially trained models.
    Demo(DemoArgs),
    /// Check the GPU backend against the CPU reference on this machine.
    Selftest(SelftestArgs),
    /// Throughput: forward + backward to the input, search steps, conv kernels.
    Bench(BenchArgs),
    /// Scan many models for backdoors (the search and/or Neural Cleanse on each): one table.
    Scan(ScanArgs),
    /// Compile the CUDA kernels into a kernel cache, for GPU machines without NVRTC.
    Precompile(PrecompileArgs),
}

#[derive(Args)]
struct ScanArgs {
    /// Models: .safetensors or .onnx files, or folders of them (searched recursively).
    #[arg(required = true, value_name = "MODEL")]
    models: Vec<PathBuf>,
    /// Output folder: scan.json, scan.html, each model's reports under models/ (reruns
    /// skip finished models).
    #[arg(long)]
    out: PathBuf,
    /// Method: cwp (the class-wise pattern search), nc (Neural Cleanse) or both.
    #[arg(long, default_value = "cwp")]
    method: String,
    /// Ground truth, a CSV with the header model,backdoored,target: adds TPR, FPR, ROC AUC
    /// and target accuracy per method.
    #[arg(long, value_name = "FILE.csv")]
    labels: Option<PathBuf>,
    /// Known-clean models of the same task (files or folders; repeatable): scanned too, and
    /// each model also gets a verdict against them, class by class, which discounts the
    /// classes every model finds easy. A model is never its own reference.
    #[arg(long, value_name = "MODEL")]
    reference: Vec<PathBuf>,
    /// Architecture for weights files whose metadata names none.
    #[arg(long)]
    arch: Option<String>,
    /// Data for every model (default: the data set each model's metadata names).
    #[arg(long)]
    data: Option<String>,
    /// Search epochs (default: the search's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Search canvases: the search's default plus a learned canvas, whose pixels are optimised
    /// with the mask, so that triggers of colours no canvas holds are found too (the detection
    /// benchmark's verdict; see the README).
    #[arg(long, default_value = classwise::scan::DEFAULT_CANVAS)]
    canvas: String,
    /// The search's k values for power against k and the minimal k: a list, `default` or
    /// `none` (the verdict does not need them, so a scan skips them by default).
    #[arg(long, default_value = "none")]
    k_sweep: String,
    /// Report images per class for each pattern's power (default: all).
    #[arg(long)]
    eval_per_class: Option<usize>,
    /// Memory budget of one search step (bytes with K, M, G or T); the search images kept on
    /// the device take at most a quarter more.
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Neural Cleanse's most steps per class (default: as `cwp cleanse`).
    #[arg(long)]
    nc_steps: Option<usize>,
    /// Scan only shard I of N (0 <= I < N): model j goes to shard j % N. Any shard's table
    /// lists every model finished so far; rerun without --shard to rebuild it at the end.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// No progress bars (one line per model stays).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct PrecompileArgs {
    /// GPU architectures, comma-separated: sm_XY as in the device's compute
    /// capability X.Y (an H100/H200 is sm_90).
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// The cache folder to fill; point CWP_CACHE_DIR at it on the GPU
    /// machine (default: the cache `cwp` itself reads).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct MergeArgs {
    /// The shards' --out folders (or the one folder they share).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Where the report goes (default: the first folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct CleanseArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data: its test split is the clean image set (all classes, as the original).
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Output folder: cleanse.json, cleanse.html, mask_T.png, pattern_T.png, fusion_T.png.
    #[arg(long)]
    out: PathBuf,
    /// Target classes: all, or a comma list of class indices.
    #[arg(long, default_value = "all")]
    classes: String,
    /// Most steps per class (the original: 1000 steps of 31 mini-batches of 32). The defaults
    /// (60 x 8 x 32) make a 10-class smallcnn at 28x28 cost about one default `cwp search`.
    #[arg(long, default_value_t = classwise::cleanse::CleanseConfig::DEFAULT_STEPS)]
    steps: usize,
    /// Mini-batches per step (a step's ASR is their mean; the cost schedule counts steps).
    #[arg(long, default_value_t = classwise::cleanse::CleanseConfig::DEFAULT_MINI_BATCHES)]
    mini_batches: usize,
    /// Clean images per mini-batch.
    #[arg(long, default_value_t = classwise::cleanse::CleanseConfig::DEFAULT_BATCH)]
    batch: usize,
    /// Seed of the initial masks and patterns and of the image order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One class after another, as the original runs it: the same result, for measuring what
    /// batching the classes saves.
    #[arg(long)]
    sequential: bool,
    /// Memory budget of one step: bytes with an optional K, M, G or T suffix (sets how many
    /// classes share a forward pass).
    #[arg(long, default_value = "2G")]
    memory: String,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "cwp-demo")]
    out: PathBuf,
    /// Fashion-MNIST data: fashion-mnist[:DIR].
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Passes over the search set (the authors' 5).
    #[arg(long, default_value_t = DemoConfig::default().epochs)]
    epochs: usize,
    /// Canvases, joined by `+`: auto:N, test:I, train:I, solid:V.
    #[arg(long, default_value_t = DemoConfig::default().canvas)]
    canvas: String,
    /// Images per other class for the power at the default k: a number or `all`.
    #[arg(long, default_value_t = format_count(DemoConfig::default().eval_per_class))]
    eval_per_class: String,
    /// Images per other class for the k-sweep: a number or `all`.
    #[arg(long, default_value_t = format_count(DemoConfig::default().sweep_per_class))]
    sweep_per_class: String,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct SelftestArgs {
    /// GPU backend to check: cuda[:N], or emu (the kernels emulated on the CPU; slow).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Convolution arithmetic to check: fp32, tf32x3, tf32, bf16 (each against its derived error bound).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Op-level checks only (no zoo models).
    #[arg(long)]
    quick: bool,
    /// Images per batch of the model checks (default: 2, one at 224x224).
    #[arg(long)]
    batch: Option<usize>,
    /// Also write the checks as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Models and batch sizes: `ARCH[:CxHxW]:N[,N..]` separated by `;` (default: a plan per device); ARCH may be an ONNX file (`model.onnx:64`), whose input comes from the file; or `none`.
    #[arg(long)]
    models: Option<String>,
    /// Batched searches: `ARCH[:CxHxW]:S[,S..]` (S searches of 4 images per step); ARCH may be an ONNX file; or `none`.
    #[arg(long)]
    search: Option<String>,
    /// Training steps: `ARCH[:CxHxW]:N[,N..]` (train-mode BN, SGD with momentum; zoo
    /// architectures), or `none`.
    #[arg(long)]
    train: Option<String>,
    /// Time each distinct convolution of this model at this batch (forward, backward-data, backward-filter): `ARCH[:CxHxW]:N`, or `none`.
    #[arg(long)]
    convs: Option<String>,
    /// Seconds of timed repetitions per figure.
    #[arg(long)]
    seconds: Option<f64>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DeviceArg {
    /// Compute device: auto, cpu, cuda[:N] (emu: the CUDA kernels emulated on the CPU).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Convolution arithmetic: fp32, tf32x3, tf32, bf16 (tensor cores, f32 accumulation; cuda and emu only, the CPU refuses all but fp32). Default fp32: the faster modes have not passed the accuracy gate on a GPU yet.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// The CPU's eval-mode 3x3 forward convolutions (searches, scans,
    /// evaluations; training's own steps stay direct): direct (the reference,
    /// within every float64 fixture's bound) or winograd (F(4x4,3x3): resnet18
    /// searches about 1.15x as fast here, but its few-ulp differences can flip a
    /// ReLU or max-pool decision that sits on a near-tie, and on three
    /// fixtures that moves the input gradient past its bound; see README). The
    /// GPU's kernels are direct either way.
    #[arg(long, value_enum, default_value_t = CpuForward::Direct)]
    cpu_forward: CpuForward,
}

/// How the CPU computes eval-mode 3x3 forward convolutions (`--cpu-forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CpuForward {
    /// Winograd F(4x4,3x3) (F(2x2) on images of 6x6 and less).
    Winograd,
    /// The direct product, as the reference computes it.
    Direct,
}

#[derive(Args)]
struct ModelArgs {
    /// Weights: safetensors with PyTorch state_dict names, or an ONNX model
    /// (told by the file's content; its graph comes with it, no --arch).
    #[arg(long)]
    weights: PathBuf,
    /// Architecture; may be left out when the weights' metadata names it.
    #[arg(long)]
    arch: Option<String>,
    /// Input shape CxHxW (or C,H,W), when neither the metadata nor the arch's
    /// default fits; for ONNX, the extent of symbolic input axes.
    #[arg(long = "input-shape", value_parser = parse_shape)]
    input: Option<[usize; 3]>,
    /// Per-channel mean of an input normalisation inside the model (comma list).
    #[arg(long, requires = "norm_std")]
    norm_mean: Option<String>,
    /// Per-channel std of an input normalisation inside the model (comma list).
    #[arg(long, requires = "norm_mean")]
    norm_std: Option<String>,
}

#[derive(Args)]
struct ZooArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Safetensors file with `x` (f32 NCHW) and `y` (integer labels).
    #[arg(long = "input")]
    input_file: PathBuf,
    /// Output safetensors file: `logits`, `loss`, `dx`.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data: fashion-mnist[:DIR], mnist:DIR, cifar10:DIR, folder:DIR.
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Which split to evaluate on.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    split: String,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Also measure the attack success rate of this trigger (needs --target).
    #[arg(long, requires = "target")]
    trigger: Option<String>,
    /// Target class of the trigger.
    #[arg(long)]
    target: Option<usize>,
    /// Also measure robust accuracy under PGD: EPS,STEP,STEPS.
    #[arg(long)]
    pgd: Option<String>,
    /// Images used for the PGD evaluation (the first N of the split).
    #[arg(long)]
    pgd_limit: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct TrainArgs {
    /// Architecture to train.
    #[arg(long)]
    arch: String,
    /// Training data (the test split is used for per-epoch evaluation).
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Output weights file (a checkpoint is kept beside it as OUT.ckpt).
    #[arg(long)]
    out: PathBuf,
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Weight decay (not on BN parameters or biases).
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f32,
    /// Learning-rate schedule: cosine, constant, or step:EVERY:GAMMA.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Seed of everything random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Augmentation: default (crop+flip for 32x32 RGB, none otherwise), none, or crop:PAD[,flip] / flip.
    #[arg(long, default_value = "default")]
    augment: String,
    /// Backdoor trigger to plant (e.g. badnets:size=3,pos=br or blend:alpha=0.1,pattern=noise:1).
    #[arg(long, requires = "target")]
    poison: Option<String>,
    /// Target class of the backdoor.
    #[arg(long)]
    target: Option<usize>,
    /// Share of the other classes' training images that get the trigger.
    #[arg(long, default_value_t = 0.1)]
    poison_rate: f64,
    /// Adversarial training: pgd:EPS,STEP,STEPS or fgsm:EPS (random start, step 1.25 EPS).
    #[arg(long)]
    adversarial: Option<String>,
    /// Robust accuracy at the end: EPS,STEP,STEPS[:IMAGES] (default for adversarial runs: EPS,EPS/4,20:1000).
    #[arg(long)]
    robust_eval: Option<String>,
    /// Train on a seeded, class-balanced subset of this many images.
    #[arg(long)]
    limit: Option<usize>,
    /// Continue from the checkpoint of an interrupted run with the same options.
    #[arg(long)]
    resume: bool,
    /// Input shape CxHxW (default: the data's; folder data is resized to it).
    #[arg(long = "input-shape", value_parser = parse_shape)]
    input: Option<[usize; 3]>,
    /// Per-channel mean of an input normalisation inside the model (comma list).
    #[arg(long, requires = "norm_std")]
    norm_mean: Option<String>,
    /// Per-channel std of an input normalisation inside the model (comma list).
    #[arg(long, requires = "norm_mean")]
    norm_std: Option<String>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct SearchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data: the test split gives canvases, search sets and the evaluation.
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Output folder (report.json, report.html, images; reruns skip finished searches).
    #[arg(long)]
    out: PathBuf,
    /// Target classes: all, or a comma list of class indices.
    #[arg(long, default_value = "all")]
    classes: String,
    /// Canvases, joined by `+`: test:I[,J..] (the class's I-th test image), auto:N (the N test
    /// images the model is surest of by logit margin, outside the search set), train:I[,J..],
    /// solid:V[,V..] (a uniform image; white reveals triggers no image of the class contains),
    /// learn:V[,V..] (starts uniform at V; its pixels are optimised with the mask, so a trigger
    /// of colours no canvas holds can be drawn). Default: auto:1+solid:1; test:0 under the
    /// authors' protocols.
    #[arg(long)]
    canvas: Option<String>,
    /// Search protocol: cwp (default: canvas chosen on images disjoint from those its power is
    /// reported on), authors (the authors' code for the input size), authors-cifar (20% of each
    /// class without the target, 5 epochs, power on every other-class image) or
    /// authors-imagenet (one epoch over every test image, target included; power on every
    /// image; folder images Resize(256)+CenterCrop(224) in proportion), at any size.
    #[arg(long, default_value = "cwp")]
    protocol: String,
    /// Pattern size (default: 50 at 32x32, 2500 at 224x224, about 5% of the pixels otherwise).
    #[arg(long)]
    top_k: Option<usize>,
    /// k values for predictive power against k and the minimal k: a comma list, `default`, or `none`.
    #[arg(long, default_value = "default")]
    k_sweep: String,
    /// Passes over the search set (default: 5; 1 at ImageNet size and under authors-imagenet).
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per search per step.
    #[arg(long, default_value_t = MaskConfig::default().batch)]
    batch: usize,
    /// Weight of the cross-entropy term.
    #[arg(long, default_value_t = MaskConfig::default().alpha)]
    alpha: f32,
    /// Weight of the L1 term sum(m)/(H*W/2).
    #[arg(long, default_value_t = MaskConfig::default().beta)]
    beta: f32,
    /// Step of the signed-gradient update.
    #[arg(long, default_value_t = MaskConfig::default().lr)]
    lr: f64,
    /// Seed of the search set and the batch order.
    #[arg(long, default_value_t = MaskConfig::default().seed)]
    seed: u64,
    /// Share of each class's test images in the search set.
    #[arg(long, default_value_t = SearchConfig::DEFAULT_SEARCH_FRAC)]
    search_frac: f64,
    /// Selection images per class (the first N; at most half the class): they choose each
    /// class's best canvas and give the k-sweep and minimal k. A number or `all` (half).
    #[arg(long, default_value_t = format_count(SearchConfig::DEFAULT_SWEEP_PER_CLASS))]
    sweep_per_class: String,
    /// Report images per class for the predictive power at the default k: a number or `all`.
    /// Under cwp they follow the selection images, disjoint from them.
    #[arg(long, default_value_t = format_count(SearchConfig::DEFAULT_EVAL_PER_CLASS))]
    eval_per_class: String,
    /// Predictive power the minimal k must reach.
    #[arg(long, default_value_t = SearchConfig::DEFAULT_THRESHOLD)]
    threshold: f64,
    /// Run only shard I of N (0 <= I < N): unit j of the run goes to shard j % N. Each shard
    /// stores its results and a manifest; `cwp merge` makes the report once all have run.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Memory budget of one search step: bytes with an optional K, M, G or T suffix, e.g. 2G or
    /// 512M (sets how many searches share a forward pass). The search images kept on the
    /// device take at most a quarter more.
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Save the optimisation's state every SECONDS (and on SIGINT/SIGTERM) under OUT/checkpoints;
    /// rerunning the same command continues from it. Never changes a result.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    checkpoint_every: f64,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArg,
}

fn parse_shape(s: &str) -> std::result::Result<[usize; 3], String> {
    let sep = if s.contains(',') { ',' } else { 'x' };
    let v: Vec<usize> = s
        .split(sep)
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("`{s}` is not CxHxW or C,H,W (e.g. 3x32x32)"))?;
    match v.as_slice() {
        [c, h, w] if *c > 0 && *h > 0 && *w > 0 => Ok([*c, *h, *w]),
        _ => Err(format!("`{s}` is not CxHxW or C,H,W (e.g. 3x32x32)")),
    }
}

fn parse_floats(s: &str, option: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("option {option}: `{s}` is not a comma-separated list of numbers"))
}

fn normalization(
    mean: &Option<String>,
    std: &Option<String>,
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    Ok(match (mean, std) {
        (Some(m), Some(s)) => Some((
            parse_floats(m, "--norm-mean")?,
            parse_floats(s, "--norm-std")?,
        )),
        _ => None,
    })
}

/// The backend a command runs on; `auto` says once why it is not a GPU.
fn select_device(spec: &str) -> Result<Device> {
    let (dev, note) = classwise::backend::select_device(spec)?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    Ok(dev)
}

/// The backend of `--device` with its convolutions in `--precision` and
/// `--cpu-forward`.
fn open_device(d: &DeviceArg) -> Result<Device> {
    let p: classwise::backend::Precision = d.precision.parse()?;
    let mut dev = select_device(&d.device)?;
    dev.set_precision(p)?;
    dev.set_cpu_winograd_forward(d.cpu_forward == CpuForward::Winograd);
    Ok(dev)
}

/// Runs `$body` with `$be` bound to the backend of `$dev`.
macro_rules! with_backend {
    ($dev:expr, |$be:ident| $body:expr) => {
        classwise::with_device!($dev, |$be| $body)
    };
}

fn load_model(m: &ModelArgs) -> Result<Model> {
    let opts = LoadOptions {
        arch: m.arch.clone(),
        input: m.input,
        normalization: normalization(&m.norm_mean, &m.norm_std)?,
    };
    Ok(Model::load(&m.weights, &opts)?)
}

fn cmd_zoo(a: &ZooArgs) -> Result<()> {
    let mut rows = Vec::new();
    for arch in zoo::ARCHS {
        let input = ModelSpec::default_input(arch);
        let classes = if *arch == "resnet50_imagenet" {
            1000
        } else {
            10
        };
        let g = zoo::build(&ModelSpec::new(arch, input, classes))?;
        rows.push(serde_json::json!({
            "arch": arch,
            "input": input,
            "classes": classes,
            "params": g.param_count(),
            "flops_per_image": g.flops_per_image(),
        }));
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    outln!(
        "{:<18} {:>12} {:>8} {:>12} {:>14}",
        "arch",
        "input",
        "classes",
        "params",
        "GFLOPs/image"
    );
    for r in &rows {
        let i = &r["input"];
        outln!(
            "{:<18} {:>12} {:>8} {:>12} {:>14.3}",
            r["arch"].as_str().unwrap_or(""),
            format!("{}x{}x{}", i[0], i[1], i[2]),
            r["classes"].as_u64().unwrap_or(0),
            r["params"].as_u64().unwrap_or(0),
            r["flops_per_image"].as_f64().unwrap_or(0.0) / 1e9
        );
    }
    outln!("(input size, channels and classes are configurable; FLOPs = 2 x multiply-adds of the forward pass)");
    Ok(())
}

fn cmd_forward(a: &ForwardArgs) -> Result<()> {
    for (option, path) in [("--input", &a.input_file), ("--weights", &a.model.weights)] {
        if classwise::io::same_file(&a.out, path) {
            bail!(
                "option --out: {} is the same file as {option} {}; writing the output would \
                 destroy the input",
                a.out.display(),
                path.display()
            );
        }
    }
    let model = load_model(&a.model)?;
    let dev = open_device(&a.device)?;
    let res = with_backend!(dev, |be| classwise::forward::forward_file(
        &be,
        &model,
        &a.input_file,
        &a.out
    )?);
    outln!(
        "{}: {} images, mean cross-entropy {:.6}, |dx|max {:.4e}; wrote {}",
        model.graph.arch,
        res.logits.shape()[0],
        res.loss,
        res.dx.max_abs(),
        a.out.display()
    );
    Ok(())
}

fn split_of(s: &str) -> Split {
    if s == "train" {
        Split::Train
    } else {
        Split::Test
    }
}

fn cmd_eval(a: &EvalArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let spec: DataSpec = a.data.parse()?;
    // Bad options are refused before any work starts.
    let trigger = match &a.trigger {
        Some(t) => Some(t.parse::<TriggerSpec>()?.build(model.graph.input)?),
        None => None,
    };
    if let Some(t) = a.target {
        if t >= model.graph.num_classes {
            bail!(
                "option --target: class {t} does not exist (the model has {} classes)",
                model.graph.num_classes
            );
        }
    }
    let attack = a
        .pgd
        .as_deref()
        .map(|s| Attack::parse_pgd(s, "--pgd"))
        .transpose()?;
    if a.batch == 0 {
        bail!("option --batch: must be at least 1");
    }
    if a.pgd_limit == Some(0) {
        bail!("option --pgd-limit: robust accuracy needs at least 1 image");
    }
    let data = data::load(&spec, split_of(&a.split), Some(model.graph.input))?;
    eval::check_fits(&model.graph, &data)?;
    let dev = open_device(&a.device)?;
    with_backend!(dev, |be| run_eval(&be, a, &model, &data, trigger, attack))
}

fn run_eval<B: Backend>(
    be: &B,
    a: &EvalArgs,
    model: &Model,
    data: &data::Dataset,
    trigger: Option<classwise::train::poison::Trigger>,
    attack: Option<Attack>,
) -> Result<()> {
    let dm = DeviceModel::upload(be, &model.graph, &model.params)?
        .with_label(a.model.weights.display().to_string());
    let mut bar = classwise::progress::Progress::new("eval", data.len() as u64, a.json);
    let acc = eval::accuracy(&dm, data, a.batch, |n| bar.inc(n as u64))?;
    bar.finish();
    let asr = match (&trigger, a.target) {
        (Some(t), Some(target)) => Some(eval::attack_success(&dm, data, t, target, a.batch)?),
        _ => None,
    };
    let robust = match &attack {
        Some(att) => {
            let n = a.pgd_limit.unwrap_or(data.len()).min(data.len());
            let mut bar = classwise::progress::Progress::new("pgd", n as u64, a.json);
            let r =
                eval::robust_accuracy(&dm, data, att, a.batch, Some(n), 0, |k| bar.inc(k as u64))?;
            bar.finish();
            Some(r)
        }
        None => None,
    };
    if a.json {
        let report = serde_json::json!({
            "weights": a.model.weights,
            "arch": model.graph.arch,
            "data": data.name(),
            "device": be.name(),
            "class_names": data.class_names(),
            "accuracy": acc,
            "attack_success": asr,
            "robustness": robust,
        });
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    outln!(
        "{} on {} ({} images, {})",
        model.graph.arch,
        data.name(),
        acc.images,
        be.name()
    );
    outln!("accuracy: {:.2}%", 100.0 * acc.accuracy);
    outln!("{:<14} {:>9}", "class", "accuracy");
    for (c, name) in data.class_names().iter().enumerate() {
        outln!("{:<14} {:>8.2}%", name, 100.0 * acc.per_class[c]);
    }
    outln!("confusion matrix (rows: true class, columns: predicted):");
    for row in &acc.confusion {
        outln!(
            "  {}",
            row.iter().map(|v| format!("{v:>5}")).collect::<String>()
        );
    }
    if let Some(s) = asr {
        outln!(
            "attack success rate towards class {}: {:.2}% of {} triggered images (clean images predicted as {}: {:.2}%)",
            s.target,
            100.0 * s.asr,
            s.images,
            s.target,
            100.0 * s.clean_to_target
        );
    }
    if let Some(r) = robust {
        outln!(
            "robust accuracy under PGD (eps {}, step {}, {} steps) on {} images: {:.2}% (clean {:.2}%)",
            r.attack.eps,
            r.attack.step,
            r.attack.steps,
            r.images,
            100.0 * r.robust_accuracy,
            100.0 * r.clean_accuracy
        );
    }
    Ok(())
}

fn cmd_train(a: &TrainArgs) -> Result<()> {
    // Everything is checked before any data is loaded or any step is taken.
    let spec_data: DataSpec = a.data.parse()?;
    if !zoo::ARCHS.contains(&a.arch.as_str()) {
        bail!(
            "option --arch: unknown architecture `{}`; known: {}",
            a.arch,
            zoo::ARCHS.join(", ")
        );
    }
    classwise::io::check_writable(&a.out, "--out")?;
    let schedule = a.schedule.parse::<Schedule>()?;
    let adversarial = a
        .adversarial
        .as_deref()
        .map(|s| Attack::parse_training(s, "--adversarial"))
        .transpose()?;
    let poison_spec = a
        .poison
        .as_deref()
        .map(|p| p.parse::<TriggerSpec>())
        .transpose()?;
    let robust_eval = match (&a.robust_eval, &adversarial) {
        (Some(s), _) => {
            let (att, n) = match s.split_once(':') {
                Some((att, n)) => (
                    att,
                    match n.parse::<usize>() {
                        Ok(n) if n > 0 => n,
                        _ => bail!("option --robust-eval: IMAGES must be a whole number of at least 1, not `{n}`"),
                    },
                ),
                None => (s.as_str(), 1000),
            };
            Some((Attack::parse_pgd(att, "--robust-eval")?, n))
        }
        (None, Some(adv)) => Some((Attack::pgd(adv.eps, adv.eps / 4.0, 20)?, 1000)),
        (None, None) => None,
    };
    let train_full = data::load(&spec_data, Split::Train, a.input)?;
    let test = data::load(&spec_data, Split::Test, Some(train_full.shape()))?;
    let input = a.input.unwrap_or(train_full.shape());
    let spec = ModelSpec {
        arch: a.arch.clone(),
        input,
        num_classes: train_full.num_classes(),
        normalization: normalization(&a.norm_mean, &a.norm_std)?,
    };
    zoo::build(&spec)?;
    let train_set = match a.limit {
        Some(n) if n < train_full.len() => {
            let frac = n as f64 / train_full.len() as f64;
            let idx: Vec<usize> = data::per_class_sample(&train_full.class_indices(), frac, a.seed)
                .into_iter()
                .flatten()
                .collect();
            let mut idx = idx;
            idx.sort_unstable();
            train_full.subset(&idx)
        }
        _ => train_full,
    };
    let poison = match (poison_spec, a.target) {
        (Some(t), Some(target)) => Some(Poisoning {
            trigger: t.build(input)?,
            target,
            rate: a.poison_rate,
        }),
        _ => None,
    };
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        schedule,
        seed: a.seed,
        augment: Augment::parse(&a.augment, input)?,
        poison,
        adversarial,
        robust_eval,
        bn_momentum: 0.1,
        command: command_line(),
        quiet: a.quiet,
    };
    cfg.validate(spec.num_classes)?;
    let dev = open_device(&a.device)?;
    let (model, stats) = with_backend!(dev, |be| train::train(
        &be, &spec, &train_set, &test, &cfg, &a.out, a.resume
    )?);
    let last = stats.last();
    outln!(
        "trained {} ({}) on {} images for {} epochs: test accuracy {:.2}%{}{}; wrote {}",
        model.graph.arch,
        cfg.kind(),
        train_set.len(),
        cfg.epochs,
        100.0 * last.map(|s| s.test_accuracy).unwrap_or(0.0),
        last.and_then(|s| s.asr)
            .map(|v| format!(", ASR {:.2}%", 100.0 * v))
            .unwrap_or_default(),
        model
            .meta
            .extra
            .get("robust_accuracy")
            .map(|v| format!(
                ", robust accuracy {:.2}%",
                100.0 * v.parse::<f64>().unwrap_or(0.0)
            ))
            .unwrap_or_default(),
        a.out.display()
    );
    Ok(())
}

/// `--classes`: None for `all`, else the listed class indices, each once.
fn parse_classes(s: &str) -> Result<Option<Vec<usize>>> {
    if s == "all" {
        return Ok(None);
    }
    let classes: Vec<usize> = s
        .split(',')
        .map(|c| c.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| {
            format!("option --classes: `{s}` is not `all` or a comma list of class indices")
        })?;
    // A class listed twice would be analysed twice and counted as two
    // classes, which shrinks the spread of the statistic the verdict rests
    // on (to zero for `0,0,0,8`): a clean model could be flagged.
    for (i, c) in classes.iter().enumerate() {
        if classes[..i].contains(c) {
            bail!("option --classes: class {c} is listed more than once in `{s}`; list each class once");
        }
    }
    Ok(Some(classes))
}

fn search_config(a: &SearchArgs, model: &Model) -> Result<SearchConfig> {
    let g = &model.graph;
    let protocol = search::Protocol::parse_for(&a.protocol, g.input)?;
    let mut cfg = SearchConfig::defaults_for(g.input, g.num_classes, protocol);
    if let Some(c) = parse_classes(&a.classes)? {
        cfg.classes = c;
    }
    if let Some(canvas) = &a.canvas {
        cfg.canvas = canvas.parse::<Canvases>()?.to_string();
    }
    if let Some(k) = a.top_k {
        cfg.top_k = k;
    }
    cfg.k_sweep = search::pattern::parse_k_sweep(&a.k_sweep, cfg.k_sweep)?;
    cfg.sweep_per_class = parse_count(&a.sweep_per_class, "--sweep-per-class")?;
    cfg.eval_per_class = parse_count(&a.eval_per_class, "--eval-per-class")?;
    if let Some(e) = a.epochs {
        cfg.mask.epochs = e;
    }
    cfg.mask.batch = a.batch;
    cfg.mask.alpha = a.alpha;
    cfg.mask.beta = a.beta;
    cfg.mask.lr = a.lr;
    cfg.mask.seed = a.seed;
    cfg.search_frac = a.search_frac;
    cfg.threshold = a.threshold;
    cfg.max_images = classwise::search::optimize::max_images(
        g,
        units::parse_bytes(&a.memory, "--memory")?,
        a.batch,
    );
    cfg.validate(g.input, g.num_classes)?;
    Ok(cfg)
}

/// Runs `f`, which writes under `out`; when it fails, the folders it created
/// there (`out` itself, missing parents, `out/searches`) are removed again if
/// they are still empty, so a refused or failed run leaves no empty folders.
fn removing_empty_dirs_on_failure<T>(
    out: &std::path::Path,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let mut fresh: Vec<PathBuf> = out
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(std::path::Path::to_path_buf)
        .collect();
    let searches = out.join("searches");
    if !searches.exists() {
        fresh.insert(0, searches);
    }
    let result = f();
    if result.is_err() {
        // Deepest first; `remove_dir` leaves any folder that is not empty.
        for d in &fresh {
            let _ = std::fs::remove_dir(d);
        }
    }
    result
}

fn cmd_search(a: &SearchArgs) -> Result<()> {
    removing_empty_dirs_on_failure(&a.out, || search_into(a))
}

fn search_into(a: &SearchArgs) -> Result<()> {
    let shard = a
        .shard
        .as_deref()
        .map(str::parse::<search::shard::Shard>)
        .transpose()?;
    let model = load_model(&a.model)?;
    let cfg = search_config(a, &model)?;
    let checkpoint_every = std::time::Duration::try_from_secs_f64(a.checkpoint_every)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| {
            format!(
                "option --checkpoint-every: {} is not a positive number of seconds",
                a.checkpoint_every
            )
        })?;
    let spec: DataSpec = a.data.parse()?;
    let ratio = cfg.protocol.resize_ratio();
    let test = data::load_resized(&spec, Split::Test, Some(model.graph.input), ratio)?;
    eval::check_fits(&model.graph, &test)?;
    let train = if cfg.canvas.contains("train:") {
        Some(data::load_resized(
            &spec,
            Split::Train,
            Some(model.graph.input),
            ratio,
        )?)
    } else {
        None
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("option --out: cannot create {}", a.out.display()))?;
    let bytes = std::fs::read(&a.model.weights)
        .with_context(|| format!("{}", a.model.weights.display()))?;
    let inputs = RunInputs {
        model: &model,
        model_id: model.identity(&bytes),
        model_label: a.model.weights.display().to_string(),
        test: &test,
        train: train.as_ref(),
        command: command_line(),
        quiet: a.quiet,
        checkpoint_every: Some(checkpoint_every),
    };
    let dev = open_device(&a.device)?;
    if let Some(shard) = shard {
        let m = with_backend!(dev, |be| search::run_shard(
            &be, &inputs, &cfg, &a.out, shard
        )?);
        let owned = (0..m.header.units.len()).filter(|&j| shard.owns(j)).count();
        outln!(
            "shard {shard}: {} of the run's {} searches are this shard's; searched {} in {:.1}s, {} reused. \
             When every shard has run: cwp merge {}",
            owned,
            m.header.units.len(),
            m.stats.searched,
            m.stats.search_seconds,
            m.stats.reused,
            a.out.display()
        );
        return Ok(());
    }
    let report = with_backend!(dev, |be| search::run(&be, &inputs, &cfg, &a.out)?);
    write_search_outputs(&report, test.class_names(), &a.out)?;
    Ok(())
}

fn cmd_scan(a: &ScanArgs) -> Result<()> {
    use classwise::scan;
    let methods = scan::Method::parse_list(&a.method)?;
    let shard = a
        .shard
        .as_deref()
        .map(str::parse::<search::shard::Shard>)
        .transpose()?;
    let labels = a.labels.as_deref().map(scan::Labels::read).transpose()?;
    let models = scan::list_models(&a.models)?;
    let references = if a.reference.is_empty() {
        Vec::new()
    } else {
        scan::list_models(&a.reference).map_err(|e| match e {
            classwise::Error::Arg { msg, .. } => classwise::Error::arg("--reference", msg),
            other => other,
        })?
    };
    a.canvas.parse::<Canvases>()?;
    if let Some(d) = &a.data {
        d.parse::<DataSpec>()?;
    }
    if a.epochs == Some(0) {
        bail!("option --epochs: at least one epoch is needed");
    }
    if a.nc_steps == Some(0) {
        bail!("option --nc-steps: at least one step is needed");
    }
    if a.eval_per_class == Some(0) {
        bail!("option --eval-per-class: at least one image per class is needed");
    }
    search::pattern::parse_k_sweep(&a.k_sweep, Vec::new())?;
    let opts = scan::ScanOptions {
        methods,
        arch: a.arch.clone(),
        data: a.data.clone(),
        epochs: a.epochs,
        canvas: Some(a.canvas.clone()),
        k_sweep: Some(a.k_sweep.clone()),
        eval_per_class: a.eval_per_class,
        memory: units::parse_bytes(&a.memory, "--memory")?,
        nc_steps: a.nc_steps,
        shard,
        references,
        command: command_line(),
        quiet: a.quiet,
    };
    let dev = open_device(&a.device)?;
    let summary = removing_empty_dirs_on_failure(&a.out, || {
        let mut log = |line: &str| eprintln!("{line}");
        Ok(with_backend!(dev, |be| scan::run(
            &be,
            &models,
            &opts,
            labels.as_ref(),
            &a.out,
            &mut log
        )?))
    })?;
    for r in &summary.rows {
        if let Some(x) = &r.referenced {
            outln!(
                "{} ({}): against {} reference model(s): flagged {:?} (largest anomaly index {})",
                r.model,
                r.method.name(),
                x.references,
                x.flagged,
                x.score.map_or("-".into(), |s| format!("{s:.2}"))
            );
        }
    }
    for d in &summary.detection {
        let p = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        outln!(
            "{}: {} backdoored, {} clean: TPR {}, FPR {}, AUC {}, target accuracy {}, {} s/model",
            d.method,
            d.backdoored,
            d.clean,
            p(d.tpr),
            p(d.fpr),
            d.auc.map_or("-".to_string(), |v| format!("{v:.3}")),
            p(d.target_accuracy),
            d.seconds_per_model
                .map_or("-".to_string(), |v| format!("{v:.1}"))
        );
    }
    outln!(
        "scanned {} (model, method) pair(s), reused {}, failed {}; {} row(s) in {}{}",
        summary.made,
        summary.reused,
        summary.failed,
        summary.rows.len(),
        a.out.join("scan.html").display(),
        if summary.pending.is_empty() {
            String::new()
        } else {
            format!("; {} model(s) still to scan", summary.pending.len())
        }
    );
    if summary.failed > 0 {
        bail!(
            "{} (model, method) pair(s) failed; their errors are in {}",
            summary.failed,
            a.out.join("scan.json").display()
        );
    }
    Ok(())
}

fn cmd_merge(a: &MergeArgs) -> Result<()> {
    let (report, class_names) = search::shard::merge(&a.dirs)?;
    let out = a.out.clone().unwrap_or_else(|| a.dirs[0].clone());
    removing_empty_dirs_on_failure(&out, || {
        std::fs::create_dir_all(&out)
            .with_context(|| format!("option --out: cannot create {}", out.display()))?;
        write_search_outputs(&report, &class_names, &out)
    })
}

fn cmd_cleanse(a: &CleanseArgs) -> Result<()> {
    use classwise::cleanse::{self, CleanseConfig};
    let model = load_model(&a.model)?;
    let g = &model.graph;
    let mut cfg = CleanseConfig::defaults(g.num_classes);
    if let Some(c) = parse_classes(&a.classes)? {
        cfg.classes = c;
    }
    cfg.steps = a.steps;
    cfg.mini_batches = a.mini_batches;
    cfg.batch = a.batch;
    cfg.seed = a.seed;
    cfg.sequential = a.sequential;
    cfg.max_images = classwise::search::optimize::max_images(
        g,
        units::parse_bytes(&a.memory, "--memory")?,
        a.batch,
    );
    let spec: DataSpec = a.data.parse()?;
    let test = data::load(&spec, Split::Test, Some(g.input))?;
    eval::check_fits(g, &test)?;
    cfg.validate(g.num_classes, test.len())?;
    let dev = open_device(&a.device)?;
    let label = a.model.weights.display().to_string();
    removing_empty_dirs_on_failure(&a.out, || {
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("option --out: cannot create {}", a.out.display()))?;
        let report = with_backend!(dev, |be| {
            let dm = DeviceModel::upload(&be, &model.graph, &model.params)?.with_label(&label);
            cleanse::run(&dm, &test, &cfg, &label, a.quiet)?
        });
        cleanse::output::write(&report, test.class_names(), &a.out)?;
        for (r, ai) in report.results.iter().zip(&report.anomaly_index) {
            outln!(
                "class {:>3}: mask L1 {:>8.2}  ASR {:>6.1}%  {}  anomaly index {:>6.2}{}",
                r.class,
                r.l1,
                100.0 * r.asr,
                if r.reached {
                    "reached    "
                } else {
                    "not reached"
                },
                ai,
                if report.flagged.contains(&r.class) {
                    "  FLAGGED"
                } else {
                    ""
                }
            );
        }
        outln!(
            "flagged: {:?}; {:.1}s ({} images through forward and backward); report: {}",
            report.flagged,
            report.seconds,
            report.images,
            a.out.join("cleanse.html").display()
        );
        Ok(())
    })
}

fn cmd_demo(a: &DemoArgs) -> Result<()> {
    let cfg = classwise::demo::DemoConfig {
        epochs: a.epochs,
        canvas: a.canvas.parse::<Canvases>()?.to_string(),
        eval_per_class: parse_count(&a.eval_per_class, "--eval-per-class")?,
        sweep_per_class: parse_count(&a.sweep_per_class, "--sweep-per-class")?,
        quiet: a.quiet,
    };
    if cfg.epochs == 0 {
        bail!("option --epochs: at least one epoch is needed");
    }
    let spec: DataSpec = a.data.parse()?;
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).with_context(|| {
        "the demo needs Fashion-MNIST: `apt-get install dataset-fashion-mnist`, or --data fashion-mnist:DIR"
    })?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("option --out: cannot create {}", a.out.display()))?;
    let start = std::time::Instant::now();
    let dev = open_device(&a.device)?;
    let runs = with_backend!(dev, |be| classwise::demo::run(
        &be,
        &test,
        &cfg,
        &a.out,
        &command_line()
    )?);
    for (label, r) in &runs {
        outln!("== {label}");
        outln!(
            "{}\n",
            classwise::report::terminal_summary(r, test.class_names())
        );
    }
    for note in cfg.notes() {
        outln!("note: {note}");
    }
    outln!(
        "demo finished in {:.0}s; report: {}",
        start.elapsed().as_secs_f64(),
        a.out.join("report.html").display()
    );
    Ok(())
}

/// Writes a run's report files and prints its summary.
fn write_search_outputs(
    report: &RunReport,
    class_names: &[String],
    out: &std::path::Path,
) -> Result<()> {
    classwise::report::write_run(report, class_names, out)?;
    outln!(
        "{}",
        classwise::report::terminal_summary(report, class_names)
    );
    outln!(
        "searched {} pattern(s) in {:.1}s ({:.1} search steps/s, {:.0} images/s through forward+backward; {} reused); report: {}",
        report.searches.len() - report.reused,
        report.search_seconds,
        report.steps_per_second,
        report.images_per_second,
        report.reused,
        out.join("report.html").display()
    );
    Ok(())
}

/// The arguments this process was started with, checked to be UTF-8 (set
/// once in `main`, before any command runs).
static ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// The command line as typed, with the program called `cwp`, each argument
/// shell-quoted so that the stored command can be pasted into a shell.
fn command_line() -> String {
    let args = ARGS.get().map(Vec::as_slice).unwrap_or_default();
    classwise::io::shell_join(std::iter::once("cwp").chain(args.iter().skip(1).map(String::as_str)))
}

/// The process arguments as UTF-8 strings, or an error naming the first
/// that is not (by its option when it is an option's value). Checked before
/// parsing, so a bad argument is refused before any file is touched.
fn utf8_args(args: Vec<std::ffi::OsString>) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    for (i, a) in args.into_iter().enumerate() {
        match a.into_string() {
            Ok(s) => out.push(s),
            Err(a) => {
                let lossy = a.to_string_lossy();
                let what = match (lossy.split_once('='), out.last()) {
                    (Some((opt, _)), _) if opt.starts_with("--") => format!("the value of {opt}"),
                    (_, Some(prev)) if prev.starts_with('-') && !prev.contains('=') => {
                        format!("the value of {prev}")
                    }
                    _ => format!("argument {i}"),
                };
                bail!(
                    "{what} (`{lossy}`, invalid bytes shown as \u{FFFD}) is not valid UTF-8; \
                     cwp takes UTF-8 arguments only (rename the file or folder)"
                );
            }
        }
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Zoo(a) => cmd_zoo(a),
        Cmd::Forward(a) => cmd_forward(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Train(a) => cmd_train(a),
        Cmd::Search(a) => cmd_search(a),
        Cmd::Merge(a) => cmd_merge(a),
        Cmd::Cleanse(a) => cmd_cleanse(a),
        Cmd::Demo(a) => cmd_demo(a),
        Cmd::Selftest(a) => cmd_selftest(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Scan(a) => cmd_scan(a),
        Cmd::Precompile(a) => cmd_precompile(a),
    }
}

fn cmd_selftest(a: &SelftestArgs) -> Result<()> {
    use classwise::selftest::{format_checks, run_suite, SuiteOptions};
    let opts = SuiteOptions {
        ops_only: a.quick,
        batch: a.batch,
        ..SuiteOptions::default()
    };
    let mut progress = |s: &str| eprintln!("selftest: {s}");
    let precision: classwise::backend::Precision = a.precision.parse()?;
    let (name, checks) = match select_device(&a.device)? {
        Device::Cuda(g) => {
            let g = g.with_precision(precision);
            (g.name(), run_suite(&g, &opts, &mut progress))
        }
        Device::Emu(g) => {
            let g = g.with_precision(precision);
            (g.name(), run_suite(&g, &opts, &mut progress))
        }
        Device::Cpu(_) => bail!(
            "option --device: `{}`: selftest compares a GPU backend with the CPU; use cuda[:N] or emu",
            a.device
        ),
    };
    outln!("device: {name}, precision {precision}");
    out!("{}", format_checks(&checks));
    if let Some(path) = &a.json {
        let doc =
            serde_json::json!({ "device": name, "precision": precision.name(), "checks": checks });
        classwise::io::write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    Ok(())
}

fn cmd_bench(a: &BenchArgs) -> Result<()> {
    use classwise::bench::{self, BenchConfig};
    let dev = open_device(&a.device)?;
    let mut cfg = BenchConfig::default_for(!matches!(dev, Device::Cpu(_)));
    if let Some(m) = &a.models {
        cfg.models = bench::parse_plan(m, "--models")?;
    }
    if let Some(s) = &a.search {
        cfg.search = bench::parse_plan(s, "--search")?;
    }
    if let Some(t) = &a.train {
        cfg.train = bench::parse_plan(t, "--train")?;
    }
    if let Some(c) = &a.convs {
        cfg.convs = bench::parse_plan(c, "--convs")?
            .into_iter()
            .map(|(arch, input, n)| (arch, input, n[0]))
            .collect();
    }
    if let Some(s) = a.seconds {
        cfg.seconds = s;
    }
    let report = bench::run(&dev, &cfg, &mut |s| eprintln!("bench: {s}"))?;
    out!("{}", bench::format_report(&report));
    if let Some(path) = &a.json {
        classwise::io::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

fn cmd_precompile(a: &PrecompileArgs) -> Result<()> {
    use classwise::backend::gpu::nvrtc::{self, Nvrtc, Origin};
    let dir = match &a.out {
        Some(d) => d.clone(),
        None => nvrtc::cache_dir().context(
            "option --out: no kernel cache folder (CWP_CACHE_DIR, XDG_CACHE_HOME and HOME are unset)",
        )?,
    };
    let (major, minor) = nvrtc::version()?;
    let known = nvrtc::supported_archs()?;
    for arch in a.arch.split(',').map(str::trim) {
        let cc = arch
            .strip_prefix("sm_")
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|cc| known.contains(cc));
        if cc.is_none() {
            bail!(
                "option --arch: `{arch}`: expected sm_XY with XY one of the architectures this \
                 NVRTC {major}.{minor} compiles for: {known:?}"
            );
        }
        let made = nvrtc::precompile(&Nvrtc, arch, &dir)?;
        let compiled = made.iter().filter(|(_, o)| *o == Origin::Compiled).count();
        outln!(
            "{arch}: {} kernel files in {} ({compiled} compiled by NVRTC {major}.{minor}, {} already there)",
            made.len(),
            dir.display(),
            made.len() - compiled
        );
    }
    Ok(())
}

/// Restores the default SIGPIPE action, which Rust's runtime replaces with
/// "ignore": `cwp zoo | head` then ends quietly instead of failing to print.
#[cfg(unix)]
fn restore_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: installs the default disposition for one signal; no Rust
    // state is involved.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

fn main() -> ExitCode {
    // Before the first large allocation (data, weights), not at the first op.
    classwise::backend::cpu::tune_allocator();
    #[cfg(unix)]
    restore_sigpipe();
    let args = match utf8_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let cli = Cli::parse_from(&args);
    ARGS.get_or_init(|| args);
    // Output still buffered is flushed here, where a failure can be reported.
    let flushed = |()| std::io::stdout().flush().map_err(stdout_error);
    match run(cli).and_then(flushed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints an error and its causes on stderr; the exit status of a failure.
fn fail(e: &anyhow::Error) -> ExitCode {
    // A closed or full stderr leaves nothing to report to: not a panic.
    let _ = writeln!(std::io::stderr(), "error: {e:#}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_utf8_argument_is_named_by_its_option() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(b"r\xffn".to_vec());
        let e = utf8_args(vec!["cwp".into(), "search".into(), "--out".into(), bad()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out") && e.contains("UTF-8"), "{e}");
        let mut joined = OsString::from("--data=folder:");
        joined.push(bad());
        let e = utf8_args(vec!["cwp".into(), "eval".into(), joined])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--data") && e.contains("UTF-8"), "{e}");
        let e = utf8_args(vec!["cwp".into(), "merge".into(), "a".into(), bad()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument 3"), "{e}");
        let ok = utf8_args(vec!["cwp".into(), "zoo".into()]).unwrap();
        assert_eq!(ok, ["cwp", "zoo"]);
    }
}
