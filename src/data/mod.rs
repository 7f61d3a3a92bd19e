//! Datasets: IDX (MNIST, Fashion-MNIST), CIFAR-10 binary, image folders.
//!
//! Every loader produces a [`Dataset`]: images kept as `u8` in memory (CHW per
//! image, a quarter of the memory of `f32`), converted to `[0, 1]` `f32` only
//! when a batch is taken. A data source is named on the command line by a
//! [`DataSpec`] (`fashion-mnist[:DIR]`, `mnist:DIR`, `cifar10:DIR`,
//! `folder:DIR`) and loaded one [`Split`] at a time with [`load`].
//!
//! The search set of the method (a seeded share of every class) comes from
//! [`per_class_sample`]; [`shuffled`] gives the seeded batch order.
//!
//! Malformed input is never a panic: every problem with a file is an
//! [`Error::Format`] (or [`Error::Io`]) naming that file.

pub mod cifar;
pub mod folder;
pub mod idx;
pub mod split;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub use split::{per_class_sample, shuffled};

/// Where Debian's `dataset-fashion-mnist` package puts the data; the default
/// directory of the `fashion-mnist` data spec.
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training images.
    Train,
    /// The held-out images (a folder's `test/` or `val/`).
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// The format of a data source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// Fashion-MNIST in IDX files (28×28 grey, 10 clothing classes).
    FashionMnist,
    /// MNIST in IDX files (28×28 grey, digits 0–9).
    Mnist,
    /// CIFAR-10 binary batches (`cifar-10-batches-bin`, 32×32 RGB).
    Cifar10,
    /// One sub-folder of PNG/JPEG files per class.
    Folder,
}

impl DataKind {
    /// The name used in a data spec (`fashion-mnist`, `mnist`, `cifar10`, `folder`).
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::FashionMnist => "fashion-mnist",
            DataKind::Mnist => "mnist",
            DataKind::Cifar10 => "cifar10",
            DataKind::Folder => "folder",
        }
    }
}

impl fmt::Display for DataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed data spec: `fashion-mnist[:DIR]` (default DIR
/// [`DEFAULT_FASHION_MNIST_DIR`]), `mnist:DIR`, `cifar10:DIR` (the
/// `cifar-10-batches-bin` folder or the folder holding it), `folder:DIR`.
///
/// Displays as `KIND:DIR` (the default directory written out), which parses
/// back to the same spec.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DataSpec {
    /// The format.
    pub kind: DataKind,
    /// The directory holding the files.
    pub dir: PathBuf,
}

impl DataSpec {
    /// A spec from its parts.
    pub fn new(kind: DataKind, dir: impl Into<PathBuf>) -> DataSpec {
        DataSpec {
            kind,
            dir: dir.into(),
        }
    }
}

const SPEC_FORMS: &str = "fashion-mnist[:DIR], mnist:DIR, cifar10:DIR or folder:DIR";

impl FromStr for DataSpec {
    type Err = Error;

    /// Parses `KIND[:DIR]`; the kind is matched case-insensitively and
    /// `fashion_mnist`, `fmnist` and `cifar-10` are accepted as aliases. Only
    /// `fashion-mnist` may leave out its directory.
    fn from_str(s: &str) -> Result<DataSpec> {
        let (kind_str, dir) = match s.split_once(':') {
            Some((k, d)) => (k, Some(d)),
            None => (s, None),
        };
        let kind = match kind_str.trim().to_ascii_lowercase().as_str() {
            "fashion-mnist" | "fashion_mnist" | "fmnist" => DataKind::FashionMnist,
            "mnist" => DataKind::Mnist,
            "cifar10" | "cifar-10" => DataKind::Cifar10,
            "folder" => DataKind::Folder,
            _ => {
                return Err(Error::arg(
                    "--data",
                    format!("unknown data kind `{kind_str}` in `{s}` (expected {SPEC_FORMS})"),
                ))
            }
        };
        let dir = match dir {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            Some(_) => {
                return Err(Error::arg(
                    "--data",
                    format!("`{s}` has an empty directory after `:`"),
                ))
            }
            None if kind == DataKind::FashionMnist => PathBuf::from(DEFAULT_FASHION_MNIST_DIR),
            None => {
                return Err(Error::arg(
                    "--data",
                    format!("`{s}` needs a directory: write `{kind}:DIR`"),
                ))
            }
        };
        Ok(DataSpec { kind, dir })
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.dir.display())
    }
}

