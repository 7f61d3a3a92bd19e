//! Forward and backward passes of a [`Graph`] on a [`Backend`].

use super::{Graph, Op, ParamId};
use crate::backend::{Backend, BnSaved, Pad2d};
use crate::error::{Error, Result};

/// Batch-norm behaviour of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Running statistics (inference, search, evaluation).
    Eval,
    /// Batch statistics; running statistics updated with `momentum`.
    Train {
        /// PyTorch's BN momentum (0.1 by default).
        momentum: f32,
    },
}

/// Everything a forward pass kept for its backward pass.
pub struct Trace<B: Backend> {
    mode: Mode,
    input: B::Buf,
    outs: Vec<Option<B::Buf>>,
    bn: Vec<Option<BnSaved<B::Buf>>>,
}

impl<B: Backend> Trace<B> {
    /// The model output (logits).
    pub fn logits(&self) -> &B::Buf {
        self.outs
            .last()
            .and_then(|o| o.as_ref())
            .unwrap_or(&self.input)
    }

    /// The input the pass ran on.
    pub fn input(&self) -> &B::Buf {
        &self.input
    }
}

/// Gradient per parameter (`None` for BN running statistics, for
/// parameters the output does not depend on, and when not requested).
pub type ParamGrads<B> = Vec<Option<<B as Backend>::Buf>>;

/// The result of a backward pass.
pub struct Grads<B: Backend> {
    /// Gradient with respect to the model input.
    pub dx: B::Buf,
    /// Parameter gradients, indexed like [`Graph::params`] (empty when not requested).
    pub params: ParamGrads<B>,
}

/// Node outputs and BN statistics kept by a forward pass.
type RunOutputs<B> = (
    Vec<Option<<B as Backend>::Buf>>,
    Vec<Option<BnSaved<<B as Backend>::Buf>>>,
);

enum Params<'a, B: Backend> {
    Shared(&'a [B::Buf]),
    Train(&'a mut [B::Buf], f32),
}

impl<B: Backend> Params<'_, B> {
    fn get(&self, id: ParamId) -> &B::Buf {
        match self {
            Params::Shared(p) => &p[id],
            Params::Train(p, _) => &p[id],
        }
    }
}

impl Graph {
    fn check_input<B: Backend>(&self, be: &B, params_len: usize, x: &B::Buf) -> Result<()> {
        if params_len != self.params.len() {
            return Err(Error::Msg(format!(
                "{}: {} parameter buffers given, {} needed",
                self.arch,
                params_len,
                self.params.len()
            )));
        }
        let s = be.shape(x);
        if s.len() != 4 || s[1..] != self.input {
            return Err(Error::shape(
                "x (model input)",
                &self.input_shape(s.first().copied().unwrap_or(0)),
                s,
            ));
        }
        Ok(())
    }

    /// Last node reading each node's output (the node itself when none does).
    fn last_use(&self) -> Vec<usize> {
        let mut last: Vec<usize> = (0..self.nodes.len()).collect();
        for (j, node) in self.nodes.iter().enumerate() {
            for &i in &node.inputs {
                last[i] = last[i].max(j);
            }
        }
        last
    }

    /// How many nodes read each node's output.
    fn readers(&self) -> Vec<usize> {
        let mut readers = vec![0usize; self.nodes.len()];
        for node in &self.nodes {
            for &i in &node.inputs {
                readers[i] += 1;
            }
        }
        readers
    }

    /// For each node, the ReLU that it may hand its output to in the same
    /// pass ([`Backend::batch_norm_train_relu`]): a train-mode batch norm
    /// whose only reader is a ReLU that writes over it (see
    /// [`Graph::relu_in_place`]).
    fn relu_after(&self, in_place: &[bool], train: bool) -> Vec<Option<usize>> {
        let mut after = vec![None; self.nodes.len()];
        if train {
            for (j, node) in self.nodes.iter().enumerate() {
                let i = node.inputs.first().copied().unwrap_or(0);
                if in_place[j] && matches!(self.nodes[i].op, Op::BatchNorm { .. }) {
                    after[i] = Some(j);
                }
            }
        }
        after
    }

