//! Safetensors in and out: model weights with PyTorch state_dict names
//! (f32, f16 or bf16; `num_batches_tracked` accepted and ignored; a leading
//! `module.` stripped), our own metadata (arch, shapes, normalisation, how
//! trained), and the plain tensor files of `cwp forward`.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::graph::{Graph, ParamKind};
use crate::tensor::{numel, Tensor};
use crate::zoo::{self, ModelSpec};

/// A tensor read from a safetensors file: floating point (converted to f32)
/// or integer (kept as i64, e.g. labels and `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub enum FileTensor {
    /// F32, F16, BF16 or F64 data, as f32.
    Float(Tensor),
    /// I64, I32, U8 (and the like) data, as i64, with its shape.
    Int(Vec<usize>, Vec<i64>),
}

impl FileTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            FileTensor::Float(t) => t.shape(),
            FileTensor::Int(s, _) => s,
        }
    }
}

/// The contents of a safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: BTreeMap<String, FileTensor>,
    /// The header's `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// The float tensor called `name`; an error naming the file and the tensor otherwise.
    pub fn float(&self, name: &str, path: &Path) -> Result<&Tensor> {
        match self.tensors.get(name) {
            Some(FileTensor::Float(t)) => Ok(t),
            Some(FileTensor::Int(..)) => Err(Error::format(
                path,
                format!("tensor `{name}` holds integers, a float tensor is needed"),
            )),
            None => Err(Error::format(path, format!("no tensor called `{name}`"))),
        }
    }

    /// The integer tensor called `name`, with its shape.
    pub fn int(&self, name: &str, path: &Path) -> Result<(&[usize], &[i64])> {
        match self.tensors.get(name) {
            Some(FileTensor::Int(s, v)) => Ok((s, v)),
            Some(FileTensor::Float(_)) => Err(Error::format(
                path,
                format!("tensor `{name}` holds floats, an integer tensor (i64) is needed"),
            )),
            None => Err(Error::format(path, format!("no tensor called `{name}`"))),
        }
    }
}

fn decode(name: &str, view: &TensorView<'_>, path: &Path) -> Result<FileTensor> {
    let bytes = view.data();
    let shape = view.shape().to_vec();
    let le2 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    let t = match view.dtype() {
        Dtype::F32 => FileTensor::Float(Tensor::new(
            &shape,
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        )?),
        Dtype::F16 => FileTensor::Float(Tensor::new(
            &shape,
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(le2(c)).to_f32()).collect(),
        )?),
        Dtype::BF16 => FileTensor::Float(Tensor::new(
            &shape,
            bytes.chunks_exact(2).map(|c| half::bf16::from_bits(le2(c)).to_f32()).collect(),
        )?),
        Dtype::F64 => FileTensor::Float(Tensor::new(
            &shape,
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
                .collect(),
        )?),
        Dtype::I64 => FileTensor::Int(
            shape,
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect(),
        ),
        Dtype::I32 => FileTensor::Int(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4-byte chunk")) as i64)
                .collect(),
        ),
        Dtype::U8 => FileTensor::Int(shape, bytes.iter().map(|&b| b as i64).collect()),
        Dtype::I8 => FileTensor::Int(shape, bytes.iter().map(|&b| b as i8 as i64).collect()),
        other => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has dtype {other:?}; f32, f16, bf16, f64 or integers are supported"),
            ))
        }
    };
    Ok(t)
}

/// Reads every tensor of a safetensors file. A truncated or malformed file
/// is an error naming it.
pub fn read_tensors(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_tensors(&bytes, path)
}

/// Parses safetensors bytes (`path` only names them in errors).
pub fn parse_tensors(bytes: &[u8], path: &Path) -> Result<TensorFile> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file ({e}); is it truncated?"),
        )
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(path, format!("bad safetensors header: {e}")))?;
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        tensors.insert(name.to_string(), decode(name, &view, path)?);
    }
    Ok(TensorFile { tensors, metadata })
}