/// A labelled image set held as `u8` (CHW per image, images one after
/// another), converted to `[0, 1]` `f32` (v / 255) only at batch time.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    name: String,
    shape: [usize; 3],
    num_classes: usize,
    class_names: Vec<String>,
    images: Vec<u8>,
    labels: Vec<usize>,
}

/// `v / 255` for every byte, so batches cost a table look-up per pixel.
fn u8_to_unit_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    for (v, x) in t.iter_mut().enumerate() {
        *x = v as f32 / 255.0;
    }
    t
}

impl Dataset {
    /// A dataset from its parts. `images` holds `labels.len()` images of
    /// `shape` = `[C, H, W]` each, CHW order; every label must be below
    /// `num_classes`. `class_names` must have `num_classes` entries, or be
    /// empty for the names `0`, `1`, …
    pub fn new(
        name: String,
        shape: [usize; 3],
        num_classes: usize,
        class_names: Vec<String>,
        images: Vec<u8>,
        labels: Vec<usize>,
    ) -> Result<Dataset> {
        let bad = |msg: String| Err(Error::Msg(format!("dataset {name}: {msg}")));
        if shape.contains(&0) {
            return bad(format!("image shape {shape:?} has a zero dimension"));
        }
        if num_classes == 0 {
            return bad("no classes".into());
        }
        let class_names = if class_names.is_empty() {
            (0..num_classes).map(|c| c.to_string()).collect()
        } else {
            class_names
        };
        if class_names.len() != num_classes {
            return bad(format!(
                "{} class names for {num_classes} classes",
                class_names.len()
            ));
        }
        let per = shape[0] * shape[1] * shape[2];
        match labels.len().checked_mul(per) {
            Some(n) if n == images.len() => {}
            _ => {
                return bad(format!(
                    "{} labels need {} bytes of {shape:?} images, got {}",
                    labels.len(),
                    labels.len().saturating_mul(per),
                    images.len()
                ))
            }
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l >= num_classes) {
            return bad(format!(
                "label {l} of image {i} is out of range for {num_classes} classes"
            ));
        }
        Ok(Dataset {
            name,
            shape,
            num_classes,
            class_names,
            images,
            labels,
        })
    }

    /// A human-readable name, e.g.
    /// `fashion-mnist:/usr/share/datasets/fashion-mnist (test)`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image shape `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Number of classes (labels are `0..num_classes`).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The name of each class, by class index.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image (`C·H·W`).
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The label of image `i` (panics when `i >= len()`).
    pub fn label(&self, i: usize) -> usize {
        self.labels[i]
    }

    /// All labels, by image index.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The raw CHW bytes of image `i` (panics when `i >= len()`).
    pub fn image_u8(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Image `i` as a `[C, H, W]` tensor with values `v / 255` in `[0, 1]`
    /// (panics when `i >= len()`).
    pub fn image(&self, i: usize) -> Tensor {
        let [c, h, w] = self.shape;
        self.batch(&[i])
            .reshape(&[c, h, w])
            .expect("one image has C·H·W values")
    }

    /// The images at `idx` (repeats allowed, in that order) as an
    /// `[n, C, H, W]` tensor with values `v / 255` (panics on an index
    /// `>= len()`).
    pub fn batch(&self, idx: &[usize]) -> Tensor {
        let table = u8_to_unit_table();
        let n = self.image_len();
        let mut data = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            data.extend(self.image_u8(i).iter().map(|&v| table[v as usize]));
        }
        let [c, h, w] = self.shape;
        Tensor::new(&[idx.len(), c, h, w], data).expect("batch has n·C·H·W values")
    }