    /// For each node, whether it is a ReLU that may write over its input's
    /// output (see [`Backend::relu_owned`]): nothing reads that output
    /// after it. Without `keep` that is any input the ReLU reads last; with
    /// it (a trace for the backward pass) the ReLU must be the input's only
    /// reader, and the input must not read its own output in its backward
    /// (a ReLU, or a convolution with one fused).
    fn relu_in_place(&self, last_use: &[usize], keep: bool) -> Vec<bool> {
        let readers = self.readers();
        let reads_own_output = |op: &Op| matches!(op, Op::Relu | Op::FusedConv { relu: true, .. });
        self.nodes
            .iter()
            .enumerate()
            .map(|(j, node)| match (&node.op, node.inputs.as_slice()) {
                (Op::Relu, &[i]) if i != 0 => {
                    if keep {
                        readers[i] == 1 && !reads_own_output(&self.nodes[i].op)
                    } else {
                        last_use[i] == j
                    }
                }
                _ => false,
            })
            .collect()
    }

    fn run<B: Backend>(
        &self,
        be: &B,
        mut params: Params<'_, B>,
        x: &B::Buf,
        keep: bool,
    ) -> Result<RunOutputs<B>> {
        let n = self.nodes.len();
        let last_use = self.last_use();
        let in_place = self.relu_in_place(&last_use, keep);
        let relu_after = self.relu_after(&in_place, matches!(params, Params::Train(..)));
        let mut outs: Vec<Option<B::Buf>> = (0..n).map(|_| None).collect();
        let mut bn: Vec<Option<BnSaved<B::Buf>>> = (0..n).map(|_| None).collect();
        for j in 1..n {
            let node = &self.nodes[j];
            if in_place[j] && outs[j].is_some() {
                // Written with its batch norm.
                continue;
            }
            if in_place[j] {
                let i = node.inputs[0];
                let x = outs[i].take().ok_or_else(|| {
                    Error::Msg(format!("graph: node {i} freed before node {j} read it"))
                })?;
                outs[j] = Some(be.relu_owned(x)?);
                continue;
            }
            let arg = |k: usize| -> Result<&B::Buf> {
                let i = node.inputs[k];
                if i == 0 {
                    Ok(x)
                } else {
                    outs[i].as_ref().ok_or_else(|| {
                        Error::Msg(format!("graph: node {i} freed before node {j} read it"))
                    })
                }
            };
            let y = match &node.op {
                Op::Input => return Err(Error::Msg("graph: a second input node".into())),
                Op::Normalize { mean, std } => be.normalize(arg(0)?, mean, std)?,
                Op::Conv { w, b, p } => {
                    be.conv2d(arg(0)?, params.get(*w), b.map(|b| params.get(b)), *p)?
                }
                Op::FusedConv { w, b, p, relu } => {
                    let residual = match node.inputs.len() {
                        2 => Some(arg(1)?),
                        _ => None,
                    };
                    be.conv2d_fused(
                        arg(0)?,
                        params.get(*w),
                        b.map(|b| params.get(b)),
                        residual,
                        *relu,
                        *p,
                    )?
                }
                Op::BatchNorm {
                    gamma,
                    beta,
                    mean,
                    var,
                    eps,
                } => match &mut params {
                    Params::Shared(p) => be.batch_norm_eval(
                        arg(0)?,
                        &p[*gamma],
                        &p[*beta],
                        &p[*mean],
                        &p[*var],
                        *eps,
                    )?,
                    Params::Train(p, momentum) => {
                        let [g, bt, rm, rv] = p
                            .get_disjoint_mut([*gamma, *beta, *mean, *var])
                            .map_err(|e| {
                                Error::Msg(format!("graph: BN parameters overlap: {e}"))
                            })?;
                        let x = arg(0)?;
                        if let Some(r) = relu_after[j] {
                            let (y, saved) =
                                be.batch_norm_train_relu(x, g, bt, rm, rv, *momentum, *eps)?;
                            bn[j] = Some(saved);
                            outs[r] = Some(y);
                            continue;
                        }
                        let (y, saved) = be.batch_norm_train(x, g, bt, rm, rv, *momentum, *eps)?;
                        bn[j] = Some(saved);
                        y
                    }
                },
                Op::Relu => be.relu(arg(0)?)?,
                Op::Add => be.add(arg(0)?, arg(1)?)?,
                Op::MaxPool(p) => be.max_pool2d(arg(0)?, *p)?,
                Op::AvgPool(p) => be.avg_pool2d(arg(0)?, *p)?,
                Op::GlobalAvgPool => be.global_avg_pool(arg(0)?)?,
                Op::Flatten => {
                    let s = be.shape(arg(0)?);
                    let flat = [s[0], s[1..].iter().product()];
                    be.reshape(arg(0)?, &flat)?
                }
                Op::Linear { w, b } => {
                    be.linear(arg(0)?, params.get(*w), b.map(|b| params.get(b)))?
                }
                Op::Act(a) => be.activation(arg(0)?, *a)?,
                Op::Mul => {
                    let (a, g) = (arg(0)?, arg(1)?);
                    be.mul(a, &gate_view(be, a, g)?)?
                }
                Op::Affine { scale, shift } => be.affine(arg(0)?, scale, shift)?,
                Op::Concat => {
                    let xs = (0..node.inputs.len())
                        .map(arg)
                        .collect::<Result<Vec<_>>>()?;
                    be.concat(&xs)?
                }
                Op::Pad {
                    top,
                    bottom,
                    left,
                    right,
                } => be.pad2d(
                    arg(0)?,
                    Pad2d {
                        top: *top,
                        bottom: *bottom,
                        left: *left,
                        right: *right,
                    },
                )?,
            };
            outs[j] = Some(y);
            if !keep {
                for &i in &node.inputs {
                    if i != 0 && last_use[i] == j {
                        outs[i] = None;
                    }
                }
            }
        }
        Ok((outs, bn))
    }

