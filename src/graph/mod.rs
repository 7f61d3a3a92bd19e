//! A model as a list of nodes in topological order, and the runner that
//! executes it on any [`Backend`](crate::backend::Backend): forward (eval
//! or train mode) keeping what backward needs, and backward returning the
//! input gradient and, on request, every parameter gradient.

pub mod fuse;
mod run;

pub use run::{Grads, Mode, ParamGrads, Trace};

use crate::backend::{Activation, ConvParams, Pad2d, PoolParams};
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};

/// Index of a parameter tensor in [`Graph::params`].
pub type ParamId = usize;

/// What a parameter tensor is, which decides its initialisation, whether it
/// decays during training and whether it is trained at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A convolution filter `[O, C, KH, KW]`.
    ConvWeight,
    /// A linear layer's matrix `[O, K]`.
    LinearWeight,
    /// A conv or linear bias `[O]`.
    Bias,
    /// BN scale (gamma).
    BnWeight,
    /// BN shift (beta).
    BnBias,
    /// BN running mean (a buffer, not trained by gradient).
    BnMean,
    /// BN running variance (a buffer, not trained by gradient).
    BnVar,
}

impl ParamKind {
    /// True for tensors that gradients update (not BN running statistics).
    pub fn trainable(self) -> bool {
        !matches!(self, ParamKind::BnMean | ParamKind::BnVar)
    }

    /// True for tensors that take weight decay (conv and linear weights only).
    pub fn decays(self) -> bool {
        matches!(self, ParamKind::ConvWeight | ParamKind::LinearWeight)
    }
}

/// One named parameter tensor of a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// The PyTorch state_dict name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its role.
    pub kind: ParamKind,
}

/// The operation of a node.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// The model input `[N, C, H, W]`.
    Input,
    /// Per-channel `(x - mean) / std`, the model's own input normalisation.
    Normalize { mean: Vec<f32>, std: Vec<f32> },
    /// 2-D convolution.
    Conv {
        w: ParamId,
        b: Option<ParamId>,
        p: ConvParams,
    },
    /// A convolution with its epilogue fused: `relu?(conv(x) + b + residual)`,
    /// the residual being the node's second input when it has one. Made
    /// only by the eval-mode pass [`fuse::fuse`]; it has no parameter
    /// gradients.
    FusedConv {
        w: ParamId,
        b: Option<ParamId>,
        p: ConvParams,
        relu: bool,
    },
    /// Batch normalisation (running statistics in eval mode).
    BatchNorm {
        gamma: ParamId,
        beta: ParamId,
        mean: ParamId,
        var: ParamId,
        eps: f32,
    },
    /// `max(x, 0)`.
    Relu,
    /// Elementwise sum of two inputs (residual connections).
    Add,
    /// Max pooling.
    MaxPool(PoolParams),
    /// Average pooling.
    AvgPool(PoolParams),
    /// Mean over H and W, giving `[N, C]`.
    GlobalAvgPool,
    /// `[N, C, H, W] -> [N, C*H*W]`.
    Flatten,
    /// Fully connected layer.
    Linear { w: ParamId, b: Option<ParamId> },
    /// An elementwise activation (sigmoid, SiLU, hard sigmoid, hard swish,
    /// clip, leaky ReLU).
    Act(Activation),
    /// Elementwise product of two inputs; the second has the first's shape
    /// or is a per-channel gate `[C, 1, 1]` / `[C]` broadcast over H, W.
    Mul,
    /// Per-channel constant `x * scale[c] + shift[c]` (1 value or C each):
    /// ONNX's Add/Sub/Mul/Div by constants.
    Affine { scale: Vec<f32>, shift: Vec<f32> },
    /// Concatenation of two or more inputs on the channel axis.
    Concat,
    /// Zero padding of H and W.
    Pad {
        top: usize,
        bottom: usize,
        left: usize,
        right: usize,
    },
}

/// A node: an op, the nodes it reads, and its per-image output shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Indices of the input nodes (earlier in the list).
    pub inputs: Vec<usize>,
    /// Output shape without the batch axis.
    pub shape: Vec<usize>,
}

/// A model: nodes in topological order, the last one giving the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// Architecture name (as in the zoo).
    pub arch: String,
    /// Input shape `[C, H, W]`.
    pub input: [usize; 3],
    /// Number of classes (size of the logits).
    pub num_classes: usize,
    /// The nodes; node 0 is the input.
    pub nodes: Vec<Node>,
    /// The parameter tensors, in PyTorch registration order.
    pub params: Vec<ParamSpec>,
}