    /// The labels of the images at `idx`, in that order.
    pub fn batch_labels(&self, idx: &[usize]) -> Vec<usize> {
        idx.iter().map(|&i| self.labels[i]).collect()
    }

    /// For each class, the indices of its images in ascending order (an empty
    /// list for a class with no images).
    pub fn class_indices(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.num_classes];
        for (i, &l) in self.labels.iter().enumerate() {
            out[l].push(i);
        }
        out
    }

    /// Number of images of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut out = vec![0; self.num_classes];
        for &l in &self.labels {
            out[l] += 1;
        }
        out
    }

    /// A new dataset of the images at `idx`, in that order (same name, shape
    /// and classes; panics on an index `>= len()`).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let n = self.image_len();
        let mut images = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            images.extend_from_slice(self.image_u8(i));
        }
        Dataset {
            name: self.name.clone(),
            shape: self.shape,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            images,
            labels: self.batch_labels(idx),
        }
    }
}

/// Loads one split of a data source.
///
/// `shape`, when given, is the model's input `[C, H, W]`. IDX and CIFAR data
/// must match it exactly (else an [`Error::Arg`] on `--data` naming the spec,
/// the data's shape and the model's); folder images are converted to it
/// (shorter side resized to fit, centre-cropped; RGB→luma when C = 1,
/// grey→RGB when C = 3), so a folder needs `shape`.
pub fn load(spec: &DataSpec, split: Split, shape: Option<[usize; 3]>) -> Result<Dataset> {
    load_resized(spec, split, shape, 1.0)
}

/// [`load`], with folder images resized so their shorter side is `ratio`
/// times the model's before the centre crop (256/224 for the authors'
/// ImageNet transform; 1 is the plain cover-and-crop). Other formats must
/// already have the model's size, so `ratio` does not touch them. A ratio
/// other than 1 is part of the data set's name, as it changes the pixels.
pub fn load_resized(
    spec: &DataSpec,
    split: Split,
    shape: Option<[usize; 3]>,
    ratio: f64,
) -> Result<Dataset> {
    if !(ratio.is_finite() && ratio >= 1.0) {
        return Err(Error::Msg(format!(
            "{spec}: resize ratio {ratio} must be a number of at least 1"
        )));
    }
    let name = if spec.kind == DataKind::Folder && ratio != 1.0 {
        format!("{spec} ({split}, shorter side ×{ratio:.4} then centre crop)")
    } else {
        format!("{spec} ({split})")
    };
    let raw = match spec.kind {
        DataKind::FashionMnist | DataKind::Mnist => idx::load_dir(spec.kind, &spec.dir, split)?,
        DataKind::Cifar10 => cifar::load_dir(&spec.dir, split)?,
        DataKind::Folder => {
            let shape = shape.ok_or_else(|| {
                Error::arg(
                    "--data",
                    format!(
                        "{spec}: a folder of images needs the model's input shape to resize to"
                    ),
                )
            })?;
            folder::load_dir(&spec.dir, split, shape, ratio)?
        }
    };
    if let Some(model) = shape {
        if model != raw.shape {
            return Err(Error::arg(
                "--data",
                format!(
                    "{spec} has images of shape {:?} (C, H, W) but the model takes {model:?}",
                    raw.shape
                ),
            ));
        }
    }
    Dataset::new(
        name,
        raw.shape,
        raw.class_names.len(),
        raw.class_names,
        raw.images,
        raw.labels,
    )
}

/// What a loader returns: checked data, ready for [`Dataset::new`].
pub(crate) struct RawData {
    pub shape: [usize; 3],
    pub class_names: Vec<String>,
    pub images: Vec<u8>,
    pub labels: Vec<usize>,
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Fails with a format error on `dir` unless it is a directory; the message
/// adds `hint` when the directory is missing.
pub(crate) fn check_dir(dir: &Path, what: &str, hint: &str) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::format(dir, format!("not a directory ({what})"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::format(
            dir,
            format!("no such directory ({what}){hint}"),
        )),
        Err(e) => Err(Error::io(dir, e)),
    }
}

#[cfg(test)]
mod tests;