    /// Eval-mode forward that keeps nothing: returns the logits `[N, classes]`.
    pub fn forward<B: Backend>(&self, be: &B, params: &[B::Buf], x: &B::Buf) -> Result<B::Buf> {
        self.check_input(be, params.len(), x)?;
        let (mut outs, _) = self.run(be, Params::Shared(params), x, false)?;
        outs.pop()
            .flatten()
            .ok_or_else(|| Error::Msg(format!("{}: graph has no output node", self.arch)))
    }

    /// Eval-mode forward that keeps what [`Graph::backward`] needs.
    pub fn forward_trace<B: Backend>(
        &self,
        be: &B,
        params: &[B::Buf],
        x: B::Buf,
    ) -> Result<Trace<B>> {
        self.check_input(be, params.len(), &x)?;
        let (outs, bn) = self.run(be, Params::Shared(params), &x, true)?;
        Ok(Trace {
            mode: Mode::Eval,
            input: x,
            outs,
            bn,
        })
    }

    /// Train-mode forward (batch statistics; running statistics in `params`
    /// updated in place) that keeps what [`Graph::backward`] needs.
    pub fn forward_train<B: Backend>(
        &self,
        be: &B,
        params: &mut [B::Buf],
        x: B::Buf,
        momentum: f32,
    ) -> Result<Trace<B>> {
        self.check_input(be, params.len(), &x)?;
        let (outs, bn) = self.run(be, Params::Train(params, momentum), &x, true)?;
        Ok(Trace {
            mode: Mode::Train { momentum },
            input: x,
            outs,
            bn,
        })
    }

