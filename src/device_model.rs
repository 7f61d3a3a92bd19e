//! A model's parameters on a backend, run in eval mode: the one handle the
//! search, evaluation, attacks and `cwp forward` share.

use crate::backend::{Backend, EvalRunner};
use crate::error::Result;
use crate::graph::Graph;
use crate::tensor::Tensor;

/// A model's parameters on a backend, ready to run in eval mode (the
/// search, evaluation and attacks): through the backend's own runner when it
/// has one (the GPU's fused path), else through the generic graph runner.
pub struct DeviceModel<'a, B: Backend> {
    /// The backend.
    pub be: &'a B,
    /// The graph.
    pub graph: &'a Graph,
    /// One buffer per graph parameter.
    pub params: Vec<B::Buf>,
    runner: Option<Box<dyn EvalRunner<B::Buf> + 'a>>,
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

    /// Parameters already on the backend; prepares the backend's own runner.
    pub fn new(be: &'a B, graph: &'a Graph, params: Vec<B::Buf>) -> Result<Self> {
        let runner = be.eval_runner(graph, &params)?;
        Ok(DeviceModel {
            be,
            graph,
            params,
            runner,
        })
    }

    /// Always the generic graph runner, never the backend's own (so tests
    /// can hold the two together).
    pub fn generic(be: &'a B, graph: &'a Graph, params: Vec<B::Buf>) -> Self {
        DeviceModel {
            be,
            graph,
            params,
            runner: None,
        }
    }

    /// Whether the backend's own runner is in use.
    pub fn is_native(&self) -> bool {
        self.runner.is_some()
    }

    /// Gives the parameter buffers back.
    pub fn into_params(self) -> Vec<B::Buf> {
        self.params
    }

    /// Eval-mode logits of a host batch `[n, C, H, W]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let xb = self.be.upload(x)?;
        let y = match &self.runner {
            Some(r) => r.logits(&xb)?,
            None => self.graph.forward(self.be, &self.params, &xb)?,
        };
        self.be.download(&y)
    }

    /// Predicted class of each image of a host batch.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<usize>> {
        Ok(self.logits(x)?.argmax_rows())
    }

    /// Per-sample cross-entropy, host logits and the gradient of the
    /// weighted loss with respect to a batch already on the backend
    /// (`weights` as in [`Backend::softmax_cross_entropy`]).
    pub fn pass(&self, x: B::Buf, labels: &[usize], weights: &[f32]) -> Result<ModelPass<B::Buf>> {
        if let Some(r) = &self.runner {
            let (losses, logits, dx) = r.loss_and_input_grad(&x, labels, weights)?;
            return Ok(ModelPass {
                losses,
                logits: self.be.download(&logits)?,
                dx,
            });
        }
        let trace = self.graph.forward_trace(self.be, &self.params, x)?;
        let (losses, dlogits) = self
            .be
            .softmax_cross_entropy(trace.logits(), labels, weights)?;
        let logits = self.be.download(trace.logits())?;
        let dx = self
            .graph
            .backward(self.be, &self.params, &trace, dlogits, false)?
            .dx;
        Ok(ModelPass { losses, logits, dx })
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