/// A tensor to write: f32 data or i64 data, with a shape.
pub enum OutTensor<'a> {
    /// Float data written as f32.
    F32(&'a Tensor),
    /// Integer data written as i64.
    I64(Vec<usize>, &'a [i64]),
}

/// Writes tensors and metadata to a safetensors file, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, OutTensor<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| match t {
            OutTensor::F32(t) => (
                name.clone(),
                Dtype::F32,
                t.shape().to_vec(),
                bytemuck::cast_slice(t.data()).to_vec(),
            ),
            OutTensor::I64(s, v) => (
                name.clone(),
                Dtype::I64,
                s.clone(),
                bytemuck::cast_slice(v).to_vec(),
            ),
        })
        .collect();
    let mut views = Vec::with_capacity(bufs.len());
    for (name, dtype, shape, data) in &bufs {
        let v = TensorView::new(*dtype, shape.clone(), data)
            .map_err(|e| Error::tensor(name, format!("cannot serialise: {e}")))?;
        views.push((name.clone(), v));
    }
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Msg(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::io::write_atomic(path, &bytes)
}

/// How a model was trained, as recorded in its metadata.
pub type Training = serde_json::Value;

/// What a weights file says about its model (our metadata keys; all optional
/// so that plain PyTorch exports load too).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMeta {
    /// Architecture name (`arch`).
    pub arch: Option<String>,
    /// Input `[C, H, W]` (`in_channels`, `height`, `width`; `hw` accepted).
    pub input: Option<[usize; 3]>,
    /// Number of classes (`num_classes`).
    pub num_classes: Option<usize>,
    /// Input normalisation inside the model (`norm_mean`, `norm_std`, comma lists).
    pub normalization: Option<(Vec<f32>, Vec<f32>)>,
    /// Every other metadata entry, verbatim (e.g. `training`, `clean_accuracy`).
    pub extra: BTreeMap<String, String>,
}

fn parse_list(s: &str, key: &str, path: &Path) -> Result<Vec<f32>> {
    s.split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .ok()
        .filter(|v| v.iter().all(|x| x.is_finite()))
        .ok_or_else(|| {
            Error::format(
                path,
                format!("metadata `{key}` = `{s}` is not a comma-separated list of finite numbers"),
            )
        })
}

impl ModelMeta {
    /// Reads our keys from a file's metadata; unknown keys go to `extra`.
    pub fn from_metadata(meta: &BTreeMap<String, String>, path: &Path) -> Result<ModelMeta> {
        let num = |key: &str| -> Result<Option<usize>> {
            meta.get(key)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::format(
                            path,
                            format!("metadata `{key}` = `{v}` is not a whole number"),
                        )
                    })
                })
                .transpose()
        };
        let c = num("in_channels")?;
        let hw = num("hw")?;
        let h = num("height")?.or(hw);
        let w = num("width")?.or(hw);
        let input = match (c, h, w) {
            (Some(c), Some(h), Some(w)) => Some([c, h, w]),
            _ => None,
        };
        let normalization = match (meta.get("norm_mean"), meta.get("norm_std")) {
            (Some(m), Some(s)) => Some((
                parse_list(m, "norm_mean", path)?,
                parse_list(s, "norm_std", path)?,
            )),
            (None, None) => None,
            _ => {
                return Err(Error::format(
                    path,
                    "metadata has only one of norm_mean and norm_std",
                ))
            }
        };
        let known = [
            "arch",
            "in_channels",
            "hw",
            "height",
            "width",
            "num_classes",
            "norm_mean",
            "norm_std",
        ];
        let extra = meta
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(ModelMeta {
            arch: meta.get("arch").cloned(),
            input,
            num_classes: num("num_classes")?,
            normalization,
            extra,
        })
    }

    /// The metadata strings to write.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = self.extra.clone();
        if let Some(a) = &self.arch {
            m.insert("arch".into(), a.clone());
        }
        if let Some([c, h, w]) = self.input {
            m.insert("in_channels".into(), c.to_string());
            m.insert("height".into(), h.to_string());
            m.insert("width".into(), w.to_string());
        }
        if let Some(k) = self.num_classes {
            m.insert("num_classes".into(), k.to_string());
        }
        if let Some((mean, std)) = &self.normalization {
            let join = |v: &[f32]| {
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            m.insert("norm_mean".into(), join(mean));
            m.insert("norm_std".into(), join(std));
        }
        m
    }
}

/// A model ready to run: its graph, host parameters and metadata.
#[derive(Clone, Debug)]
pub struct Model {
    /// The architecture graph.
    pub graph: Graph,
    /// One tensor per graph parameter.
    pub params: Vec<Tensor>,
    /// Metadata (as read, or as to be written).
    pub meta: ModelMeta,
    /// The number of training steps per BN (`num_batches_tracked`).
    pub batches_tracked: i64,
}