    /// Backward pass from `dlogits`: the input gradient and, when
    /// `param_grads`, the gradient of every trainable parameter.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &[B::Buf],
        trace: &Trace<B>,
        dlogits: B::Buf,
        param_grads: bool,
    ) -> Result<Grads<B>> {
        let (dx, params) = self.backward_from(be, params, trace, dlogits, param_grads, true)?;
        let dx = dx.ok_or_else(|| {
            Error::Msg(format!(
                "{}: the output does not depend on the input",
                self.arch
            ))
        })?;
        Ok(Grads { dx, params })
    }

    /// The parameter gradients of [`Graph::backward`] alone, for a training
    /// step: no gradient is formed for a node with no parameter upstream of
    /// it, so the first layer's input gradient (a whole backward-data
    /// convolution) is never computed. Same bits as `backward`'s.
    pub fn backward_params<B: Backend>(
        &self,
        be: &B,
        params: &[B::Buf],
        trace: &Trace<B>,
        dlogits: B::Buf,
    ) -> Result<ParamGrads<B>> {
        Ok(self
            .backward_from(be, params, trace, dlogits, true, false)?
            .1)
    }

    /// Whether each node's output depends on a parameter (its own or one
    /// upstream): only those outputs' gradients reach a parameter.
    fn after_params(&self) -> Vec<bool> {
        let mut after = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let own = matches!(
                node.op,
                Op::Conv { .. } | Op::FusedConv { .. } | Op::BatchNorm { .. } | Op::Linear { .. }
            );
            let upstream = node.inputs.iter().any(|&i| after[i]);
            after.push(own || upstream);
        }
        after
    }

    /// [`Graph::backward`] and [`Graph::backward_params`]: with
    /// `input_grad`, the input gradient as well (`None` when the output
    /// does not depend on the input); without, only the gradients that
    /// lead to a parameter are formed.
    fn backward_from<B: Backend>(
        &self,
        be: &B,
        params: &[B::Buf],
        trace: &Trace<B>,
        dlogits: B::Buf,
        param_grads: bool,
        input_grad: bool,
    ) -> Result<(Option<B::Buf>, ParamGrads<B>)> {
        let n = self.nodes.len();
        let after = self.after_params();
        let readers = self.readers();
        // Whether node `i`'s output gradient is of use.
        let wanted = |i: usize| input_grad || after[i];
        let out_of = |i: usize| -> Result<&B::Buf> {
            if i == 0 {
                Ok(&trace.input)
            } else {
                trace.outs[i]
                    .as_ref()
                    .ok_or_else(|| Error::Msg(format!("graph: node {i} output was not kept")))
            }
        };
        let mut grads: Vec<Option<B::Buf>> = (0..n).map(|_| None).collect();
        let mut pgrads: ParamGrads<B> = if param_grads {
            (0..self.params.len()).map(|_| None).collect()
        } else {
            Vec::new()
        };
        grads[n - 1] = Some(dlogits);

        // Adds a gradient contribution to node `i`'s output gradient.
        let accumulate = |grads: &mut Vec<Option<B::Buf>>, i: usize, g: B::Buf| -> Result<()> {
            if !wanted(i) {
                return Ok(());
            }
            match &mut grads[i] {
                Some(acc) => be.add_assign(acc, &g),
                slot => {
                    *slot = Some(g);
                    Ok(())
                }
            }
        };

        for j in (1..n).rev() {
            let Some(dy) = grads[j].take() else { continue };
            let node = &self.nodes[j];
            let input = node.inputs.first().copied().unwrap_or(0);
            match &node.op {
                Op::Input => {}
                Op::Normalize { std, .. } => {
                    accumulate(&mut grads, input, be.normalize_backward(&dy, std)?)?
                }
                Op::Conv { w, b, p } => {
                    let x = out_of(input)?;
                    let x_shape = be.shape(x).to_vec();
                    let dx = wanted(input)
                        .then(|| be.conv2d_backward_data(&dy, &params[*w], &x_shape, *p))
                        .transpose()?;
                    if param_grads {
                        let w_shape = &self.params[*w].shape;
                        let (dw, db) =
                            be.conv2d_backward_filter(x, &dy, w_shape, *p, b.is_some())?;
                        pgrads[*w] = Some(dw);
                        if let (Some(b), Some(db)) = (b, db) {
                            pgrads[*b] = Some(db);
                        }
                    }
                    if let Some(dx) = dx {
                        accumulate(&mut grads, input, dx)?;
                    }
                }
                Op::FusedConv { w, p, relu, .. } => {
                    if param_grads {
                        return Err(Error::Msg(format!(
                            "{}: a fused convolution (an eval-only graph) has no parameter gradients",
                            self.arch
                        )));
                    }
                    let x_shape = be.shape(out_of(input)?).to_vec();
                    let y = if *relu { Some(out_of(j)?) } else { None };
                    match node.inputs.get(1) {
                        // The shortcut needs the masked gradient itself.
                        Some(&res) => {
                            let d = match y {
                                Some(y) => be.relu_backward(&dy, y)?,
                                None => dy,
                            };
                            let dx = be.conv2d_backward_data(&d, &params[*w], &x_shape, *p)?;
                            accumulate(&mut grads, input, dx)?;
                            accumulate(&mut grads, res, d)?;
                        }
                        None => {
                            let dx =
                                be.conv2d_fused_backward_data(&dy, &params[*w], y, &x_shape, *p)?;
                            accumulate(&mut grads, input, dx)?;
                        }
                    }
                }
                Op::BatchNorm {
                    gamma,
                    beta,
                    var,
                    eps,
                    ..
                } => {
                    let dx = match (trace.mode, &trace.bn[j]) {
                        (Mode::Train { .. }, Some(saved)) => {
                            let (dx, dg, db) = be.batch_norm_train_backward_owned(
                                dy,
                                out_of(input)?,
                                &params[*gamma],
                                saved,
                            )?;
                            if param_grads {
                                pgrads[*gamma] = Some(dg);
                                pgrads[*beta] = Some(db);
                            }
                            dx
                        }
                        _ => {
                            be.batch_norm_eval_backward(&dy, &params[*gamma], &params[*var], *eps)?
                        }
                    };
                    accumulate(&mut grads, input, dx)?;
                }
                Op::Relu => {
                    let dx = be.relu_backward_owned(dy, out_of(j)?)?;
                    accumulate(&mut grads, input, dx)?;
                }
                Op::Add => {
                    let (a, b) = (node.inputs[0], node.inputs[1]);
                    let copy = be.reshape(&dy, be.shape(&dy))?;
                    accumulate(&mut grads, a, copy)?;
                    accumulate(&mut grads, b, dy)?;
                }
                Op::MaxPool(p) => match &self.nodes[input] {
                    // Through the ReLU that only this pool reads, in one
                    // pass; the ReLU then gets no gradient of its own.
                    relu @ super::Node { op: Op::Relu, .. }
                        if input != 0 && readers[input] == 1 =>
                    {
                        let dx = be.max_pool2d_relu_backward(out_of(input)?, &dy, *p)?;
                        accumulate(&mut grads, relu.inputs[0], dx)?;
                    }
                    _ => {
                        let dx = be.max_pool2d_backward(out_of(input)?, &dy, *p)?;
                        accumulate(&mut grads, input, dx)?;
                    }
                },
                Op::AvgPool(p) => {
                    let x_shape = be.shape(out_of(input)?).to_vec();
                    accumulate(
                        &mut grads,
                        input,
                        be.avg_pool2d_backward(&dy, &x_shape, *p)?,
                    )?;
                }
                Op::GlobalAvgPool => {
                    let x_shape = be.shape(out_of(input)?).to_vec();
                    accumulate(
                        &mut grads,
                        input,
                        be.global_avg_pool_backward(&dy, &x_shape)?,
                    )?;
                }
                Op::Flatten => {
                    let x_shape = be.shape(out_of(input)?).to_vec();
                    accumulate(&mut grads, input, be.reshape(&dy, &x_shape)?)?;
                }
                Op::Linear { w, b } => {
                    let dx = wanted(input)
                        .then(|| be.linear_backward_data(&dy, &params[*w]))
                        .transpose()?;
                    if param_grads {
                        let (dw, db) =
                            be.linear_backward_weight(out_of(input)?, &dy, b.is_some())?;
                        pgrads[*w] = Some(dw);
                        if let (Some(b), Some(db)) = (b, db) {
                            pgrads[*b] = Some(db);
                        }
                    }
                    if let Some(dx) = dx {
                        accumulate(&mut grads, input, dx)?;
                    }
                }
                Op::Act(a) => {
                    let dx = be.activation_backward(&dy, out_of(input)?, *a)?;
                    accumulate(&mut grads, input, dx)?;
                }
                Op::Mul => {
                    let (ia, ig) = (node.inputs[0], node.inputs[1]);
                    let (a, g) = (out_of(ia)?, out_of(ig)?);
                    let (da, dg) = be.mul_backward(&dy, a, &gate_view(be, a, g)?)?;
                    let dg = be.reshape(&dg, be.shape(g))?;
                    accumulate(&mut grads, ia, da)?;
                    accumulate(&mut grads, ig, dg)?;
                }
                Op::Affine { scale, .. } => {
                    accumulate(&mut grads, input, be.affine_backward(&dy, scale)?)?
                }
                Op::Concat => {
                    let channels = node
                        .inputs
                        .iter()
                        .map(|&i| Ok(be.shape(out_of(i)?)[1]))
                        .collect::<Result<Vec<_>>>()?;
                    let parts = be.concat_backward(&dy, &channels)?;
                    for (&i, part) in node.inputs.iter().zip(parts) {
                        accumulate(&mut grads, i, part)?;
                    }
                }
                Op::Pad {
                    top,
                    bottom,
                    left,
                    right,
                } => {
                    let p = Pad2d {
                        top: *top,
                        bottom: *bottom,
                        left: *left,
                        right: *right,
                    };
                    accumulate(&mut grads, input, be.pad2d_backward(&dy, p)?)?
                }
            }
        }
        Ok((grads[0].take(), pgrads))
    }
}