impl Graph {
    /// Index of the parameter called `name`.
    pub fn param_id(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name)
    }

    /// Number of trainable scalars (PyTorch's `sum(p.numel() for p in parameters())`).
    pub fn param_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.kind.trainable())
            .map(|p| numel(&p.shape))
            .sum()
    }

    /// Multiply-adds times two of one image's forward pass (convs and linears).
    pub fn flops_per_image(&self) -> u64 {
        let mut total = 0u64;
        for node in &self.nodes {
            let out = numel(&node.shape) as u64;
            match &node.op {
                Op::Conv { w, .. } | Op::FusedConv { w, .. } => {
                    let s = &self.params[*w].shape;
                    total += 2 * out * (s[1] * s[2] * s[3]) as u64;
                }
                Op::Linear { w, .. } => {
                    total += 2 * out * self.params[*w].shape[1] as u64;
                }
                _ => {}
            }
        }
        total
    }

    /// The state_dict entries a PyTorch checkpoint of this model holds, in
    /// order: every parameter, plus `num_batches_tracked` (shape `[]`) after
    /// each BN's running variance.
    pub fn state_dict_entries(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push((p.name.clone(), p.shape.clone()));
            if p.kind == ParamKind::BnVar {
                let prefix = p.name.trim_end_matches("running_var");
                out.push((format!("{prefix}num_batches_tracked"), vec![]));
            }
        }
        out
    }

    /// The model's input normalisation, if its first op is one.
    pub fn normalization(&self) -> Option<(&[f32], &[f32])> {
        self.nodes.iter().find_map(|n| match &n.op {
            Op::Normalize { mean, std } => Some((mean.as_slice(), std.as_slice())),
            _ => None,
        })
    }

    /// Checks that host parameters match the graph's names and shapes.
    pub fn check_params(&self, params: &[Tensor]) -> Result<()> {
        if params.len() != self.params.len() {
            return Err(Error::Msg(format!(
                "{} expects {} parameter tensors, got {}",
                self.arch,
                self.params.len(),
                params.len()
            )));
        }
        for (spec, t) in self.params.iter().zip(params) {
            crate::error::check_shape(&spec.name, &spec.shape, t.shape())?;
        }
        Ok(())
    }

    /// Shape of a batch of `n` inputs, `[n, C, H, W]`.
    pub fn input_shape(&self, n: usize) -> Vec<usize> {
        vec![n, self.input[0], self.input[1], self.input[2]]
    }
}

/// Builds a [`Graph`] node by node, tracking shapes and registering
/// parameters under their PyTorch names.
pub struct Builder {
    graph: Graph,
}

impl Builder {
    /// A graph with only its input node.
    pub fn new(arch: &str, input: [usize; 3], num_classes: usize) -> Builder {
        Builder {
            graph: Graph {
                arch: arch.to_string(),
                input,
                num_classes,
                nodes: vec![Node {
                    op: Op::Input,
                    inputs: vec![],
                    shape: input.to_vec(),
                }],
                params: vec![],
            },
        }
    }

    /// The input node's index.
    pub fn input(&self) -> usize {
        0
    }

    /// Output shape (per image) of node `x`.
    pub fn shape(&self, x: usize) -> &[usize] {
        &self.graph.nodes[x].shape
    }

    fn param(&mut self, name: String, shape: Vec<usize>, kind: ParamKind) -> ParamId {
        self.graph.params.push(ParamSpec { name, shape, kind });
        self.graph.params.len() - 1
    }

    fn push(&mut self, op: Op, inputs: Vec<usize>, shape: Vec<usize>) -> usize {
        self.graph.nodes.push(Node { op, inputs, shape });
        self.graph.nodes.len() - 1
    }

    /// Registers a parameter under a name of the caller's choosing
    /// (importers keep the file's own tensor names).
    pub fn add_param(&mut self, name: &str, shape: Vec<usize>, kind: ParamKind) -> ParamId {
        self.param(name.to_string(), shape, kind)
    }

    /// Appends a node whose per-image output shape the caller computed
    /// (importers, which check shapes against the file themselves).
    pub fn add_node(&mut self, op: Op, inputs: Vec<usize>, shape: Vec<usize>) -> usize {
        self.push(op, inputs, shape)
    }

    /// Number of nodes so far (the next node's index).
    pub fn node_count(&self) -> usize {
        self.graph.nodes.len()
    }

    /// Per-channel input normalisation.
    pub fn normalize(&mut self, x: usize, mean: Vec<f32>, std: Vec<f32>) -> usize {
        let shape = self.shape(x).to_vec();
        self.push(Op::Normalize { mean, std }, vec![x], shape)
    }

