//! The eval-mode fusion pass, one for every backend: a pure function of a
//! [`Graph`] giving an equivalent eval-only graph with fewer passes over
//! memory, and the recipe for its parameters.
//!
//! - an eval batch norm that is the only reader of a convolution is folded
//!   into the convolution's weights and bias;
//! - a ReLU that is the only reader of a (folded) convolution runs in the
//!   convolution's epilogue ([`Op::FusedConv`]);
//! - a residual `relu?(conv(x) + shortcut)`, the Add being the only reader
//!   of the (folded) convolution, runs as one convolution whose epilogue adds
//!   the shortcut (its second input) and applies the ReLU when the ReLU is
//!   the Add's only reader.
//!
//! Every other node, including ops this pass does not know, is copied with
//! its inputs renumbered. Parameter ids are kept: the fused graph's
//! parameters are the original ones (some possibly no longer read) followed
//! by the folded convolutions' weights and biases, so an op's parameter
//! references never need rewriting.

use super::{Graph, Node, Op, ParamId, ParamKind, ParamSpec};
use crate::backend::{Backend, ConvParams};
use crate::error::{Error, Result};

/// An eval-mode batch norm folded into the convolution that it reads.
#[derive(Clone, Debug, PartialEq)]
pub struct BnFold {
    /// The convolution's weight.
    pub w: ParamId,
    /// Its bias, if it has one.
    pub b: Option<ParamId>,
    /// BN scale.
    pub gamma: ParamId,
    /// BN shift.
    pub beta: ParamId,
    /// BN running mean.
    pub mean: ParamId,
    /// BN running variance.
    pub var: ParamId,
    /// BN epsilon.
    pub eps: f32,
}

/// Where one parameter of the fused graph comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamSource {
    /// The original graph's parameter, unchanged.
    Param(ParamId),
    /// The weight of a convolution with a batch norm folded in
    /// ([`Backend::fold_bn`]'s first result).
    FoldedWeight(BnFold),
    /// Its bias ([`Backend::fold_bn`]'s second result); always right after
    /// its weight.
    FoldedBias(BnFold),
}

/// An eval-only fused graph and the recipe of its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Fused {
    /// The fused graph.
    pub graph: Graph,
    /// One entry per parameter of [`Fused::graph`]: the first ones are the
    /// original parameters, in order.
    pub params: Vec<ParamSource>,
}

impl Fused {
    /// The parameters of the fused graph that are not the original ones
    /// (the folded weights and biases), computed on `be` from the original
    /// graph's parameters: the fused graph runs on `params` followed by these.
    pub fn folded_params<B: Backend>(&self, be: &B, params: &[B::Buf]) -> Result<Vec<B::Buf>> {
        let mut out = Vec::new();
        let mut bias = None;
        for src in &self.params {
            match src {
                ParamSource::Param(i) => {
                    if *i >= params.len() {
                        return Err(Error::Msg(format!(
                            "{}: parameter {i} of {} missing",
                            self.graph.arch,
                            params.len()
                        )));
                    }
                }
                ParamSource::FoldedWeight(f) => {
                    let (w, b) = be.fold_bn(
                        &params[f.w],
                        f.b.map(|b| &params[b]),
                        &params[f.gamma],
                        &params[f.beta],
                        &params[f.mean],
                        &params[f.var],
                        f.eps,
                    )?;
                    out.push(w);
                    bias = Some(b);
                }
                ParamSource::FoldedBias(_) => {
                    out.push(bias.take().ok_or_else(|| {
                        Error::Msg("fuse: a folded bias without its weight".into())
                    })?)
                }
            }
        }
        Ok(out)
    }
}

/// A convolution waiting to be emitted: its (possibly folded) parameters,
/// its epilogue, and its inputs as original node indices.
#[derive(Clone, Debug)]
struct ConvPlan {
    w: ParamId,
    b: Option<ParamId>,
    p: ConvParams,
    relu: bool,
    x: usize,
    residual: Option<usize>,
}

