//! Eval-mode execution of a [`Graph`] on the GPU with fusions the generic
//! graph runner cannot make through the [`Backend`] trait:
//!
//! - an eval-mode batch norm right after a convolution (its only reader) is
//!   folded into the convolution's weights and bias once, at load;
//! - a ReLU that is the only reader of a convolution (after the fold) runs
//!   in the convolution's epilogue;
//! - a residual `relu(conv(..) + shortcut)` runs as one convolution whose
//!   epilogue adds the shortcut and applies the ReLU;
//! - backward to the input applies a fused ReLU's mask to `dy` as the dgrad
//!   GEMM loads it.
//!
//! Only what the input gradient needs is kept from the forward pass (the
//! outputs of ReLUs and the inputs of max pools). This is the GPU's
//! [`crate::backend::EvalRunner`]: the search, evaluation and `cwp bench`
//! run through it; its results are checked against the CPU
//! reference by [`super::selftest`].

use super::{Driver, GpuBackend, GpuBuf};
use crate::backend::{Backend, ConvParams, PoolParams};
use crate::error::{Error, Result};
use crate::graph::{Graph, Op};
use crate::tensor::Tensor;

/// An op of the fused graph. Parameter indices point into
/// [`FusedModel::params`].
#[derive(Clone, Debug)]
enum FOp {
    Input,
    Normalize {
        mean: Vec<f32>,
        std: Vec<f32>,
    },
    /// `relu?(conv(x, w) + b + residual)`; `residual` is a fused node.
    Conv {
        w: usize,
        b: Option<usize>,
        p: ConvParams,
        relu: bool,
        residual: Option<usize>,
    },
    BatchNorm {
        gamma: usize,
        beta: usize,
        mean: usize,
        var: usize,
        eps: f32,
    },
    Relu,
    Add,
    MaxPool(PoolParams),
    AvgPool(PoolParams),
    GlobalAvgPool,
    Flatten,
    Linear {
        w: usize,
        b: Option<usize>,
    },
}

/// A convolution waiting for the `Add` that reads it: (weights, bias,
/// params, fused input node).
type Pending = (usize, Option<usize>, ConvParams, usize);

#[derive(Clone, Debug)]
struct FNode {
    op: FOp,
    /// The data input (fused node index); the residual of a conv is in its op.
    input: usize,
    /// Second input of an `Add`.
    input2: usize,
}

/// A graph prepared for fused eval-mode execution on one GPU backend.
pub struct FusedModel<'a, D: Driver> {
    gpu: &'a GpuBackend<D>,
    nodes: Vec<FNode>,
    params: Vec<GpuBuf<D>>,
    /// Per fused node: is its output needed by the backward pass?
    keep: Vec<bool>,
    /// Per fused node: the last node that reads its output.
    last_use: Vec<usize>,
    input_shape: [usize; 3],
}

/// What [`FusedModel::forward_trace`] keeps for the backward pass.
pub struct FusedTrace<D: Driver> {
    outs: Vec<Option<GpuBuf<D>>>,
    shapes: Vec<Vec<usize>>,
    logits: GpuBuf<D>,
}

impl<D: Driver> FusedTrace<D> {
    /// The logits of the forward pass.
    pub fn logits(&self) -> &GpuBuf<D> {
        &self.logits
    }
}

impl<'a, D: Driver> FusedModel<'a, D> {
    /// Uploads host parameters and prepares the fused graph.
    pub fn new(gpu: &'a GpuBackend<D>, graph: &Graph, params: &[Tensor]) -> Result<Self> {
        graph.check_params(params)?;
        let bufs = params
            .iter()
            .map(|t| gpu.upload(t))
            .collect::<Result<Vec<_>>>()?;
        Self::from_device(gpu, graph, &bufs)
    }