    /// A square `k`×`k` convolution called `name` (`name.weight`, `name.bias`).
    /// `p.groups` and `p.dilation` give grouped (depthwise when `groups` is
    /// the input's channel count) and dilated convolutions; the weight is
    /// `[out_ch, C/groups, k, k]`.
    pub fn conv(
        &mut self,
        x: usize,
        name: &str,
        out_ch: usize,
        k: usize,
        p: ConvParams,
        bias: bool,
    ) -> Result<usize> {
        let s = self.shape(x).to_vec();
        let (pad, span) = (p.pad, p.span(k));
        if s.len() != 3 || s[1] + 2 * pad < span || s[2] + 2 * pad < span {
            return Err(Error::Msg(format!(
                "{}: conv `{name}` ({k}x{k}, pad {pad}, dilation {}) does not fit its input {s:?}; the input is too small for this architecture",
                self.graph.arch, p.dilation
            )));
        }
        if p.stride == 0 || p.groups == 0 || p.dilation == 0 {
            return Err(Error::Msg(format!(
                "{}: conv `{name}`: stride, groups and dilation must be at least 1, got {p:?}",
                self.graph.arch
            )));
        }
        if !s[0].is_multiple_of(p.groups) || !out_ch.is_multiple_of(p.groups) {
            return Err(Error::Msg(format!(
                "{}: conv `{name}`: {} groups must divide both its {} input channels and its {out_ch} output channels",
                self.graph.arch, p.groups, s[0]
            )));
        }
        let w = self.param(
            format!("{name}.weight"),
            vec![out_ch, s[0] / p.groups, k, k],
            ParamKind::ConvWeight,
        );
        let b = bias.then(|| self.param(format!("{name}.bias"), vec![out_ch], ParamKind::Bias));
        let shape = vec![out_ch, p.out_len(s[1], k), p.out_len(s[2], k)];
        Ok(self.push(Op::Conv { w, b, p }, vec![x], shape))
    }

    /// Batch norm called `name` (weight, bias, running_mean, running_var), eps 1e-5.
    pub fn bn(&mut self, x: usize, name: &str) -> usize {
        let c = self.shape(x)[0];
        let gamma = self.param(format!("{name}.weight"), vec![c], ParamKind::BnWeight);
        let beta = self.param(format!("{name}.bias"), vec![c], ParamKind::BnBias);
        let mean = self.param(format!("{name}.running_mean"), vec![c], ParamKind::BnMean);
        let var = self.param(format!("{name}.running_var"), vec![c], ParamKind::BnVar);
        let shape = self.shape(x).to_vec();
        self.push(
            Op::BatchNorm {
                gamma,
                beta,
                mean,
                var,
                eps: 1e-5,
            },
            vec![x],
            shape,
        )
    }

    /// ReLU.
    pub fn relu(&mut self, x: usize) -> usize {
        let shape = self.shape(x).to_vec();
        self.push(Op::Relu, vec![x], shape)
    }

    /// `a + b` (shapes must agree).
    pub fn add(&mut self, a: usize, b: usize) -> Result<usize> {
        if self.shape(a) != self.shape(b) {
            return Err(Error::Msg(format!(
                "{}: residual shapes differ: {:?} vs {:?}",
                self.graph.arch,
                self.shape(a),
                self.shape(b)
            )));
        }
        let shape = self.shape(a).to_vec();
        Ok(self.push(Op::Add, vec![a, b], shape))
    }

    fn pool_shape(&self, x: usize, p: PoolParams) -> Result<Vec<usize>> {
        let s = self.shape(x);
        if s[1] + 2 * p.pad < p.kernel || s[2] + 2 * p.pad < p.kernel {
            return Err(Error::Msg(format!(
                "{}: a {}x{} pool does not fit its input {s:?}; the input is too small for this architecture",
                self.graph.arch, p.kernel, p.kernel
            )));
        }
        if p.kernel == 0 || p.stride == 0 || 2 * p.pad > p.kernel {
            return Err(Error::Msg(format!(
                "{}: pool {p:?}: kernel and stride must be at least 1 and the padding at most half the kernel",
                self.graph.arch
            )));
        }
        Ok(vec![s[0], p.out_len(s[1]), p.out_len(s[2])])
    }

