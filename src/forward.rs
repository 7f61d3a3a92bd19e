//! `cwp forward`: logits, mean cross-entropy and input gradient of a model on
//! a tensor file, so a user can check a converted PyTorch model against
//! PyTorch's own outputs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::weights::{read_tensors, write_tensors, Model, OutTensor};
use crate::Tensor;

/// What `cwp forward` computes.
pub struct ForwardOutput {
    /// `[N, classes]`.
    pub logits: Tensor,
    /// Mean cross-entropy over the batch.
    pub loss: f32,
    /// d loss / d x, `[N, C, H, W]`.
    pub dx: Tensor,
}

/// Runs the model on `x` (labels `y`) in eval mode.
pub fn forward<B: Backend>(
    be: &B,
    model: &Model,
    x: &Tensor,
    y: &[usize],
) -> Result<ForwardOutput> {
    // The plain graph, exactly as the model is defined: no fused copy to
    // build and fold.
    model.graph.check_params(&model.params)?;
    let params = model
        .params
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<Vec<_>>>()?;
    let trace = model.graph.forward_trace(be, &params, be.upload(x)?)?;
    let n = y.len();
    let (losses, dlogits) =
        be.softmax_cross_entropy(trace.logits(), y, &vec![1.0 / n as f32; n])?;
    let logits = be.download(trace.logits())?;
    let grads = model.graph.backward(be, &params, &trace, dlogits, false)?;
    let loss = (losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64) as f32;
    Ok(ForwardOutput {
        logits,
        loss,
        dx: be.download(&grads.dx)?,
    })
}

/// Reads `x` (f32 NCHW) and `y` (integers) from `input`, runs [`forward`],
/// and writes `logits`, `loss` and `dx` to `out` (atomically).
pub fn forward_file<B: Backend>(
    be: &B,
    model: &Model,
    input: &Path,
    out: &Path,
) -> Result<ForwardOutput> {
    let file = read_tensors(input)?;
    let x = file.float("x", input)?;
    let want = model
        .graph
        .input_shape(x.shape().first().copied().unwrap_or(0));
    if x.shape() != want.as_slice() {
        return Err(Error::format(
            input,
            format!(
                "tensor `x` has shape {:?}; the model needs {:?}",
                x.shape(),
                want
            ),
        ));
    }
    let (yshape, yv) = file.int("y", input)?;
    if yshape != [want[0]] {
        return Err(Error::format(
            input,
            format!(
                "tensor `y` has shape {yshape:?}; {} labels are needed",
                want[0]
            ),
        ));
    }
    let k = model.graph.num_classes;
    let y =
        yv.iter()
            .map(|&v| {
                usize::try_from(v).ok().filter(|&c| c < k).ok_or_else(|| {
                    Error::format(input, format!("label {v} in `y` is outside 0..{k}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
    let res = forward(be, model, x, &y)?;
    let loss = Tensor::new(&[1], vec![res.loss])?;
    let mut meta = BTreeMap::new();
    meta.insert("arch".to_string(), model.graph.arch.clone());
    meta.insert("backend".to_string(), be.name());
    write_tensors(
        out,
        &[
            ("logits".to_string(), OutTensor::F32(&res.logits)),
            ("loss".to_string(), OutTensor::F32(&loss)),
            ("dx".to_string(), OutTensor::F32(&res.dx)),
        ],
        &meta,
    )?;
    Ok(res)
}