    /// Prepares the fused graph from parameters already on the device.
    pub fn from_device(
        gpu: &'a GpuBackend<D>,
        graph: &Graph,
        params: &[GpuBuf<D>],
    ) -> Result<Self> {
        if params.len() != graph.params.len() {
            return Err(Error::Msg(format!(
                "{}: {} parameter buffers given, {} needed",
                graph.arch,
                params.len(),
                graph.params.len()
            )));
        }
        let n = graph.nodes.len();
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (j, node) in graph.nodes.iter().enumerate() {
            for &i in &node.inputs {
                readers[i].push(j);
            }
        }
        let only_reader = |i: usize| -> Option<usize> {
            match readers[i].as_slice() {
                [r] => Some(*r),
                _ => None,
            }
        };
        let mut fp: Vec<GpuBuf<D>> = Vec::new();
        // Adds a parameter (shared, not copied) and returns its index.
        let share = |fp: &mut Vec<GpuBuf<D>>, b: &GpuBuf<D>| -> Result<usize> {
            fp.push(gpu.reshape(b, b.shape())?);
            Ok(fp.len() - 1)
        };
        let mut nodes = vec![FNode {
            op: FOp::Input,
            input: 0,
            input2: 0,
        }];
        // map[j]: the fused node that holds original node j's value.
        let mut map: Vec<Option<usize>> = vec![None; n];
        map[0] = Some(0);
        let mut absorbed = vec![false; n];
        // Convolutions deferred to the Add that reads them: (w, b, p, conv input).
        let mut pending: Vec<Option<Pending>> = vec![None; n];
        let get = |map: &Vec<Option<usize>>, i: usize| -> Result<usize> {
            map[i].ok_or_else(|| {
                Error::Msg(format!("fused graph: node {i} used before it is computed"))
            })
        };
        for j in 1..n {
            if absorbed[j] {
                continue;
            }
            let node = &graph.nodes[j];
            let input = node.inputs.first().copied().unwrap_or(0);
            match &node.op {
                Op::Input => return Err(Error::Msg("fused graph: a second input node".into())),
                Op::Conv { w, b, p } => {
                    let bn = only_reader(j)
                        .filter(|&r| matches!(graph.nodes[r].op, Op::BatchNorm { .. }));
                    let (end, wi, bi) = match bn.map(|r| (r, &graph.nodes[r].op)) {
                        Some((
                            r,
                            Op::BatchNorm {
                                gamma,
                                beta,
                                mean,
                                var,
                                eps,
                            },
                        )) => {
                            let (w2, b2) = gpu.fold_bn(
                                &params[*w],
                                b.map(|b| &params[b]),
                                &params[*gamma],
                                &params[*beta],
                                &params[*mean],
                                &params[*var],
                                *eps,
                            )?;
                            fp.push(w2);
                            fp.push(b2);
                            absorbed[r] = true;
                            (r, fp.len() - 2, Some(fp.len() - 1))
                        }
                        _ => {
                            let wi = share(&mut fp, &params[*w])?;
                            let bi = b.map(|b| share(&mut fp, &params[b])).transpose()?;
                            (j, wi, bi)
                        }
                    };
                    let x = get(&map, input)?;
                    match only_reader(end).map(|r| (r, &graph.nodes[r].op)) {
                        Some((r, Op::Relu)) => {
                            absorbed[r] = true;
                            nodes.push(conv_node(wi, bi, *p, true, None, x));
                            map[r] = Some(nodes.len() - 1);
                        }
                        Some((_, Op::Add)) => pending[end] = Some((wi, bi, *p, x)),
                        _ => {
                            nodes.push(conv_node(wi, bi, *p, false, None, x));
                            map[end] = Some(nodes.len() - 1);
                        }
                    }
                }
                Op::Add => {
                    let (a, b) = (node.inputs[0], node.inputs[1]);
                    // Fuse the first pending conv; compute the other input first.
                    let (fuse, other) = if pending[a].is_some() { (a, b) } else { (b, a) };
                    if let Some((wi, bi, p, x)) = pending[fuse].take() {
                        if let Some((w2, b2, p2, x2)) = pending[other].take() {
                            nodes.push(conv_node(w2, b2, p2, false, None, x2));
                            map[other] = Some(nodes.len() - 1);
                        }
                        let res = get(&map, other)?;
                        let (relu, out) = match only_reader(j).map(|r| (r, &graph.nodes[r].op)) {
                            Some((r, Op::Relu)) => {
                                absorbed[r] = true;
                                (true, r)
                            }
                            _ => (false, j),
                        };
                        nodes.push(conv_node(wi, bi, p, relu, Some(res), x));
                        map[out] = Some(nodes.len() - 1);
                    } else {
                        let (fa, fb) = (get(&map, a)?, get(&map, b)?);
                        nodes.push(FNode {
                            op: FOp::Add,
                            input: fa,
                            input2: fb,
                        });
                        map[j] = Some(nodes.len() - 1);
                    }
                }
                op => {
                    let fop = match op {
                        Op::Normalize { mean, std } => FOp::Normalize {
                            mean: mean.clone(),
                            std: std.clone(),
                        },
                        Op::BatchNorm {
                            gamma,
                            beta,
                            mean,
                            var,
                            eps,
                        } => FOp::BatchNorm {
                            gamma: share(&mut fp, &params[*gamma])?,
                            beta: share(&mut fp, &params[*beta])?,
                            mean: share(&mut fp, &params[*mean])?,
                            var: share(&mut fp, &params[*var])?,
                            eps: *eps,
                        },
                        Op::Relu => FOp::Relu,
                        Op::MaxPool(p) => FOp::MaxPool(*p),
                        Op::AvgPool(p) => FOp::AvgPool(*p),
                        Op::GlobalAvgPool => FOp::GlobalAvgPool,
                        Op::Flatten => FOp::Flatten,
                        Op::Linear { w, b } => FOp::Linear {
                            w: share(&mut fp, &params[*w])?,
                            b: b.map(|b| share(&mut fp, &params[b])).transpose()?,
                        },
                        Op::Input | Op::Conv { .. } | Op::Add => unreachable!("handled above"),
                        Op::Act(_) | Op::Mul | Op::Affine { .. } | Op::Concat | Op::Pad { .. } => {
                            return Err(Error::Msg(format!(
                                "{}: the fused runner has no {:?} (the graph runner runs it)",
                                graph.arch, op
                            )))
                        }
                    };
                    nodes.push(FNode {
                        op: fop,
                        input: get(&map, input)?,
                        input2: 0,
                    });
                    map[j] = Some(nodes.len() - 1);
                }
            }
        }
        let last = map[n - 1]
            .ok_or_else(|| Error::Msg(format!("{}: the output was not computed", graph.arch)))?;
        if last != nodes.len() - 1 {
            return Err(Error::Msg(format!(
                "{}: fused graph does not end with the output",
                graph.arch
            )));
        }
        let m = nodes.len();
        let mut keep = vec![false; m];
        let mut last_use: Vec<usize> = (0..m).collect();
        for (j, nd) in nodes.iter().enumerate() {
            let mut reads = vec![nd.input];
            match &nd.op {
                FOp::Add => reads.push(nd.input2),
                FOp::Conv {
                    residual: Some(r), ..
                } => reads.push(*r),
                _ => {}
            }
            for i in reads {
                last_use[i] = last_use[i].max(j);
            }
            match &nd.op {
                FOp::Relu | FOp::Conv { relu: true, .. } => keep[j] = true,
                FOp::MaxPool(_) => keep[nd.input] = true,
                _ => {}
            }
        }
        Ok(FusedModel {
            gpu,
            nodes,
            params: fp,
            keep,
            last_use,
            input_shape: graph.input,
        })
    }