/// `Mul`'s second input as the backend takes it: unchanged when it has the
/// first's shape, else the per-channel gate viewed as `[N, C]`.
fn gate_view<B: Backend>(be: &B, a: &B::Buf, g: &B::Buf) -> Result<B::Buf> {
    let (sa, sg) = (be.shape(a), be.shape(g));
    if sa == sg || sa.len() < 2 {
        return be.reshape(g, sg);
    }
    be.reshape(g, &[sa[0], sa[1]])
}

#[cfg(test)]
mod tests {
    use super::super::Builder;
    use crate::backend::ConvParams;

    #[test]
    fn a_training_step_gets_the_parameter_gradients_of_the_full_backward_without_the_input_one() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::Backend;
        use crate::selftest::{formula_input, formula_params};
        use crate::zoo::{build, ModelSpec};
        // A plain network from the input and a residual one with its own
        // input normalisation: every parameter gradient bit for bit, and
        // none formed for the nodes with no parameter upstream.
        let be = CpuBackend::REFERENCE;
        for (arch, input) in [("smallcnn", [1, 12, 12]), ("resnet18", [3, 8, 8])] {
            let mut spec = ModelSpec::new(arch, input, 5);
            if arch == "resnet18" {
                spec.normalization = Some((vec![0.5, 0.4, 0.3], vec![0.2, 0.25, 0.3]));
            }
            let graph = build(&spec).unwrap();
            let mut p: Vec<_> = formula_params(&graph)
                .iter()
                .map(|t| be.upload(t).unwrap())
                .collect();
            let x = formula_input(&graph.input_shape(3));
            let trace = graph.forward_train(&be, &mut p, x, 0.1).unwrap();
            let labels = [0, 3, 4];
            let (_, dl) = be
                .softmax_cross_entropy(trace.logits(), &labels, &[1.0 / 3.0; 3])
                .unwrap();
            let dl2 = be.reshape(&dl, be.shape(&dl)).unwrap();
            let full = graph.backward(&be, &p, &trace, dl, true).unwrap();
            let params = graph.backward_params(&be, &p, &trace, dl2).unwrap();
            assert_eq!(full.params.len(), params.len());
            for (i, (a, b)) in full.params.iter().zip(&params).enumerate() {
                let (a, b) = (a.as_ref(), b.as_ref());
                assert_eq!(a.is_some(), b.is_some(), "{arch} param {i}");
                if let (Some(a), Some(b)) = (a, b) {
                    let bits = |t: &crate::Tensor| {
                        t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    assert_eq!(bits(a), bits(b), "{arch} param {}", graph.params[i].name);
                }
            }
            // The input, and its normalisation where there is one, lead to
            // no parameter; the logits do.
            let after = graph.after_params();
            let leading = after.iter().take_while(|a| !**a).count();
            assert_eq!(leading, if arch == "resnet18" { 2 } else { 1 }, "{arch}");
            assert!(after[leading..].iter().all(|a| *a), "{arch}");
        }
    }

