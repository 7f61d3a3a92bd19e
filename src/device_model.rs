//! A model's parameters on a backend, run in eval mode: the one handle the
//! search, evaluation, attacks and `cwp forward` share.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::graph::fuse::fuse;
use crate::graph::Graph;
use crate::tensor::Tensor;

/// A model's parameters on a backend, ready to run in eval mode (the
/// search, evaluation and attacks): through the graph's eval-mode fused
/// form ([`crate::graph::fuse`]: BN folded into convolutions, ReLUs and
/// residual adds in their epilogues) on every backend, or, for tests,
/// through the plain graph ([`DeviceModel::generic`]).
pub struct DeviceModel<'a, B: Backend> {
    /// The backend.
    pub be: &'a B,
    /// The graph.
    pub graph: &'a Graph,
    /// The graph's parameters, then (when fused) the folded ones of `fused`.
    params: Vec<B::Buf>,
    /// The eval-mode fused graph that runs, when in use.
    fused: Option<Graph>,
    /// What errors call the model (its file, when the caller gives it).
    label: String,
    /// Forward passes so far, so that a non-finite result names its pass.
    passes: AtomicUsize,
}

impl<'a, B: Backend> DeviceModel<'a, B> {
    /// Uploads host parameters.
    pub fn upload(be: &'a B, graph: &'a Graph, params: &[Tensor]) -> Result<Self> {
        graph.check_params(params)?;
        let params = params
            .iter()
            .map(|t| be.upload(t))
            .collect::<Result<Vec<_>>>()?;
        DeviceModel::new(be, graph, params)
    }

    /// Parameters already on the backend; builds the fused graph and folds
    /// its parameters on the backend, once.
    pub fn new(be: &'a B, graph: &'a Graph, mut params: Vec<B::Buf>) -> Result<Self> {
        if params.len() != graph.params.len() {
            return Err(Error::Msg(format!(
                "{}: {} parameter buffers given, {} needed",
                graph.arch,
                params.len(),
                graph.params.len()
            )));
        }
        let fused = fuse(graph)?;
        let folded = fused.folded_params(be, &params)?;
        params.extend(folded);
        Ok(DeviceModel {
            be,
            graph,
            params,
            fused: Some(fused.graph),
            label: graph.arch.clone(),
            passes: AtomicUsize::new(0),
        })
    }

    /// Always the plain graph, never its fused form (so tests can hold the
    /// two together).
    pub fn generic(be: &'a B, graph: &'a Graph, params: Vec<B::Buf>) -> Self {
        DeviceModel {
            be,
            graph,
            params,
            fused: None,
            label: graph.arch.clone(),
            passes: AtomicUsize::new(0),
        }
    }

    /// Names the model in errors (e.g. by its weights file; the
    /// architecture's name otherwise).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// What errors call the model.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Counts a forward pass; returns its number (from 1).
    fn next_pass(&self) -> usize {
        self.passes.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the fused graph is in use.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// The graph's parameter buffers (in [`Graph::params`] order).
    pub fn params(&self) -> &[B::Buf] {
        &self.params[..self.graph.params.len()]
    }

    /// Gives the graph's parameter buffers back.
    pub fn into_params(mut self) -> Vec<B::Buf> {
        self.params.truncate(self.graph.params.len());
        self.params
    }

    /// The graph that runs and its parameters.
    fn runnable(&self) -> (&Graph, &[B::Buf]) {
        match &self.fused {
            Some(f) => (f, &self.params),
            None => (self.graph, self.params()),
        }
    }

    /// Eval-mode logits of a host batch `[n, C, H, W]`. A NaN or infinite
    /// logit is an error naming the model and the pass: read as a class it
    /// would give a confident wrong answer.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let pass = self.next_pass();
        let xb = self.be.upload(x)?;
        let (graph, params) = self.runnable();
        let y = graph.forward(self.be, params, &xb)?;
        let y = self.be.download(&y)?;
        self.check(pass, "logits", y.data())?;
        Ok(y)
    }

    fn check(&self, pass: usize, what: &str, values: &[f32]) -> Result<()> {
        finite_or_error(values, || {
            format!("model `{}`: {what} of forward pass {pass}", self.label)
        })
    }