    /// Number of fused nodes (after folding and fusion).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for a graph with no nodes (never: the input is a node).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn check_input(&self, x: &GpuBuf<D>) -> Result<()> {
        let s = x.shape();
        if s.len() != 4 || s[1..] != self.input_shape {
            let n = s.first().copied().unwrap_or(0);
            let want = [
                n,
                self.input_shape[0],
                self.input_shape[1],
                self.input_shape[2],
            ];
            return Err(Error::shape("x (model input)", &want, s));
        }
        Ok(())
    }

    fn run(&self, x: &GpuBuf<D>, trace: bool) -> Result<FusedTrace<D>> {
        self.check_input(x)?;
        let g = self.gpu;
        let m = self.nodes.len();
        let mut outs: Vec<Option<GpuBuf<D>>> = (0..m).map(|_| None).collect();
        let mut shapes: Vec<Vec<usize>> = vec![Vec::new(); m];
        outs[0] = Some(g.reshape(x, x.shape())?);
        shapes[0] = x.shape().to_vec();
        for j in 1..m {
            let nd = &self.nodes[j];
            let val = |i: usize| -> Result<&GpuBuf<D>> {
                outs[i].as_ref().ok_or_else(|| {
                    Error::Msg(format!("fused graph: node {i} freed before node {j}"))
                })
            };
            let x = val(nd.input)?;
            let p = &self.params;
            let y = match &nd.op {
                FOp::Input => unreachable!("only node 0"),
                FOp::Normalize { mean, std } => g.normalize(x, mean, std)?,
                FOp::Conv {
                    w,
                    b,
                    p: cp,
                    relu,
                    residual,
                } => {
                    let res = residual.map(val).transpose()?;
                    g.conv_forward(x, &p[*w], b.map(|b| &p[b]), res, *relu, *cp)?
                }
                FOp::BatchNorm {
                    gamma,
                    beta,
                    mean,
                    var,
                    eps,
                } => g.batch_norm_eval(x, &p[*gamma], &p[*beta], &p[*mean], &p[*var], *eps)?,
                FOp::Relu => g.relu(x)?,
                FOp::Add => g.add(x, val(nd.input2)?)?,
                FOp::MaxPool(pp) => g.max_pool2d(x, *pp)?,
                FOp::AvgPool(pp) => g.avg_pool2d(x, *pp)?,
                FOp::GlobalAvgPool => g.global_avg_pool(x)?,
                FOp::Flatten => {
                    let s = x.shape();
                    g.reshape(x, &[s[0], s[1..].iter().product()])?
                }
                FOp::Linear { w, b } => g.linear(x, &p[*w], b.map(|b| &p[b]))?,
            };
            shapes[j] = y.shape().to_vec();
            outs[j] = Some(y);
            // Free what no later node reads (unless the backward pass needs it).
            for i in node_reads(nd) {
                if self.last_use[i] == j && !(trace && self.keep[i]) {
                    outs[i] = None;
                }
            }
        }
        let logits = outs[m - 1]
            .take()
            .ok_or_else(|| Error::Msg("fused graph: no output".into()))?;
        if trace {
            outs[m - 1] = Some(g.reshape(&logits, logits.shape())?);
        }
        Ok(FusedTrace {
            outs,
            shapes,
            logits,
        })
    }

    /// Eval-mode logits `[N, classes]`.
    pub fn logits(&self, x: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        Ok(self.run(x, false)?.logits)
    }

    /// Eval-mode forward keeping what [`FusedModel::input_grad`] needs.
    pub fn forward_trace(&self, x: &GpuBuf<D>) -> Result<FusedTrace<D>> {
        self.run(x, true)
    }

    /// Gradient with respect to the model input, from `dlogits`.
    pub fn input_grad(&self, t: &FusedTrace<D>, dlogits: GpuBuf<D>) -> Result<GpuBuf<D>> {
        let g = self.gpu;
        let m = self.nodes.len();
        let mut grads: Vec<Option<GpuBuf<D>>> = (0..m).map(|_| None).collect();
        grads[m - 1] = Some(dlogits);
        let add = |grads: &mut Vec<Option<GpuBuf<D>>>, i: usize, d: GpuBuf<D>| -> Result<()> {
            match &mut grads[i] {
                Some(acc) => g.add_assign(acc, &d),
                slot => {
                    *slot = Some(d);
                    Ok(())
                }
            }
        };
        let kept = |i: usize| -> Result<&GpuBuf<D>> {
            t.outs[i]
                .as_ref()
                .ok_or_else(|| Error::Msg(format!("fused graph: output of node {i} was not kept")))
        };
        let p = &self.params;
        for j in (1..m).rev() {
            let Some(dy) = grads[j].take() else { continue };
            let nd = &self.nodes[j];
            let xs = &t.shapes[nd.input];
            match &nd.op {
                FOp::Input => {}
                FOp::Normalize { std, .. } => {
                    add(&mut grads, nd.input, g.normalize_backward(&dy, std)?)?
                }
                FOp::Conv {
                    w,
                    p: cp,
                    relu,
                    residual,
                    ..
                } => match (relu, residual) {
                    (true, None) if std::env::var_os("NOFUSE").is_none() => {
                        let dx = g.conv_dgrad(&dy, &p[*w], Some(kept(j)?), xs, *cp)?;
                        add(&mut grads, nd.input, dx)?;
                    }
                    (relu, res) => {
                        let d = if *relu {
                            g.relu_backward(&dy, kept(j)?)?
                        } else {
                            dy
                        };
                        let dx = g.conv_dgrad(&d, &p[*w], None, xs, *cp)?;
                        add(&mut grads, nd.input, dx)?;
                        if let Some(r) = res {
                            add(&mut grads, *r, d)?;
                        }
                    }
                },
                FOp::BatchNorm {
                    gamma, var, eps, ..
                } => add(
                    &mut grads,
                    nd.input,
                    g.batch_norm_eval_backward(&dy, &p[*gamma], &p[*var], *eps)?,
                )?,
                FOp::Relu => add(&mut grads, nd.input, g.relu_backward(&dy, kept(j)?)?)?,
                FOp::Add => {
                    let copy = g.reshape(&dy, dy.shape())?;
                    add(&mut grads, nd.input, copy)?;
                    add(&mut grads, nd.input2, dy)?;
                }
                FOp::MaxPool(pp) => add(
                    &mut grads,
                    nd.input,
                    g.max_pool2d_backward(kept(nd.input)?, &dy, *pp)?,
                )?,
                FOp::AvgPool(pp) => {
                    add(&mut grads, nd.input, g.avg_pool2d_backward(&dy, xs, *pp)?)?
                }
                FOp::GlobalAvgPool => {
                    add(&mut grads, nd.input, g.global_avg_pool_backward(&dy, xs)?)?
                }
                FOp::Flatten => add(&mut grads, nd.input, g.reshape(&dy, xs)?)?,
                FOp::Linear { w, .. } => {
                    add(&mut grads, nd.input, g.linear_backward_data(&dy, &p[*w])?)?
                }
            }
        }
        grads[0].take().ok_or_else(|| {
            Error::Msg("fused graph: the output does not depend on the input".into())
        })
    }

    /// Host logits and the input gradient of the weighted cross-entropy
    /// (`weights` as in [`Backend::softmax_cross_entropy`]).
    pub fn logits_and_input_grad(
        &self,
        x: &Tensor,
        labels: &[usize],
        weights: &[f32],
    ) -> Result<(Tensor, Tensor)> {
        let xb = self.gpu.upload(x)?;
        let t = self.forward_trace(&xb)?;
        let (_, dlogits) = self
            .gpu
            .softmax_cross_entropy(t.logits(), labels, weights)?;
        let dx = self.input_grad(&t, dlogits)?;
        Ok((self.gpu.download(t.logits())?, self.gpu.download(&dx)?))
    }
}