/// What the caller knows about a model beyond its weights file
/// (`--arch`, `--input`, `--norm-mean/--norm-std` on the CLI).
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Architecture, when the file's metadata does not name it (or to check it).
    pub arch: Option<String>,
    /// Input shape, overriding what the file says or the arch's default.
    pub input: Option<[usize; 3]>,
    /// Normalisation inside the model, when the file does not carry it.
    pub normalization: Option<(Vec<f32>, Vec<f32>)>,
}

fn strip_module(name: &str) -> &str {
    name.strip_prefix("module.").unwrap_or(name)
}

/// Refuses a parameter whose values would make every result meaningless: a
/// NaN or infinity anywhere (one NaN in a conv filter makes every logit NaN,
/// and NaN logits all read as class 0), or a negative BN running variance
/// (its square root is NaN). The error names the file, the tensor and the
/// first bad element (flat index).
fn check_values(data: &[f32], name: &str, kind: ParamKind, path: &Path) -> Result<()> {
    if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` has a non-finite value ({}) at element {i}; the weights are corrupt",
                if v.is_nan() { "NaN" } else { "infinity" }
            ),
        ));
    }
    if kind == ParamKind::BnVar {
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has a negative running variance ({v}) at element {i}; \
                     the weights are corrupt"
                ),
            ));
        }
    }
    Ok(())
}

/// Matches a file's float tensors to a graph's parameters, by name. A
/// missing, unexpected or wrongly shaped tensor is an error naming it (and
/// both shapes), and so is a tensor with a NaN or infinite value or a BN
/// layer with a negative running variance.
pub fn assign(graph: &Graph, file: &TensorFile, path: &Path) -> Result<Vec<Tensor>> {
    let mut by_name: BTreeMap<&str, &FileTensor> = BTreeMap::new();
    for (name, t) in &file.tensors {
        by_name.insert(strip_module(name), t);
    }
    let mut out = Vec::with_capacity(graph.params.len());
    for spec in &graph.params {
        match by_name.remove(spec.name.as_str()) {
            Some(FileTensor::Float(t)) => {
                if t.shape() != spec.shape.as_slice() {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `{}` has shape {:?}, but {} needs {:?}",
                            spec.name,
                            t.shape(),
                            graph.arch,
                            spec.shape
                        ),
                    ));
                }
                check_values(t.data(), &spec.name, spec.kind, path)?;
                out.push(t.clone());
            }
            Some(FileTensor::Int(..)) => {
                return Err(Error::format(
                    path,
                    format!("tensor `{}` holds integers, floats are needed", spec.name),
                ))
            }
            None => {
                return Err(Error::format(
                    path,
                    format!(
                        "missing tensor `{}` (shape {:?}) needed by {}",
                        spec.name, spec.shape, graph.arch
                    ),
                ))
            }
        }
    }
    let unexpected: Vec<&str> = by_name
        .keys()
        .filter(|n| !n.ends_with("num_batches_tracked"))
        .copied()
        .collect();
    if !unexpected.is_empty() {
        let shown: Vec<String> = unexpected
            .iter()
            .take(5)
            .map(|n| format!("`{n}` {:?}", by_name[n].shape()))
            .collect();
        return Err(Error::format(
            path,
            format!(
                "{} unexpected tensor(s) for {}: {}{}",
                unexpected.len(),
                graph.arch,
                shown.join(", "),
                if unexpected.len() > 5 { ", ..." } else { "" }
            ),
        ));
    }
    Ok(out)
}

/// Infers the model spec from metadata, options and (for plain PyTorch
/// exports) the tensors themselves: input channels from the first conv,
/// classes from the last linear layer, smallcnn's input size from `fc1`.
fn infer_spec(
    file: &TensorFile,
    meta: &ModelMeta,
    opts: &LoadOptions,
    path: &Path,
) -> Result<ModelSpec> {
    let arch = match (&opts.arch, &meta.arch) {
        (Some(a), Some(m)) if a != m => {
            return Err(Error::arg(
                "--arch",
                format!(
                    "`{a}` given, but {} says its model is `{m}`",
                    path.display()
                ),
            ))
        }
        (Some(a), _) | (None, Some(a)) => a.clone(),
        (None, None) => {
            return Err(Error::arg(
                "--arch",
                format!(
                    "{} does not name its architecture; pass --arch (one of {})",
                    path.display(),
                    zoo::ARCHS.join(", ")
                ),
            ))
        }
    };
    // An unknown arch: the build names it and lists the known ones.
    zoo::build(&ModelSpec::new(&arch, ModelSpec::default_input(&arch), 10))
        .map_err(|e| blame_the_file(e, opts, path))?;
    let shape_of = |name: &str| -> Option<&[usize]> {
        file.tensors
            .iter()
            .find(|(n, _)| strip_module(n) == name)
            .map(|(_, t)| t.shape())
    };
    let (input, classes) = zoo::fit::spec_from_tensors(&arch, shape_of)
        .unwrap_or((ModelSpec::default_input(&arch), None));
    let input = opts.input.or(meta.input).unwrap_or(input);
    let num_classes = meta.num_classes.or(classes).ok_or_else(|| {
        Error::format(
            path,
            "cannot tell the number of classes: no classifier weight found",
        )
    })?;
    Ok(ModelSpec {
        arch,
        input,
        num_classes,
        normalization: opts
            .normalization
            .clone()
            .or_else(|| meta.normalization.clone()),
    })
}

/// Adds to an error loading `file` as `arch` (from `--arch` or the file's
/// metadata) the zoo architectures its tensors do fit, or that none does:
/// the tensor the error names says little about the cause when the whole
/// checkpoint is of another architecture. Errors of an arch the tensors fit
/// (a bad value, `--input-shape`) are left as they are.
fn name_the_fitting_archs(e: Error, file: &TensorFile, arch: Option<&str>, advise: bool) -> Error {
    let tensors: Vec<(&str, &[usize])> = file
        .tensors
        .iter()
        .filter(|(n, t)| matches!(t, FileTensor::Float(_)) && !n.ends_with("num_batches_tracked"))
        .map(|(n, t)| (strip_module(n), t.shape()))
        .collect();
    let fits = zoo::fit::fitting_specs(&tensors);
    if arch.is_some_and(|a| fits.iter().any(|s| s.arch == a)) {
        return e;
    }
    let hint = match fits.as_slice() {
        [] => format!(
            "; its tensors fit none of the zoo's architectures ({})",
            zoo::ARCHS.join(", ")
        ),
        [one] if advise => format!(
            "; its tensors fit {}: pass --arch {}",
            zoo::fit::describe_fit(one),
            one.arch
        ),
        _ => format!(
            "; its tensors fit {}",
            fits.iter()
                .map(zoo::fit::describe_fit)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    match e {
        Error::Format { path, msg } => Error::Format {
            path,
            msg: msg + &hint,
        },
        Error::Arg { option, msg } => Error::Arg {
            option,
            msg: msg + &hint,
        },
        e => e,
    }
}

/// An error building the model, blamed on the weights file when the value at
/// fault came from its metadata or tensors rather than from an option the
/// user gave (a bad `arch` entry is not the fault of `--arch`).
fn blame_the_file(e: Error, opts: &LoadOptions, path: &Path) -> Error {
    match e {
        Error::Arg { option, msg } => {
            let from_file = match option.as_str() {
                "--arch" => opts.arch.is_none(),
                "--input-shape" => opts.input.is_none(),
                "normalization" => opts.normalization.is_none(),
                // The number of classes always comes from the file.
                "--classes" => true,
                _ => false,
            };
            if from_file {
                Error::format(
                    path,
                    format!("the model its metadata and tensors describe cannot be built: {msg}"),
                )
            } else {
                Error::Arg { option, msg }
            }
        }
        e => e,
    }
}

impl Model {
    /// A stable identity of the model for resumable runs: its file's bytes,
    /// and for an ONNX model also its parameters, which may live in external
    /// data files.
    pub fn identity(&self, bytes: &[u8]) -> String {
        if !crate::onnx::looks_like_onnx(bytes) {
            return crate::io::sha256_hex(&[bytes]);
        }
        let mut parts: Vec<&[u8]> = vec![bytes];
        parts.extend(
            self.params
                .iter()
                .map(|t| bytemuck::cast_slice::<f32, u8>(t.data())),
        );
        crate::io::sha256_hex(&parts)
    }

    /// Loads a model from a safetensors file (see [`Model::from_bytes`]).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Model::from_bytes(&bytes, path, opts)
    }

    /// Loads a model from safetensors bytes (`path` names them in errors):
    /// builds the graph the metadata (or `opts`, or the tensors) describe and
    /// checks every tensor against it.
    pub fn from_bytes(bytes: &[u8], path: &Path, opts: &LoadOptions) -> Result<Model> {
        if crate::onnx::looks_like_onnx(bytes) {
            return Model::from_onnx(bytes, path, opts);
        }
        let file = parse_tensors(bytes, path)?;
        let meta = ModelMeta::from_metadata(&file.metadata, path)?;
        let (spec, graph, params) = infer_spec(&file, &meta, opts, path)
            .and_then(|spec| {
                let graph = zoo::build(&spec).map_err(|e| blame_the_file(e, opts, path))?;
                let params = assign(&graph, &file, path)?;
                Ok((spec, graph, params))
            })
            .map_err(|e| {
                let arch = opts.arch.as_deref().or(meta.arch.as_deref());
                name_the_fitting_archs(e, &file, arch, meta.arch.is_none())
            })?;
        let batches_tracked = file
            .tensors
            .iter()
            .find_map(|(n, t)| match t {
                FileTensor::Int(_, v) if n.ends_with("num_batches_tracked") => v.first().copied(),
                _ => None,
            })
            .unwrap_or(0);
        let meta = ModelMeta {
            arch: Some(spec.arch.clone()),
            input: Some(spec.input),
            num_classes: Some(spec.num_classes),
            normalization: spec.normalization.clone(),
            extra: meta.extra,
        };
        Ok(Model {
            graph,
            params,
            meta,
            batches_tracked,
        })
    }

    /// Imports an ONNX model (see [`crate::onnx`]): the graph is the file's
    /// own, so `--arch` and `--norm-mean/--norm-std` are refused rather than
    /// silently ignored; `opts.input` fills symbolic input axes. Notes on
    /// what the import removed (a trailing Softmax) go to stderr.
    pub fn from_onnx(bytes: &[u8], path: &Path, opts: &LoadOptions) -> Result<Model> {
        if let Some(a) = &opts.arch {
            return Err(Error::arg(
                "--arch",
                format!(
                    "`{a}` given, but {} is an ONNX model, which carries its own graph; leave --arch out",
                    path.display()
                ),
            ));
        }
        if opts.normalization.is_some() {
            return Err(Error::arg(
                "--norm-mean",
                format!(
                    "{} is an ONNX model: its input normalisation is part of its graph; leave --norm-mean/--norm-std out",
                    path.display()
                ),
            ));
        }
        let imported = crate::onnx::import(bytes, path, opts.input)?;
        for note in &imported.notes {
            eprintln!("note: {}: {note}", path.display());
        }
        let graph = imported.graph;
        let mut extra = BTreeMap::new();
        extra.insert("source".to_string(), "onnx".to_string());
        let meta = ModelMeta {
            arch: Some(graph.arch.clone()),
            input: Some(graph.input),
            num_classes: Some(graph.num_classes),
            normalization: graph.normalization().map(|(m, s)| (m.to_vec(), s.to_vec())),
            extra,
        };
        Ok(Model {
            graph,
            params: imported.params,
            meta,
            batches_tracked: 0,
        })
    }

    /// A model with the given parameters; metadata filled from the graph.
    pub fn new(spec: &ModelSpec, params: Vec<Tensor>) -> Result<Model> {
        let graph = zoo::build(spec)?;
        graph.check_params(&params)?;
        Ok(Model {
            meta: ModelMeta {
                arch: Some(spec.arch.clone()),
                input: Some(spec.input),
                num_classes: Some(spec.num_classes),
                normalization: spec.normalization.clone(),
                extra: BTreeMap::new(),
            },
            graph,
            params,
            batches_tracked: 0,
        })
    }

    /// The spec this model was built from.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            arch: self.graph.arch.clone(),
            input: self.graph.input,
            num_classes: self.graph.num_classes,
            normalization: self
                .graph
                .normalization()
                .map(|(m, s)| (m.to_vec(), s.to_vec())),
        }
    }

    /// Saves the model as f32 safetensors with PyTorch names (and
    /// `num_batches_tracked` for each BN) and our metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tracked = [self.batches_tracked];
        let mut entries: Vec<(String, OutTensor<'_>)> = Vec::new();
        for (spec, t) in self.graph.params.iter().zip(&self.params) {
            if numel(&spec.shape) != t.len() {
                return Err(Error::shape(&spec.name, &spec.shape, t.shape()));
            }
            entries.push((spec.name.clone(), OutTensor::F32(t)));
            if spec.kind == ParamKind::BnVar {
                let prefix = spec.name.trim_end_matches("running_var");
                entries.push((
                    format!("{prefix}num_batches_tracked"),
                    OutTensor::I64(vec![], &tracked),
                ));
            }
        }
        write_tensors(path, &entries, &self.meta.to_metadata())
    }
}