    #[test]
    fn a_training_step_through_the_fused_norm_relu_and_pool_relu_gives_the_bits_of_the_ops_one_by_one(
    ) {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::{Backend, PoolParams};
        use crate::selftest::{formula_input, formula_params};
        // conv -> BN -> ReLU -> max pool: the runner writes the ReLU with
        // the batch norm, and the pool's gradient through the ReLU, in one
        // pass each; here every op runs on its own, in order.
        let mut b = Builder::new("t", [2, 7, 6], 3);
        let cp = ConvParams::new(1, 1);
        let c = b.conv(b.input(), "c", 4, 3, cp, true).unwrap();
        let bn = b.bn(c, "bn");
        let r = b.relu(bn);
        let pool = PoolParams::new(2, 2, 0);
        let m = b.max_pool_with(r, pool).unwrap();
        let f = b.flatten(m);
        b.linear(f, "fc", 3, true);
        let g = b.finish();
        let be = CpuBackend::REFERENCE;
        let params: Vec<_> = formula_params(&g)
            .iter()
            .map(|t| be.upload(t).unwrap())
            .collect();
        let x = formula_input(&g.input_shape(3));
        let labels = [0, 2, 1];
        let weights = [1.0 / 3.0; 3];

        let mut p = params.clone();
        let trace = g.forward_train(&be, &mut p, x.clone(), 0.1).unwrap();
        let (_, dl) = be
            .softmax_cross_entropy(trace.logits(), &labels, &weights)
            .unwrap();
        let grads = g.backward_params(&be, &p, &trace, dl).unwrap();

        let id = |name: &str| g.param_id(name).unwrap();
        let mut q = params.clone();
        let y1 = be
            .conv2d(&x, &q[id("c.weight")], Some(&q[id("c.bias")]), cp)
            .unwrap();
        let (mut rm, mut rv) = (
            q[id("bn.running_mean")].clone(),
            q[id("bn.running_var")].clone(),
        );
        let (y2, saved) = be
            .batch_norm_train(
                &y1,
                &q[id("bn.weight")],
                &q[id("bn.bias")],
                &mut rm,
                &mut rv,
                0.1,
                1e-5,
            )
            .unwrap();
        (q[id("bn.running_mean")], q[id("bn.running_var")]) = (rm, rv);
        let y3 = be.relu(&y2).unwrap();
        let y4 = be.max_pool2d(&y3, pool).unwrap();
        let flat = be.reshape(&y4, &[3, 4 * 3 * 3]).unwrap();
        let logits = be
            .linear(&flat, &q[id("fc.weight")], Some(&q[id("fc.bias")]))
            .unwrap();
        let (_, dl) = be
            .softmax_cross_entropy(&logits, &labels, &weights)
            .unwrap();
        let (dfw, dfb) = be.linear_backward_weight(&flat, &dl, true).unwrap();
        let dflat = be.linear_backward_data(&dl, &q[id("fc.weight")]).unwrap();
        let dy4 = be.reshape(&dflat, be.shape(&y4)).unwrap();
        let dy3 = be.max_pool2d_backward(&y3, &dy4, pool).unwrap();
        let dy2 = be.relu_backward(&dy3, &y3).unwrap();
        let (dy1, dgamma, dbeta) = be
            .batch_norm_train_backward(&dy2, &y1, &q[id("bn.weight")], &saved)
            .unwrap();
        let w_shape = be.shape(&q[id("c.weight")]).to_vec();
        let (dw, db) = be
            .conv2d_backward_filter(&x, &dy1, &w_shape, cp, true)
            .unwrap();

        let bits = |t: &crate::Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let want = [
            ("c.weight", dw),
            ("c.bias", db.unwrap()),
            ("bn.weight", dgamma),
            ("bn.bias", dbeta),
            ("fc.weight", dfw),
            ("fc.bias", dfb.unwrap()),
        ];
        for (name, w) in &want {
            let got = grads[id(name)].as_ref().unwrap();
            assert_eq!(bits(got), bits(w), "gradient of {name}");
        }
        for name in ["bn.running_mean", "bn.running_var"] {
            assert_eq!(bits(&p[id(name)]), bits(&q[id(name)]), "{name}");
        }
        assert!(y3.data().contains(&0.0), "the ReLU must shut some");
    }