/// The eval-mode fused graph of `g` (see the module documentation).
pub fn fuse(g: &Graph) -> Result<Fused> {
    let n = g.nodes.len();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (j, node) in g.nodes.iter().enumerate() {
        for &i in &node.inputs {
            readers[i].push(j);
        }
    }
    let only_reader = |i: usize| -> Option<(usize, &Op)> {
        match readers[i].as_slice() {
            [r] => Some((*r, &g.nodes[*r].op)),
            _ => None,
        }
    };
    let mut params = g.params.clone();
    let mut sources: Vec<ParamSource> = (0..g.params.len()).map(ParamSource::Param).collect();
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    // map[j]: the fused node holding original node j's value.
    let mut map: Vec<Option<usize>> = vec![None; n];
    // Nodes folded into a convolution (emitted elsewhere or never).
    let mut absorbed = vec![false; n];
    // Convolutions to emit when the loop reaches that original node (the
    // last one of their group, so the output stays the last node).
    let mut emit_at: Vec<Option<ConvPlan>> = vec![None; n];
    // Convolutions waiting for the Add (their only reader) to fuse them.
    let mut pending: Vec<Option<ConvPlan>> = vec![None; n];

    let get = |map: &[Option<usize>], i: usize| -> Result<usize> {
        map[i].ok_or_else(|| Error::Msg(format!("fuse: node {i} read before it is computed")))
    };
    let emit = |nodes: &mut Vec<Node>, map: &[Option<usize>], c: &ConvPlan, shape: &[usize]| {
        let mut inputs = vec![get(map, c.x)?];
        if let Some(r) = c.residual {
            inputs.push(get(map, r)?);
        }
        let op = if c.relu || c.residual.is_some() {
            Op::FusedConv {
                w: c.w,
                b: c.b,
                p: c.p,
                relu: c.relu,
            }
        } else {
            Op::Conv {
                w: c.w,
                b: c.b,
                p: c.p,
            }
        };
        nodes.push(Node {
            op,
            inputs,
            shape: shape.to_vec(),
        });
        Ok::<usize, Error>(nodes.len() - 1)
    };

    for j in 0..n {
        let node = &g.nodes[j];
        if let Some(c) = emit_at[j].take() {
            map[j] = Some(emit(&mut nodes, &map, &c, &node.shape)?);
            continue;
        }
        if absorbed[j] {
            continue;
        }
        match &node.op {
            Op::Conv { w, b, p } => {
                let (end, w, b) = match only_reader(j) {
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
                        let fold = BnFold {
                            w: *w,
                            b: *b,
                            gamma: *gamma,
                            beta: *beta,
                            mean: *mean,
                            var: *var,
                            eps: *eps,
                        };
                        let ws = &g.params[*w];
                        let stem = ws.name.strip_suffix(".weight").unwrap_or(&ws.name);
                        params.push(ParamSpec {
                            name: ws.name.clone(),
                            shape: ws.shape.clone(),
                            kind: ParamKind::ConvWeight,
                        });
                        params.push(ParamSpec {
                            name: format!("{stem}.bias"),
                            shape: vec![ws.shape[0]],
                            kind: ParamKind::Bias,
                        });
                        sources.push(ParamSource::FoldedWeight(fold.clone()));
                        sources.push(ParamSource::FoldedBias(fold));
                        absorbed[r] = true;
                        (r, params.len() - 2, Some(params.len() - 1))
                    }
                    _ => (j, *w, *b),
                };
                let mut plan = ConvPlan {
                    w,
                    b,
                    p: *p,
                    relu: false,
                    x: node.inputs[0],
                    residual: None,
                };
                match only_reader(end) {
                    Some((r, Op::Relu)) => {
                        plan.relu = true;
                        absorbed[r] = true;
                        emit_at[r] = Some(plan);
                    }
                    Some((_, Op::Add)) => pending[end] = Some(plan),
                    _ if end == j => {
                        map[j] = Some(emit(&mut nodes, &map, &plan, &node.shape)?);
                    }
                    _ => emit_at[end] = Some(plan),
                }
            }
            Op::Add if pending[node.inputs[0]].is_some() || pending[node.inputs[1]].is_some() => {
                let (a, b) = (node.inputs[0], node.inputs[1]);
                let (fuse, other) = if pending[a].is_some() { (a, b) } else { (b, a) };
                let mut plan = pending[fuse].take().expect("checked above");
                if let Some(o) = pending[other].take() {
                    map[other] = Some(emit(&mut nodes, &map, &o, &g.nodes[other].shape)?);
                }
                plan.residual = Some(other);
                match only_reader(j) {
                    Some((r, Op::Relu)) => {
                        plan.relu = true;
                        absorbed[r] = true;
                        emit_at[r] = Some(plan);
                    }
                    _ => map[j] = Some(emit(&mut nodes, &map, &plan, &node.shape)?),
                }
            }
            op => {
                let inputs = node
                    .inputs
                    .iter()
                    .map(|&i| get(&map, i))
                    .collect::<Result<Vec<_>>>()?;
                nodes.push(Node {
                    op: op.clone(),
                    inputs,
                    shape: node.shape.clone(),
                });
                map[j] = Some(nodes.len() - 1);
            }
        }
    }
    if n > 0 && map[n - 1] != Some(nodes.len() - 1) {
        return Err(Error::Msg(format!(
            "{}: the fused graph does not end with the output",
            g.arch
        )));
    }
    Ok(Fused {
        graph: Graph {
            arch: g.arch.clone(),
            input: g.input,
            num_classes: g.num_classes,
            nodes,
            params,
        },
        params: sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::graph::Builder;
    use crate::selftest::{formula_input, formula_params, model_tolerances};
    use crate::tensor::{rel_l2, Tensor};

    // The one place these tests build conv parameters.
    fn cp(stride: usize, pad: usize) -> ConvParams {
        ConvParams::new(stride, pad)
    }

    /// Logits and input gradient of the mean cross-entropy on the CPU.
    fn logits_and_dx(g: &Graph, params: &[Tensor], x: &Tensor) -> (Tensor, Tensor) {
        let be = CpuBackend::REFERENCE;
        let n = x.shape()[0];
        let labels: Vec<usize> = (0..n).map(|i| i % g.num_classes).collect();
        let t = g.forward_trace(&be, params, x.clone()).unwrap();
        let (_, dl) = be
            .softmax_cross_entropy(t.logits(), &labels, &vec![1.0 / n as f32; n])
            .unwrap();
        let dx = g.backward(&be, params, &t, dl, false).unwrap().dx;
        (t.logits().clone(), dx)
    }

    /// Fuses `g` and checks that the fused graph computes what `g` does on
    /// the CPU (logits and input gradient, shallow-model tolerances).
    fn fuse_and_compare(g: &Graph) -> Fused {
        let f = fuse(g).unwrap();
        let params = formula_params(g);
        let mut fp = params.clone();
        fp.extend(f.folded_params(&CpuBackend::REFERENCE, &params).unwrap());
        f.graph.check_params(&fp).unwrap();
        let x = formula_input(&g.input_shape(2));
        let (l, dx) = logits_and_dx(g, &params, &x);
        let (fl, fdx) = logits_and_dx(&f.graph, &fp, &x);
        let (ltol, gtol) = model_tolerances(false);
        let scale = l.max_abs().max(1.0) as f64;
        let dl = crate::tensor::max_abs_diff(fl.data(), l.data()) as f64 / scale;
        assert!(dl <= ltol, "logits differ by {dl:e}");
        let ddx = rel_l2(fdx.data(), dx.data());
        assert!(ddx <= gtol, "input gradients differ by {ddx:e}");
        f
    }

    fn ops(g: &Graph) -> Vec<&Op> {
        g.nodes.iter().map(|n| &n.op).collect()
    }

    fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
        g.nodes.iter().filter(|n| pred(&n.op)).count()
    }

    /// `x -> conv -> bn -> relu -> flatten -> linear`.
    fn conv_bn_relu() -> Graph {
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c = b.conv(0, "conv", 4, 3, cp(1, 1), false).unwrap();
        let n = b.bn(c, "bn");
        let r = b.relu(n);
        let f = b.flatten(r);
        b.linear(f, "fc", 3, true);
        b.finish()
    }

    #[test]
    fn bn_and_relu_after_a_conv_fold_into_one_fused_conv_named_as_the_conv() {
        let g = conv_bn_relu();
        let f = fuse_and_compare(&g);
        assert_eq!(count(&f.graph, |o| matches!(o, Op::BatchNorm { .. })), 0);
        assert_eq!(count(&f.graph, |o| matches!(o, Op::Relu)), 0);
        let Op::FusedConv { w, b, relu, .. } = &f.graph.nodes[1].op else {
            panic!("{:?}", ops(&f.graph))
        };
        assert!(*relu);
        assert_eq!(f.graph.nodes[1].inputs, vec![0]);
        let (w, b) = (*w, b.expect("a folded conv has a bias"));
        assert!(w >= g.params.len() && b >= g.params.len());
        assert_eq!(f.graph.params[w].name, "conv.weight");
        assert_eq!(f.graph.params[b].name, "conv.bias");
        assert!(matches!(&f.params[w], ParamSource::FoldedWeight(fold) if fold.w == 0));
        assert!(matches!(&f.params[b], ParamSource::FoldedBias(_)));
        // The original parameters keep their ids.
        for i in 0..g.params.len() {
            assert_eq!(f.params[i], ParamSource::Param(i));
            assert_eq!(f.graph.params[i], g.params[i]);
        }
        assert_eq!(f.graph.nodes.len(), 4);
    }

    #[test]
    fn bn_is_folded_only_when_the_conv_is_its_only_reader() {
        // The conv's output is also read by the Add: the BN must stay.
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c = b.conv(0, "conv", 2, 3, cp(1, 1), true).unwrap();
        let n = b.bn(c, "bn");
        let a = b.add(c, n).unwrap();
        let p = b.global_avg_pool(a);
        b.linear(p, "fc", 3, true);
        let g = b.finish();
        let f = fuse_and_compare(&g);
        assert_eq!(count(&f.graph, |o| matches!(o, Op::BatchNorm { .. })), 1);
        assert_eq!(f.params.len(), g.params.len(), "nothing folded");
        assert_eq!(f.graph, g);
    }

    #[test]
    fn relu_is_fused_only_when_it_is_the_conv_s_only_reader() {
        // relu(conv) + conv: the conv has two readers.
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c = b.conv(0, "conv", 2, 3, cp(1, 1), true).unwrap();
        let r = b.relu(c);
        let a = b.add(r, c).unwrap();
        let p = b.global_avg_pool(a);
        b.linear(p, "fc", 3, true);
        let g = b.finish();
        let f = fuse_and_compare(&g);
        assert_eq!(f.graph, g);

        // relu(conv) alone: fused.
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c = b.conv(0, "conv", 2, 3, cp(1, 1), true).unwrap();
        let r = b.relu(c);
        let p = b.global_avg_pool(r);
        b.linear(p, "fc", 3, true);
        let g = b.finish();
        let f = fuse_and_compare(&g);
        assert!(matches!(
            f.graph.nodes[1].op,
            Op::FusedConv {
                relu: true,
                w: 0,
                b: Some(1),
                ..
            }
        ));
        assert_eq!(count(&f.graph, |o| matches!(o, Op::Relu)), 0);
    }

    #[test]
    fn a_residual_add_and_its_relu_run_in_the_conv_epilogue() {
        // h = relu(bn1(conv1(x))); out = relu(bn2(conv2(h)) + h)
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c1 = b.conv(0, "conv1", 2, 3, cp(1, 1), false).unwrap();
        let n1 = b.bn(c1, "bn1");
        let h = b.relu(n1);
        let c2 = b.conv(h, "conv2", 2, 3, cp(1, 1), false).unwrap();
        let n2 = b.bn(c2, "bn2");
        let a = b.add(n2, h).unwrap();
        let r = b.relu(a);
        let p = b.global_avg_pool(r);
        b.linear(p, "fc", 3, true);
        let g = b.finish();
        let f = fuse_and_compare(&g);
        assert_eq!(f.graph.nodes.len(), 5, "{:?}", ops(&f.graph));
        assert!(matches!(
            f.graph.nodes[1].op,
            Op::FusedConv { relu: true, .. }
        ));
        assert!(matches!(
            f.graph.nodes[2].op,
            Op::FusedConv { relu: true, .. }
        ));
        assert_eq!(
            f.graph.nodes[2].inputs,
            vec![1, 1],
            "conv input and shortcut"
        );
        assert_eq!(count(&f.graph, |o| matches!(o, Op::Add)), 0);

        // Without the final ReLU the add is still fused, with no ReLU.
        let mut b = Builder::new("t", [2, 6, 6], 3);
        let c1 = b.conv(0, "conv1", 2, 3, cp(1, 1), false).unwrap();
        let n1 = b.bn(c1, "bn1");
        let h = b.relu(n1);
        let c2 = b.conv(h, "conv2", 2, 3, cp(1, 1), false).unwrap();
        let n2 = b.bn(c2, "bn2");
        let a = b.add(h, n2).unwrap();
        let p = b.global_avg_pool(a);
        b.linear(p, "fc", 3, true);
        let g = b.finish();
        let f = fuse_and_compare(&g);
        assert!(matches!(
            f.graph.nodes[2].op,
            Op::FusedConv { relu: false, .. }
        ));
        assert_eq!(f.graph.nodes[2].inputs, vec![1, 1]);
        assert_eq!(count(&f.graph, |o| matches!(o, Op::Add)), 0);
    }

    #[test]
    fn a_graph_with_nothing_to_fuse_is_unchanged() {
        let mut b = Builder::new("t", [2, 8, 8], 3);
        let x = b.normalize(0, vec![0.5, 0.4], vec![0.2, 0.3]);
        let c = b.conv(x, "conv", 3, 3, cp(2, 1), true).unwrap();
        let m = b.max_pool(c, 2, 2, 0).unwrap();
        let r = b.relu(m);
        let f = b.flatten(r);
        b.linear(f, "fc", 3, true);
        let g = b.finish();
        let f = fuse_and_compare(&g);
        assert_eq!(f.graph, g);
        assert!(f
            .folded_params(&CpuBackend::REFERENCE, &formula_params(&g))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_resnet18_fuses_every_bn_relu_and_residual_add() {
        use crate::zoo::{build, ModelSpec};
        let g = build(&ModelSpec::new("resnet18", [3, 32, 32], 10)).unwrap();
        let f = fuse(&g).unwrap();
        let f = &f.graph;
        for (what, pred) in [
            (
                "BatchNorm",
                (|o: &Op| matches!(o, Op::BatchNorm { .. })) as fn(&Op) -> bool,
            ),
            ("Relu", |o| matches!(o, Op::Relu)),
            ("Add", |o| matches!(o, Op::Add)),
        ] {
            assert!(count(&g, pred) > 0);
            assert_eq!(count(f, pred), 0, "{what} left in {:?}", ops(f));
        }
        // Eight basic blocks, each ending in relu(conv + shortcut).
        let residual = f
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::FusedConv { relu: true, .. }) && n.inputs.len() == 2)
            .count();
        assert_eq!(residual, 8);
        assert_eq!(f.flops_per_image(), g.flops_per_image());
    }

    #[test]
    fn the_output_stays_the_last_node_when_a_relu_is_fused_into_an_earlier_conv() {
        // The conv feeding the output ReLU is computed before the other branch.
        let mut b = Builder::new("t", [2, 4, 4], 3);
        let c = b.conv(0, "conv", 2, 3, cp(1, 1), true).unwrap();
        let n = b.normalize(0, vec![0.0, 0.0], vec![1.0, 1.0]);
        let a = b.add(n, c).unwrap();
        b.relu(a);
        let g = b.finish();
        let f = fuse(&g).unwrap();
        let last = f.graph.nodes.last().unwrap();
        assert!(matches!(last.op, Op::FusedConv { relu: true, .. }));
        assert_eq!(last.inputs, vec![0, 1]);
    }
}