impl<D: Driver> crate::backend::EvalRunner<GpuBuf<D>> for FusedModel<'_, D> {
    fn logits(&self, x: &GpuBuf<D>) -> Result<GpuBuf<D>> {
        FusedModel::logits(self, x)
    }

    fn loss_and_input_grad(
        &self,
        x: &GpuBuf<D>,
        labels: &[usize],
        weights: &[f32],
    ) -> Result<(Vec<f32>, GpuBuf<D>, GpuBuf<D>)> {
        let t = self.forward_trace(x)?;
        let (losses, dlogits) = self
            .gpu
            .softmax_cross_entropy(t.logits(), labels, weights)?;
        let dx = self.input_grad(&t, dlogits)?;
        Ok((losses, t.logits, dx))
    }
}

/// The fused nodes whose outputs `nd` reads.
fn node_reads(nd: &FNode) -> Vec<usize> {
    match &nd.op {
        FOp::Input => Vec::new(),
        FOp::Add => vec![nd.input, nd.input2],
        FOp::Conv {
            residual: Some(r), ..
        } => vec![nd.input, *r],
        _ => vec![nd.input],
    }
}

fn conv_node(
    w: usize,
    b: Option<usize>,
    p: ConvParams,
    relu: bool,
    residual: Option<usize>,
    x: usize,
) -> FNode {
    FNode {
        op: FOp::Conv {
            w,
            b,
            p,
            relu,
            residual,
        },
        input: x,
        input2: 0,
    }
}