    #[test]
    fn a_relu_writes_over_its_input_only_where_nothing_reads_that_input_after_it() {
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c = b
            .conv(b.input(), "c", 4, 3, ConvParams::new(1, 1), true)
            .unwrap();
        let bn = b.bn(c, "bn");
        // The batch norm's only reader: in place, kept or not.
        let r1 = b.relu(bn);
        // Reads a ReLU, whose backward needs its output: only when nothing
        // is kept, and r1 is read again below, so not then either.
        let r2 = b.relu(r1);
        let s = b.add(r1, r2).unwrap();
        // The sum's only reader: in place.
        let r3 = b.relu(s);
        // Reads the network's input, which the graph does not own.
        let r4 = b.relu(b.input());
        // The last of two readers: in place only when nothing is kept for
        // a backward pass.
        let c2 = b.conv(r3, "c2", 4, 3, ConvParams::new(1, 1), true).unwrap();
        b.add(c2, r3).unwrap();
        let r5 = b.relu(c2);
        let g = b.finish();
        let last = g.last_use();
        let (kept, not_kept) = (g.relu_in_place(&last, true), g.relu_in_place(&last, false));
        assert_eq!(
            [r1, r2, r3, r4, r5].map(|j| (kept[j], not_kept[j])),
            [
                (true, true),
                (false, false),
                (true, true),
                (false, false),
                (false, true)
            ]
        );
        assert!(!kept[c] && !kept[bn] && !kept[s]);
    }
}