    /// Max pooling (floor mode).
    pub fn max_pool(
        &mut self,
        x: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<usize> {
        self.max_pool_with(x, PoolParams::new(kernel, stride, pad))
    }

    /// Max pooling with every option of [`PoolParams`] (`ceil_mode`).
    pub fn max_pool_with(&mut self, x: usize, p: PoolParams) -> Result<usize> {
        let shape = self.pool_shape(x, p)?;
        Ok(self.push(Op::MaxPool(p), vec![x], shape))
    }

    /// Average pooling (floor mode, padding counted in the divisor).
    pub fn avg_pool(
        &mut self,
        x: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<usize> {
        self.avg_pool_with(x, PoolParams::new(kernel, stride, pad))
    }

    /// Average pooling with every option of [`PoolParams`] (`ceil_mode`,
    /// `count_include_pad`).
    pub fn avg_pool_with(&mut self, x: usize, p: PoolParams) -> Result<usize> {
        let shape = self.pool_shape(x, p)?;
        Ok(self.push(Op::AvgPool(p), vec![x], shape))
    }

    /// Global average pooling to `[C]`.
    pub fn global_avg_pool(&mut self, x: usize) -> usize {
        let c = self.shape(x)[0];
        self.push(Op::GlobalAvgPool, vec![x], vec![c])
    }

    /// Flatten to `[C*H*W]`.
    pub fn flatten(&mut self, x: usize) -> usize {
        let n = numel(self.shape(x));
        self.push(Op::Flatten, vec![x], vec![n])
    }

    /// Fully connected layer called `name` with `out` outputs.
    pub fn linear(&mut self, x: usize, name: &str, out: usize, bias: bool) -> usize {
        let k = numel(self.shape(x));
        let w = self.param(
            format!("{name}.weight"),
            vec![out, k],
            ParamKind::LinearWeight,
        );
        let b = bias.then(|| self.param(format!("{name}.bias"), vec![out], ParamKind::Bias));
        self.push(Op::Linear { w, b }, vec![x], vec![out])
    }

    /// An elementwise activation; its parameters are checked.
    pub fn act(&mut self, x: usize, act: Activation) -> Result<usize> {
        act.check()
            .map_err(|e| Error::Msg(format!("{}: {e}", self.graph.arch)))?;
        let shape = self.shape(x).to_vec();
        Ok(self.push(Op::Act(act), vec![x], shape))
    }

    /// `a * b`: equal shapes, or one of them a per-channel gate (`[C, 1, 1]`
    /// or `[C]`) of the other's `[C, ...]`. The gate becomes the node's
    /// second input (the product commutes).
    pub fn mul(&mut self, a: usize, b: usize) -> Result<usize> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        let gate_of = |full: &[usize], g: &[usize]| {
            full.len() >= 2 && (g == [full[0]] || (full.len() == 3 && g == [full[0], 1, 1]))
        };
        let (x, gate) = if sa == sb || gate_of(&sa, &sb) {
            (a, b)
        } else if gate_of(&sb, &sa) {
            (b, a)
        } else {
            return Err(Error::Msg(format!(
                "{}: mul of shapes {sa:?} and {sb:?}: they must be equal, or one a per-channel \
                 gate [C, 1, 1] or [C] of the other",
                self.graph.arch
            )));
        };
        let shape = self.shape(x).to_vec();
        Ok(self.push(Op::Mul, vec![x, gate], shape))
    }

    /// `x * scale[c] + shift[c]`, each of 1 value or one per channel, finite.
    pub fn affine(&mut self, x: usize, scale: Vec<f32>, shift: Vec<f32>) -> Result<usize> {
        let shape = self.shape(x).to_vec();
        let c = shape.first().copied().unwrap_or(0);
        crate::backend::shape_ops::affine_params(&scale, &shift, c)
            .map_err(|e| Error::Msg(format!("{}: {e}", self.graph.arch)))?;
        Ok(self.push(Op::Affine { scale, shift }, vec![x], shape))
    }

    /// Concatenation of `xs` (two or more) on the channel axis; all other
    /// extents must agree.
    pub fn concat(&mut self, xs: &[usize]) -> Result<usize> {
        let shapes: Vec<Vec<usize>> = xs.iter().map(|&x| self.shape(x).to_vec()).collect();
        let ok = xs.len() >= 2
            && shapes
                .iter()
                .all(|s| !s.is_empty() && s.len() == shapes[0].len() && s[1..] == shapes[0][1..]);
        if !ok {
            return Err(Error::Msg(format!(
                "{}: concat of shapes {shapes:?}: needs two or more inputs equal in all but \
                 the channel extent",
                self.graph.arch
            )));
        }
        let mut shape = shapes[0].clone();
        shape[0] = shapes.iter().map(|s| s[0]).sum();
        Ok(self.push(Op::Concat, xs.to_vec(), shape))
    }

    /// Zero padding of a `[C, H, W]` node's H and W.
    pub fn pad(&mut self, x: usize, p: Pad2d) -> Result<usize> {
        let s = self.shape(x).to_vec();
        if s.len() != 3 {
            return Err(Error::Msg(format!(
                "{}: pad needs a [C, H, W] input, got {s:?}",
                self.graph.arch
            )));
        }
        let (h, w) = p.out_hw(s[1], s[2]);
        let op = Op::Pad {
            top: p.top,
            bottom: p.bottom,
            left: p.left,
            right: p.right,
        };
        Ok(self.push(op, vec![x], vec![s[0], h, w]))
    }

    /// The finished graph; the last node added is the output.
    pub fn finish(self) -> Graph {
        self.graph
    }
}
