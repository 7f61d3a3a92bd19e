//! The model zoo: architectures built as [`Graph`]s whose parameter names and
//! shapes are exactly those of the PyTorch reference definitions, so a
//! checkpoint saved from PyTorch loads without renaming.

pub mod fit;
mod resnet;
mod small;

use crate::error::{Error, Result};
use crate::graph::{Builder, Graph};

/// Every architecture the zoo builds, by its CLI name.
pub const ARCHS: &[&str] = &[
    "smallcnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "preact_resnet18",
    "vgg16",
    "wrn28_10",
    "resnet50_imagenet",
];

/// What to build: an architecture for an input shape and a class count,
/// optionally with a per-channel input normalisation as its first layer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Architecture name, one of [`ARCHS`].
    pub arch: String,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Number of classes.
    pub num_classes: usize,
    /// `(mean, std)` per input channel, applied inside the model.
    pub normalization: Option<(Vec<f32>, Vec<f32>)>,
}

impl ModelSpec {
    /// A spec without normalisation.
    pub fn new(arch: &str, input: [usize; 3], num_classes: usize) -> ModelSpec {
        ModelSpec {
            arch: arch.to_string(),
            input,
            num_classes,
            normalization: None,
        }
    }

    /// The input an architecture is usually trained at: 1×28×28 for
    /// smallcnn, 3×224×224 for resnet50_imagenet, 3×32×32 otherwise.
    pub fn default_input(arch: &str) -> [usize; 3] {
        match arch {
            "smallcnn" => [1, 28, 28],
            "resnet50_imagenet" => [3, 224, 224],
            _ => [3, 32, 32],
        }
    }
}

/// Builds the graph of a model spec.
pub fn build(spec: &ModelSpec) -> Result<Graph> {
    let [c, h, w] = spec.input;
    if c == 0 || h == 0 || w == 0 {
        return Err(Error::arg(
            "--input-shape",
            format!("input shape {:?} has a zero extent", spec.input),
        ));
    }
    if spec.num_classes < 2 {
        return Err(Error::arg(
            "--classes",
            "a classifier needs at least 2 classes",
        ));
    }
    let mut b = Builder::new(&spec.arch, spec.input, spec.num_classes);
    let mut x = b.input();
    if let Some((mean, std)) = &spec.normalization {
        if mean.len() != c || std.len() != c {
            return Err(Error::arg(
                "normalization",
                format!(
                    "{} means and {} stds for {c} input channels",
                    mean.len(),
                    std.len()
                ),
            ));
        }
        if std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return Err(Error::arg(
                "normalization",
                "every std must be a positive number",
            ));
        }
        x = b.normalize(x, mean.clone(), std.clone());
    }
    let k = spec.num_classes;
    match spec.arch.as_str() {
        "smallcnn" => small::smallcnn(&mut b, x, k)?,
        "vgg16" => small::vgg16(&mut b, x, k)?,
        "resnet18" => resnet::cifar_resnet(&mut b, x, resnet::Block::Basic, [2, 2, 2, 2], k)?,
        "resnet34" => resnet::cifar_resnet(&mut b, x, resnet::Block::Basic, [3, 4, 6, 3], k)?,
        "resnet50" => resnet::cifar_resnet(&mut b, x, resnet::Block::Bottleneck, [3, 4, 6, 3], k)?,
        "preact_resnet18" => {
            resnet::cifar_resnet(&mut b, x, resnet::Block::PreAct, [2, 2, 2, 2], k)?
        }
        "wrn28_10" => resnet::wide_resnet(&mut b, x, 28, 10, k)?,
        "resnet50_imagenet" => resnet::imagenet_resnet50(&mut b, x, k)?,
        other => {
            return Err(Error::arg(
                "--arch",
                format!(
                    "unknown architecture `{other}`; known: {}",
                    ARCHS.join(", ")
                ),
            ))
        }
    };
    Ok(b.finish())
}