    /// Predicted class of each image of a host batch.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<usize>> {
        Ok(self.logits(x)?.argmax_rows())
    }

    /// Per-sample cross-entropy, host logits and the gradient of the
    /// weighted loss with respect to a batch already on the backend
    /// (`weights` as in [`Backend::softmax_cross_entropy`]).
    /// A NaN or infinite loss or logit is an error naming the model and the
    /// pass (see [`check_finite`]).
    pub fn pass(&self, x: B::Buf, labels: &[usize], weights: &[f32]) -> Result<ModelPass<B::Buf>> {
        let pass = self.next_pass();
        crate::backend::check::cross_entropy_args(
            &[labels.len(), self.graph.num_classes],
            labels,
            weights,
        )?;
        let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let labels = self.be.upload_index(&labels)?;
        let weights = self
            .be
            .upload(&Tensor::new(&[weights.len()], weights.to_vec())?)?;
        let out = self.pass_on_device(x, &labels, &weights)?;
        let out = ModelPass {
            losses: self.be.download(&out.losses)?.into_data(),
            logits: self.be.download(&out.logits)?,
            dx: out.dx,
        };
        self.check(pass, "logits", out.logits.data())?;
        self.check(pass, "cross-entropy", &out.losses)?;
        Ok(out)
    }

    /// [`DeviceModel::pass`] with its labels and weights on the device and
    /// everything it gives left there: what a search step runs, so that it
    /// neither copies nor waits. The caller checks finiteness (see
    /// [`Backend::count_nonfinite`]).
    pub fn pass_on_device(
        &self,
        x: B::Buf,
        labels: &B::Index,
        weights: &B::Buf,
    ) -> Result<DevicePass<B::Buf>> {
        let (graph, params) = self.runnable();
        let trace = graph.forward_trace(self.be, params, x)?;
        let (losses, dlogits) =
            self.be
                .softmax_cross_entropy_on_device(trace.logits(), labels, weights)?;
        let dx = graph.backward(self.be, params, &trace, dlogits, false)?.dx;
        let logits = self
            .be
            .reshape(trace.logits(), self.be.shape(trace.logits()))?;
        Ok(DevicePass { losses, logits, dx })
    }

    /// Mean cross-entropy loss and input gradient (eval mode) of a host batch.
    pub fn loss_and_input_grad(&self, x: &Tensor, labels: &[usize]) -> Result<(f32, Tensor)> {
        let n = labels.len();
        let weights = vec![1.0 / n as f32; n];
        let out = self.pass(self.be.upload(x)?, labels, &weights)?;
        let loss = out.losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
        Ok((loss as f32, self.be.download(&out.dx)?))
    }
}

/// What one eval-mode forward and backward pass over a batch gives.
pub struct ModelPass<Buf> {
    /// Per-sample cross-entropy (unweighted).
    pub losses: Vec<f32>,
    /// Logits `[N, K]`.
    pub logits: Tensor,
    /// Gradient of the weighted loss with respect to the input.
    pub dx: Buf,
}

/// [`ModelPass`] left on the device.
pub struct DevicePass<Buf> {
    /// Per-sample cross-entropy `[N]` (unweighted).
    pub losses: Buf,
    /// Logits `[N, K]`.
    pub logits: Buf,
    /// Gradient of the weighted loss with respect to the input.
    pub dx: Buf,
}

/// Fails unless every value is finite: a NaN or infinite logit or loss
/// during a run means the weights overflow (or are corrupt), and every
/// figure computed from it would be meaningless (NaN logits all read as
/// class 0). `what` names the model and the values (e.g. "model `m.safetensors`:
/// logits"), `step` the forward pass or search step they came from; the
/// error gives the first bad element's index.
pub fn check_finite(what: &str, step: usize, values: &[f32]) -> Result<()> {
    finite_or_error(values, || format!("{what} at step {step}"))
}

fn finite_or_error(values: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(untrusted(format!(
            "{}: element {i} is {} ({} of {} values non-finite)",
            what(),
            values[i],
            values.iter().filter(|v| !v.is_finite()).count(),
            values.len()
        ))),
    }
}

/// The error for `bad` non-finite values of `total` counted on the device
/// (see [`crate::backend::Backend::count_nonfinite`]) at a step; `what` as
/// in [`check_finite`].
pub fn nonfinite_error(what: &str, step: usize, bad: usize, total: usize) -> Error {
    untrusted(format!(
        "{what} at step {step}: {bad} of {total} values non-finite"
    ))
}

fn untrusted(found: String) -> Error {
    Error::Msg(format!(
        "{found}; the model overflows or its weights are corrupt, so no result computed from \
         it can be trusted"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finite_passes_finite_values_and_names_the_first_bad_one() {
        check_finite("model `m`: search CE", 3, &[0.0, -1.5, f32::MAX]).unwrap();
        let e = check_finite("model `m`: search CE", 7, &[0.5, f32::INFINITY, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model `m`: search CE at step 7")
                && e.contains("element 1 is inf")
                && e.contains("2 of 3"),
            "{e}"
        );
    }
}
