//! ONNX nodes to [`Graph`] ops. One walk over the nodes (ONNX keeps them in
//! topological order): constant inputs are folded ([`super::fold`]), the
//! normalisation arithmetic on the input becomes one [`Op::Normalize`], and
//! every other node goes through the one `match` in [`Importer::map_node`],
//! where each supported op type is one arm.

use std::collections::HashMap;
use std::path::Path;

use super::attr;
use super::fold::{self, BATCH};
use super::load::{Const, ConstData};
use super::proto::{GraphProto, NodeProto};
use crate::backend::{Activation, ConvParams, Pad2d, PoolParams};
use crate::error::{Error, Result};
use crate::graph::{Builder, Graph, Op, ParamKind};
use crate::tensor::{numel, Tensor};

/// Op types the importer maps to graph ops or removes (the folded ones,
/// [`fold::FOLDABLE`], and `Shape` come on top).
pub const MAPPED: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "Relu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "LeakyRelu",
    "Concat",
    "Pad",
    "ReduceMean",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Gemm",
    "MatMul",
    "Identity",
    "Dropout",
    "Softmax",
];

/// Every op type the importer accepts, sorted, for error messages.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<&str> = MAPPED
        .iter()
        .chain(fold::FOLDABLE)
        .chain(&["Shape"])
        .copied()
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// An activation: a graph node and how ONNX sees its per-image shape.
#[derive(Clone, Debug)]
struct Act {
    /// The graph node.
    id: usize,
    /// ONNX's per-image shape: `[C, 1, 1]` after GlobalAveragePool, whose
    /// graph node is `[C]`.
    shape: Vec<usize>,
    /// Set by Transpose(0, 2, 3, 1): the data is NHWC as ONNX sees it, but
    /// the graph node is still NCHW; only a flatten may read it.
    nhwc: bool,
    /// After a flatten of NHWC data: ONNX's column `j` is the graph's
    /// column `cols[j]`; the next linear layer's weight is permuted so.
    cols: Option<Vec<usize>>,
}

impl Act {
    /// A node in NCHW order, as ONNX sees it too.
    fn plain(id: usize, shape: Vec<usize>) -> Act {
        Act {
            id,
            shape,
            nhwc: false,
            cols: None,
        }
    }
}

/// What an ONNX value name stands for during the walk.
#[derive(Clone, Debug)]
enum Value {
    /// A constant (initializer, `Constant` or folded).
    Const(Const, String),
    /// A graph node.
    Act(Act),
    /// The model input times `a` plus `b` per channel, not yet a node: the
    /// Sub/Div or Mul/Add of a normalisation front gather here.
    Front { a: Vec<f32>, b: Vec<f32> },
    /// `x @ w` of a MatMul awaiting the Add of its bias (`w` is `[O, K]`).
    MatMul { x: Act, w: Tensor, name: String },
}

/// The imported model.
pub struct Imported {
    /// The graph, its arch name `onnx:<stem>`.
    pub graph: Graph,
    /// One host tensor per graph parameter.
    pub params: Vec<Tensor>,
    /// What the import changed that a user should know (printed by the CLI).
    pub notes: Vec<String>,
}

struct Importer<'a> {
    b: Builder,
    params: Vec<Tensor>,
    values: HashMap<String, Value>,
    path: &'a Path,
    opset: i64,
    channels: usize,
    /// The batch extent when the file fixes it (Reshape targets may bake it in).
    batch: Option<i64>,
    outputs: Vec<String>,
    notes: Vec<String>,
    param_names: HashMap<String, usize>,
}

fn node_label(node: &NodeProto, i: usize) -> String {
    match node.name.as_deref() {
        Some(n) if !n.is_empty() => format!("`{n}`"),
        _ => format!("#{i}"),
    }
}

/// The square extent of a 2-D attribute list (`kernel_shape`, `strides`),
/// or `None` when the two differ.
fn square(v: &[i64]) -> Option<usize> {
    match v {
        [a, b] if a == b && *a >= 0 => Some(*a as usize),
        _ => None,
    }
}

/// Equal padding on all four sides, or `None`.
fn symmetric(pads: &[i64]) -> Option<usize> {
    match pads {
        [] => Some(0),
        [a, b, c, d] if a == b && b == c && c == d && *a >= 0 => Some(*a as usize),
        _ => None,
    }
}

/// The conv's parameters.
fn conv_params(stride: usize, pad: usize, groups: usize, dilation: usize) -> ConvParams {
    ConvParams {
        groups,
        dilation,
        ..ConvParams::new(stride, pad)
    }
}

impl<'a> Importer<'a> {
    fn err(&self, node: &NodeProto, i: usize, msg: impl std::fmt::Display) -> Error {
        Error::format(
            self.path,
            format!(
                "node {} (op {}, opset {}): {msg}",
                node_label(node, i),
                node.op_type.as_deref().unwrap_or("?"),
                self.opset
            ),
        )
    }

    fn value(&self, node: &NodeProto, i: usize, k: usize) -> Result<Value> {
        let name = node.input.get(k).map(String::as_str).unwrap_or("");
        if name.is_empty() {
            return Err(self.err(node, i, format!("input {k} is missing")));
        }
        self.values.get(name).cloned().ok_or_else(|| {
            self.err(
                node,
                i,
                format!("input `{name}` is not produced by an earlier node"),
            )
        })
    }

    fn constant(&self, node: &NodeProto, i: usize, k: usize) -> Result<(Const, String)> {
        match self.value(node, i, k)? {
            Value::Const(c, n) => Ok((c, n)),
            _ => Err(self.err(
                node,
                i,
                format!(
                    "input {k} (`{}`) must be a constant (an initializer)",
                    node.input[k]
                ),
            )),
        }
    }

    fn opt_constant(
        &self,
        node: &NodeProto,
        i: usize,
        k: usize,
    ) -> Result<Option<(Const, String)>> {
        match node.input.get(k) {
            Some(n) if !n.is_empty() => self.constant(node, i, k).map(Some),
            _ => Ok(None),
        }
    }

    /// The node behind a value, creating the Normalize of a front or the
    /// Linear of a MatMul when a non-affine op reads it first.
    fn materialise(&mut self, v: Value, node: &NodeProto, i: usize) -> Result<Act> {
        match v {
            Value::Act(a) => Ok(a),
            Value::Const(_, name) => Err(self.err(
                node,
                i,
                format!("constant `{name}` where an activation is expected; constant-only branches are not supported"),
            )),
            Value::Front { a, b } => {
                let [c, h, w] = self.b_input();
                let id = if a.iter().all(|&x| x == 1.0) && b.iter().all(|&x| x == 0.0) {
                    self.b.input()
                } else {
                    if let Some(ch) = a.iter().position(|&x| x == 0.0 || !x.is_finite()) {
                        return Err(self.err(node, i, format!("the input normalisation multiplies channel {ch} by {}", a[ch])));
                    }
                    // a*x + b = (x - mean) / std with std = 1/a, mean = -b/a.
                    let std: Vec<f32> = a.iter().map(|&x| 1.0 / x).collect();
                    let mean: Vec<f32> = a.iter().zip(&b).map(|(&x, &y)| -y / x).collect();
                    self.b.normalize(self.b.input(), mean, std)
                };
                Ok(Act::plain(id, vec![c, h, w]))
            }
            Value::MatMul { x, w, name } => self.linear(x, w, &name, None, node, i),
        }
    }

    fn b_input(&self) -> [usize; 3] {
        let s = self.b.shape(self.b.input());
        [s[0], s[1], s[2]]
    }

    /// Input `k` as a node; a value read twice is materialised once.
    fn act(&mut self, node: &NodeProto, i: usize, k: usize) -> Result<Act> {
        let v = self.value(node, i, k)?;
        let a = self.materialise(v, node, i)?;
        self.values
            .insert(node.input[k].clone(), Value::Act(a.clone()));
        Ok(a)
    }

    /// Input `k` as an NCHW feature map `[C, H, W]`.
    fn map3(&mut self, node: &NodeProto, i: usize, k: usize) -> Result<Act> {
        let a = self.act(node, i, k)?;
        if a.nhwc || a.shape.len() != 3 || self.b.shape(a.id).len() != 3 {
            return Err(self.err(
                node,
                i,
                format!(
                    "input `{}` has per-image shape {:?}{}; a [N, C, H, W] feature map is needed",
                    node.input[k],
                    a.shape,
                    if a.nhwc { " (channels last)" } else { "" }
                ),
            ));
        }
        Ok(a)
    }

    fn param(
        &mut self,
        name: &str,
        c: &Const,
        shape: Vec<usize>,
        kind: ParamKind,
    ) -> Result<usize> {
        self.param_data(name, Tensor::new(&shape, c.floats())?, kind)
    }

    fn param_data(&mut self, name: &str, t: Tensor, kind: ParamKind) -> Result<usize> {
        // A tensor read by two layers becomes two parameters with distinct names.
        let count = self.param_names.entry(name.to_string()).or_insert(0);
        *count += 1;
        let unique = if *count == 1 {
            name.to_string()
        } else {
            format!("{name}#{count}")
        };
        let id = self.b.add_param(&unique, t.shape().to_vec(), kind);
        self.params.push(t);
        Ok(id)
    }

    fn set(&mut self, node: &NodeProto, v: Value) {
        if let Some(out) = node.output.first() {
            self.values.insert(out.clone(), v);
        }
    }

    fn push(&mut self, op: Op, inputs: Vec<usize>, shape: Vec<usize>) -> Act {
        let id = self.b.add_node(op, inputs, shape.clone());
        Act::plain(id, shape)
    }

    /// A Linear node from a flat activation and an `[O, K]` weight (ONNX's
    /// column order; permuted here when the input was flattened NHWC).
    fn linear(
        &mut self,
        x: Act,
        w: Tensor,
        name: &str,
        bias: Option<(Vec<f32>, String)>,
        node: &NodeProto,
        i: usize,
    ) -> Result<Act> {
        let (o, k) = (w.shape()[0], w.shape()[1]);
        let n = numel(&x.shape);
        if x.shape.len() != 1 || self.b.shape(x.id).len() != 1 {
            return Err(self.err(
                node,
                i,
                format!(
                    "input has per-image shape {:?}; flatten it to [N, K] first",
                    x.shape
                ),
            ));
        }
        if k != n {
            return Err(self.err(
                node,
                i,
                format!(
                    "weight `{name}` is [{o}, {k}] (as [out, in]) but its input has {n} features"
                ),
            ));
        }
        let w = match &x.cols {
            Some(cols) => {
                let src = w.data();
                let mut d = vec![0.0; o * k];
                for r in 0..o {
                    for (j, &c) in cols.iter().enumerate() {
                        d[r * k + c] = src[r * k + j];
                    }
                }
                Tensor::new(&[o, k], d)?
            }
            None => w,
        };
        let wid = self.param_data(name, w, ParamKind::LinearWeight)?;
        let bid = match bias {
            Some((b, bname)) => {
                if b.len() != o {
                    return Err(self.err(
                        node,
                        i,
                        format!("bias `{bname}` has {} values for {o} outputs", b.len()),
                    ));
                }
                Some(self.param_data(&bname, Tensor::new(&[o], b)?, ParamKind::Bias)?)
            }
            None => None,
        };
        Ok(self.push(Op::Linear { w: wid, b: bid }, vec![x.id], vec![o]))
    }

    /// Per-channel values of a constant operand of the front affine:
    /// a scalar, or `[C, 1, 1]` / `[1, C, 1, 1]`.
    fn per_channel(&self, c: &Const, name: &str, node: &NodeProto, i: usize) -> Result<Vec<f32>> {
        let ch = self.channels;
        let v = c.floats();
        let lead_ones = |s: &[usize]| s.iter().all(|&d| d == 1);
        if v.len() == 1 {
            return Ok(vec![v[0]; ch]);
        }
        let s = &c.shape;
        let ok = match s.len() {
            3 => s[0] == ch && lead_ones(&s[1..]),
            4 => s[0] == 1 && s[1] == ch && lead_ones(&s[2..]),
            _ => false,
        };
        if !ok {
            return Err(self.err(node, i, format!("constant `{name}` of shape {s:?} is neither a scalar nor per-channel ([1, {ch}, 1, 1])")));
        }
        Ok(v)
    }

    /// A constant that is a scalar or holds one value per channel of a
    /// `[C, ...]` activation (`[C]`, `[C, 1, 1]`, `[1, C, 1, 1]`).
    fn per_channel_of(
        &self,
        c: &Const,
        name: &str,
        act: &[usize],
        node: &NodeProto,
        i: usize,
    ) -> Result<Vec<f32>> {
        let v = c.floats();
        if v.len() == 1 {
            return Ok(v);
        }
        // ONNX broadcasts from the right: against a per-image `[C, H, W]`
        // a per-channel constant is `[C, 1, 1]` (leading ones allowed); a
        // `[C]` would run along W.
        let ch = act.first().copied().unwrap_or(0);
        let mut want = vec![1; act.len()];
        if let Some(w) = want.first_mut() {
            *w = ch;
        }
        let dims: Vec<usize> = c.shape.iter().copied().skip_while(|&d| d == 1).collect();
        let mut right = vec![1; act.len().saturating_sub(dims.len())];
        right.extend(&dims);
        if v.len() == ch && right == want && c.shape.len() <= act.len() + 1 {
            return Ok(v);
        }
        Err(self.err(node, i, format!("constant `{name}` of shape {:?} is neither a scalar nor per-channel ({ch} channels)", c.shape)))
    }

    /// Add/Sub/Mul/Div.
    fn arithmetic(&mut self, node: &NodeProto, i: usize, op: &str) -> Result<()> {
        let (x, y) = (self.value(node, i, 0)?, self.value(node, i, 1)?);
        let v = match (x, y, op) {
            (Value::Act(_), Value::Act(_), "Add") => {
                let (a, b) = (self.act(node, i, 0)?, self.act(node, i, 1)?);
                if a.shape != b.shape || a.nhwc || b.nhwc || a.cols.is_some() || b.cols.is_some() {
                    return Err(self.err(node, i, format!("residual shapes differ: {:?} vs {:?}", a.shape, b.shape)));
                }
                let shape = self.b.shape(a.id).to_vec();
                let mut r = self.push(Op::Add, vec![a.id, b.id], shape);
                r.shape = a.shape;
                Value::Act(r)
            }
            (Value::Act(_), Value::Act(_), "Mul") => {
                let (a, b) = (self.act(node, i, 0)?, self.act(node, i, 1)?);
                if a.nhwc || b.nhwc || a.cols.is_some() || b.cols.is_some() {
                    return Err(self.err(node, i, "a Mul of channels-last data is not supported"));
                }
                // The ONNX shapes decide which is the gate; the graph's
                // shapes of a [C, 1, 1] value may be [C].
                let (x, g) = if b.shape.len() >= a.shape.len() && numel(&b.shape) > numel(&a.shape) {
                    (b, a)
                } else {
                    (a, b)
                };
                let gate = x.shape == g.shape || (g.shape.len() == 3 && g.shape[1..] == [1, 1] && g.shape[0] == x.shape[0]);
                if !gate {
                    return Err(self.err(node, i, format!(
                        "Mul of shapes {:?} and {:?}: they must be equal, or one a per-channel gate [C, 1, 1] of the other",
                        x.shape, g.shape
                    )));
                }
                let id = self.b.mul(x.id, g.id).map_err(|e| self.err(node, i, e))?;
                Value::Act(Act::plain(id, x.shape))
            }
            (Value::Front { a, b }, Value::Const(c, name), _) => {
                let s = self.per_channel(&c, &name, node, i)?;
                let (mut a, mut b) = (a, b);
                for ch in 0..self.channels {
                    match op {
                        "Add" => b[ch] += s[ch],
                        "Sub" => b[ch] -= s[ch],
                        "Mul" => {
                            a[ch] *= s[ch];
                            b[ch] *= s[ch];
                        }
                        _ => {
                            a[ch] /= s[ch];
                            b[ch] /= s[ch];
                        }
                    }
                }
                Value::Front { a, b }
            }
            (Value::Const(c, name), Value::Front { a, b }, "Add" | "Mul" | "Sub") => {
                let s = self.per_channel(&c, &name, node, i)?;
                let (mut a, mut b) = (a, b);
                for ch in 0..self.channels {
                    match op {
                        "Add" => b[ch] += s[ch],
                        "Mul" => {
                            a[ch] *= s[ch];
                            b[ch] *= s[ch];
                        }
                        _ => {
                            a[ch] = -a[ch];
                            b[ch] = s[ch] - b[ch];
                        }
                    }
                }
                Value::Front { a, b }
            }
            (Value::MatMul { x, w, name }, Value::Const(c, bname), "Add")
            | (Value::Const(c, bname), Value::MatMul { x, w, name }, "Add") => {
                let o = w.shape()[0];
                let b = c.floats();
                let b = if b.len() == 1 { vec![b[0]; o] } else { b };
                if !(c.shape == [o] || c.shape == [1, o] || c.len() == 1) {
                    return Err(self.err(node, i, format!("bias `{bname}` of shape {:?} does not fit {o} outputs", c.shape)));
                }
                Value::Act(self.linear(x, w, &name, Some((b, bname)), node, i)?)
            }
            (Value::Act(_), Value::Const(c, name), _) | (Value::Const(c, name), Value::Act(_), "Add" | "Mul" | "Sub") => {
                let act_first = matches!(self.value(node, i, 0)?, Value::Act(_));
                let a = self.act(node, i, if act_first { 0 } else { 1 })?;
                let v = self.per_channel_of(&c, &name, &a.shape, node, i)?;
                if (a.nhwc || a.cols.is_some()) && c.len() != 1 {
                    return Err(self.err(node, i, "a per-channel constant on channels-last data is not supported"));
                }
                let (scale, shift): (Vec<f32>, Vec<f32>) = match (op, act_first) {
                    ("Add", _) => (vec![1.0], v),
                    ("Sub", true) => (vec![1.0], v.iter().map(|x| -x).collect()),
                    ("Sub", false) => (vec![-1.0], v),
                    ("Mul", _) => (v, vec![0.0]),
                    _ => (v.iter().map(|x| 1.0 / x).collect(), vec![0.0]),
                };
                let id = self.b.affine(a.id, scale, shift).map_err(|e| self.err(node, i, e))?;
                Value::Act(Act { id, ..a })
            }
            _ => {
                return Err(self.err(
                    node,
                    i,
                    "only the input normalisation (by scalar or per-channel constants), a residual Add of two \
                     activations, and the bias Add after a MatMul are supported",
                ))
            }
        };
        self.set(node, v);
        Ok(())
    }

    /// Flatten or Reshape to `[N, -1]`.
    fn flatten(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let a = self.act(node, i, 0)?;
        let n = numel(&a.shape);
        let out = if a.nhwc {
            // ONNX flattens [H, W, C]; the graph flattens [C, H, W].
            let (c, h, w) = (a.shape[0], a.shape[1], a.shape[2]);
            let mut cols = Vec::with_capacity(n);
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        cols.push((ch * h + y) * w + x);
                    }
                }
            }
            let mut f = self.flat(&a);
            f.cols = Some(cols);
            f
        } else {
            self.flat(&a)
        };
        self.set(node, Value::Act(out));
        Ok(())
    }

    fn flat(&mut self, a: &Act) -> Act {
        let n = numel(&a.shape);
        if self.b.shape(a.id).len() == 1 {
            Act {
                id: a.id,
                shape: vec![n],
                nhwc: false,
                cols: a.cols.clone(),
            }
        } else {
            let id = self.b.flatten(a.id);
            Act::plain(id, vec![n])
        }
    }

    fn pool(&mut self, node: &NodeProto, i: usize, max: bool) -> Result<()> {
        let x = self.map3(node, i, 0)?;
        let kernel = attr::ints(node, "kernel_shape").as_deref().and_then(square);
        let stride = attr::ints(node, "strides").map_or(Some(1), |s| square(&s));
        let pad = symmetric(&attr::ints(node, "pads").unwrap_or_default());
        let dil = attr::ints(node, "dilations").is_none_or(|d| d.iter().all(|&v| v == 1));
        let auto = attr::string(node, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let (Some(kernel), Some(stride), Some(pad)) = (kernel, stride, pad) else {
            return Err(self.err(
                node,
                i,
                "only square kernels, equal strides and equal padding on all sides are supported",
            ));
        };
        if !dil || !matches!(auto.as_str(), "NOTSET" | "VALID") || stride == 0 || kernel == 0 {
            return Err(self.err(
                node,
                i,
                "dilated pooling and auto_pad SAME are not supported",
            ));
        }
        let p = PoolParams {
            ceil_mode: attr::int(node, "ceil_mode", 0) != 0,
            // ONNX's default is to exclude the padding, PyTorch's to count it
            // (its exporter writes the attribute).
            count_include_pad: attr::int(node, "count_include_pad", 0) != 0,
            ..PoolParams::new(kernel, stride, pad)
        };
        let (c, h, w) = (x.shape[0], x.shape[1], x.shape[2]);
        if h + 2 * pad < kernel || w + 2 * pad < kernel {
            return Err(self.err(
                node,
                i,
                format!(
                    "a {kernel}x{kernel} window does not fit the input {:?}",
                    x.shape
                ),
            ));
        }
        let shape = vec![c, p.out_len(h), p.out_len(w)];
        let op = if max { Op::MaxPool(p) } else { Op::AvgPool(p) };
        let a = self.push(op, vec![x.id], shape);
        self.set(node, Value::Act(a));
        Ok(())
    }

    fn conv(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        if let Value::Act(a) = self.value(node, i, 0)? {
            if a.shape.len() == 3 && a.shape[1..] == [1, 1] && self.b.shape(a.id).len() == 1 {
                return self.conv_of_vector(node, i, a);
            }
        }
        let x = self.map3(node, i, 0)?;
        let (w, wname) = self.constant(node, i, 1)?;
        let bias = self.opt_constant(node, i, 2)?;
        let ws = w.shape.clone();
        if ws.len() != 4 {
            return Err(self.err(
                node,
                i,
                format!("weight `{wname}` has shape {ws:?}; a 2-D convolution is needed"),
            ));
        }
        let groups = attr::int(node, "group", 1);
        let dilation = attr::ints(node, "dilations").map_or(Some(1), |d| square(&d));
        let (Some(dilation), true) = (dilation.filter(|&d| d > 0), groups >= 1) else {
            return Err(self.err(
                node,
                i,
                "only equal dilations on both axes and a positive group count are supported",
            ));
        };
        let groups = groups as usize;
        let auto = attr::string(node, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let stride = attr::ints(node, "strides").map_or(Some(1), |s| square(&s));
        let pad = symmetric(&attr::ints(node, "pads").unwrap_or_default());
        let (Some(stride), Some(pad), true, true) = (
            stride,
            pad,
            ws[2] == ws[3],
            matches!(auto.as_str(), "NOTSET" | "VALID"),
        ) else {
            return Err(self.err(node, i, "only square kernels, equal strides and equal explicit padding on all sides are supported"));
        };
        if let Some(k) = attr::ints(node, "kernel_shape") {
            if k.iter().any(|&d| d as usize != ws[2]) {
                return Err(self.err(
                    node,
                    i,
                    format!("kernel_shape {k:?} disagrees with weight `{wname}` {ws:?}"),
                ));
            }
        }
        let (c, h, wd) = (x.shape[0], x.shape[1], x.shape[2]);
        let k = ws[2];
        if ws[1] * groups != c || ws[0] % groups != 0 {
            return Err(self.err(
                node,
                i,
                format!(
                    "weight `{wname}` {ws:?} in {groups} group(s) expects {} input channels, the input has {c}",
                    ws[1] * groups
                ),
            ));
        }
        let p = conv_params(stride, pad, groups, dilation);
        let span = dilation * (k - 1) + 1;
        if stride == 0 || h + 2 * pad < span || wd + 2 * pad < span {
            return Err(self.err(
                node,
                i,
                format!("a {k}x{k} kernel does not fit the input {:?}", x.shape),
            ));
        }
        let wid = self.param(&wname, &w, ws.clone(), ParamKind::ConvWeight)?;
        let bid = match bias {
            Some((b, bname)) => {
                if b.len() != ws[0] {
                    return Err(self.err(
                        node,
                        i,
                        format!(
                            "bias `{bname}` has {} values for {} filters",
                            b.len(),
                            ws[0]
                        ),
                    ));
                }
                Some(self.param(&bname, &b, vec![ws[0]], ParamKind::Bias)?)
            }
            None => None,
        };
        let shape = vec![ws[0], p.out_len(h, k), p.out_len(wd, k)];
        let a = self.push(Op::Conv { w: wid, b: bid, p }, vec![x.id], shape);
        self.set(node, Value::Act(a));
        Ok(())
    }

    /// A 1x1 convolution of a `[C, 1, 1]` value whose graph node is `[C]`
    /// (after a global pool, as in squeeze-and-excitation): exactly a
    /// linear layer, which is what the graph gets.
    fn conv_of_vector(&mut self, node: &NodeProto, i: usize, a: Act) -> Result<()> {
        let (w, wname) = self.constant(node, i, 1)?;
        let bias = self.opt_constant(node, i, 2)?;
        let c = a.shape[0];
        let pads = attr::ints(node, "pads").unwrap_or_default();
        let plain = w.shape.len() == 4
            && w.shape[1] == c
            && w.shape[2..] == [1, 1]
            && attr::int(node, "group", 1) == 1
            && pads.iter().all(|&p| p == 0);
        if !plain {
            return Err(self.err(
                node,
                i,
                format!(
                    "a convolution of a [{c}, 1, 1] value is supported only as a 1x1 conv without padding or groups (weight `{wname}` {:?})",
                    w.shape
                ),
            ));
        }
        let o = w.shape[0];
        let wt = Tensor::new(&[o, c], w.floats())?;
        let b = bias.map(|(b, name)| (b.floats(), name));
        let flat = Act {
            shape: vec![c],
            ..a
        };
        let mut r = self.linear(flat, wt, &wname, b, node, i)?;
        r.shape = vec![o, 1, 1];
        self.set(node, Value::Act(r));
        Ok(())
    }

    fn batch_norm(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let x = self.map3(node, i, 0)?;
        if attr::int(node, "training_mode", 0) != 0 {
            return Err(self.err(
                node,
                i,
                "training_mode = 1 is not supported; export the model in eval mode",
            ));
        }
        let c = x.shape[0];
        let mut ids = [0; 4];
        let kinds = [
            ParamKind::BnWeight,
            ParamKind::BnBias,
            ParamKind::BnMean,
            ParamKind::BnVar,
        ];
        for (k, kind) in kinds.into_iter().enumerate() {
            let (t, name) = self.constant(node, i, k + 1)?;
            if t.len() != c {
                return Err(self.err(
                    node,
                    i,
                    format!("`{name}` has {} values for {c} channels", t.len()),
                ));
            }
            if kind == ParamKind::BnVar && t.floats().iter().any(|&v| v < 0.0) {
                return Err(self.err(
                    node,
                    i,
                    format!("`{name}` has a negative running variance; the weights are corrupt"),
                ));
            }
            ids[k] = self.param(&name, &t, vec![c], kind)?;
        }
        let eps = attr::float(node, "epsilon", 1e-5);
        let shape = self.b.shape(x.id).to_vec();
        let mut a = self.push(
            Op::BatchNorm {
                gamma: ids[0],
                beta: ids[1],
                mean: ids[2],
                var: ids[3],
                eps,
            },
            vec![x.id],
            shape,
        );
        a.shape = x.shape;
        self.set(node, Value::Act(a));
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let x = self.act(node, i, 0)?;
        let (w, wname) = self.constant(node, i, 1)?;
        let bias = self.opt_constant(node, i, 2)?;
        if attr::int(node, "transA", 0) != 0 {
            return Err(self.err(node, i, "transA = 1 is not supported"));
        }
        if w.shape.len() != 2 {
            return Err(self.err(
                node,
                i,
                format!(
                    "weight `{wname}` has shape {:?}; a matrix is needed",
                    w.shape
                ),
            ));
        }
        let alpha = attr::float(node, "alpha", 1.0);
        let beta = attr::float(node, "beta", 1.0);
        let wt = if attr::int(node, "transB", 0) != 0 {
            Tensor::new(&w.shape, w.floats().iter().map(|v| v * alpha).collect())?
        } else {
            transpose(&w, alpha)?
        };
        let o = wt.shape()[0];
        let b = match bias {
            Some((c, bname)) => {
                if !(c.shape == [o] || c.shape == [1, o] || c.len() == 1) {
                    return Err(self.err(
                        node,
                        i,
                        format!(
                            "bias `{bname}` of shape {:?} does not fit {o} outputs",
                            c.shape
                        ),
                    ));
                }
                let v = c.floats();
                let v = if v.len() == 1 { vec![v[0]; o] } else { v };
                Some((v.iter().map(|x| x * beta).collect(), bname))
            }
            None => None,
        };
        let a = self.linear(x, wt, &wname, b, node, i)?;
        self.set(node, Value::Act(a));
        Ok(())
    }

    /// The one place where an ONNX op type gets its meaning. Every
    /// supported op is one arm; what no arm takes is refused.
    fn map_node(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        match op {
            "Conv" => self.conv(node, i)?,
            "BatchNormalization" => self.batch_norm(node, i)?,
            "Relu" => {
                let x = self.act(node, i, 0)?;
                if x.nhwc {
                    return Err(self.err(
                        node,
                        i,
                        "an op between Transpose and Flatten is not supported",
                    ));
                }
                let shape = self.b.shape(x.id).to_vec();
                let mut a = self.push(Op::Relu, vec![x.id], shape);
                a.shape = x.shape;
                a.cols = x.cols;
                self.set(node, Value::Act(a));
            }
            "Sigmoid" => self.activation(node, i, Activation::Sigmoid)?,
            "HardSigmoid" => {
                let alpha = attr::float(node, "alpha", 0.2);
                let beta = attr::float(node, "beta", 0.5);
                self.activation(node, i, Activation::HardSigmoid { alpha, beta })?
            }
            "HardSwish" => self.activation(node, i, Activation::HardSwish)?,
            "LeakyRelu" => {
                let alpha = attr::float(node, "alpha", 0.01);
                self.activation(node, i, Activation::LeakyRelu { alpha })?
            }
            "Clip" => {
                let (min, max) = if self.opset >= 11 {
                    let bound = |k: usize, default: f32| -> Result<f32> {
                        Ok(match self.opt_constant(node, i, k)? {
                            Some((c, _)) if c.len() == 1 => c.floats()[0],
                            Some((c, name)) => {
                                return Err(self.err(
                                    node,
                                    i,
                                    format!(
                                        "bound `{name}` of shape {:?} is not a scalar",
                                        c.shape
                                    ),
                                ))
                            }
                            None => default,
                        })
                    };
                    (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?)
                } else {
                    (
                        attr::float(node, "min", f32::NEG_INFINITY),
                        attr::float(node, "max", f32::INFINITY),
                    )
                };
                self.activation(node, i, Activation::Clip { min, max })?
            }
            "Concat" => self.concat(node, i)?,
            "Pad" => self.pad(node, i)?,
            "ReduceMean" => self.reduce_mean(node, i)?,
            "Add" | "Sub" | "Mul" | "Div" => self.arithmetic(node, i, op)?,
            "MaxPool" => self.pool(node, i, true)?,
            "AveragePool" => self.pool(node, i, false)?,
            "GlobalAveragePool" => {
                let x = self.map3(node, i, 0)?;
                let id = self.b.global_avg_pool(x.id);
                self.set(node, Value::Act(Act::plain(id, vec![x.shape[0], 1, 1])));
            }
            "Flatten" => {
                let a = self.act(node, i, 0)?;
                let axis = attr::int(node, "axis", 1);
                if axis != 1 && axis != -(a.shape.len() as i64) {
                    return Err(self.err(
                        node,
                        i,
                        format!("axis {axis}: only Flatten to [N, -1] (axis 1) is supported"),
                    ));
                }
                self.flatten(node, i)?;
            }
            "Reshape" => {
                let a = self.act(node, i, 0)?;
                let (t, _) = self.constant(node, i, 1)?;
                let n = numel(&a.shape) as i64;
                let t = t.ints().unwrap_or(&[]).to_vec();
                let batch_like = |d: i64| d == BATCH || d == 0 || Some(d) == self.batch;
                let ok = match t.as_slice() {
                    [b, k] => (batch_like(*b) && (*k == -1 || *k == n)) || (*b == -1 && *k == n),
                    _ => false,
                };
                if !ok {
                    let shown: Vec<String> = t
                        .iter()
                        .map(|&d| {
                            if d == BATCH {
                                "N".into()
                            } else {
                                d.to_string()
                            }
                        })
                        .collect();
                    return Err(self.err(
                        node,
                        i,
                        format!(
                            "Reshape of [N, {:?}] to [{}]: only a flatten to [N, -1] is supported",
                            a.shape,
                            shown.join(", ")
                        ),
                    ));
                }
                self.flatten(node, i)?;
            }
            "Transpose" => {
                let a = self.act(node, i, 0)?;
                let perm = attr::ints(node, "perm").unwrap_or_default();
                if perm != [0, 2, 3, 1] || a.shape.len() != 3 || a.nhwc {
                    return Err(self.err(
                        node,
                        i,
                        format!("perm {perm:?}: only the channels-last Transpose (0, 2, 3, 1) before a Flatten is supported"),
                    ));
                }
                self.set(node, Value::Act(Act { nhwc: true, ..a }));
            }
            "Gemm" => self.gemm(node, i)?,
            "MatMul" => {
                let x = self.act(node, i, 0)?;
                let (w, name) = self.constant(node, i, 1)?;
                if w.shape.len() != 2 {
                    return Err(self.err(
                        node,
                        i,
                        format!(
                            "weight `{name}` has shape {:?}; a matrix [K, O] is needed",
                            w.shape
                        ),
                    ));
                }
                let w = transpose(&w, 1.0)?;
                self.set(node, Value::MatMul { x, w, name });
            }
            "Identity" | "Dropout" => {
                let v = self.value(node, i, 0)?;
                self.set(node, v);
            }
            "Softmax" => {
                let out = node.output.first().cloned().unwrap_or_default();
                if !self.outputs.contains(&out) {
                    return Err(self.err(
                        node,
                        i,
                        "a Softmax is supported only as the model's last op (where it is removed)",
                    ));
                }
                let v = self.value(node, i, 0)?;
                self.notes.push(format!(
                    "removed the trailing Softmax (node {}): the search and the loss need logits",
                    node_label(node, i)
                ));
                self.set(node, v);
            }
            _ => return Err(self.unsupported(node, i)),
        }
        Ok(())
    }

    /// An elementwise activation of input 0 (any shape; channels-last data
    /// keeps its layout, as the op does not mix elements).
    fn activation(&mut self, node: &NodeProto, i: usize, act: Activation) -> Result<()> {
        let x = self.act(node, i, 0)?;
        let id = self.b.act(x.id, act).map_err(|e| self.err(node, i, e))?;
        self.set(node, Value::Act(Act { id, ..x }));
        Ok(())
    }

    /// Concat of feature maps on the channel axis.
    fn concat(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let axis = attr::int(node, "axis", 1);
        if axis != 1 && axis != -3 {
            return Err(self.err(node, i, format!("axis {axis}: only a Concat of [N, C, H, W] maps on the channel axis is supported")));
        }
        let mut ids = Vec::new();
        for k in 0..node.input.len() {
            ids.push(self.map3(node, i, k)?.id);
        }
        let id = self.b.concat(&ids).map_err(|e| self.err(node, i, e))?;
        // Feature maps: the graph's shape is ONNX's.
        let shape = self.b.shape(id).to_vec();
        self.set(node, Value::Act(Act::plain(id, shape)));
        Ok(())
    }

    /// Pad with zeros on H and W.
    fn pad(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let x = self.map3(node, i, 0)?;
        let mode = attr::string(node, "mode").unwrap_or_else(|| "constant".into());
        let (pads, value) = if self.opset >= 11 {
            let (p, _) = self.constant(node, i, 1)?;
            let pads = p.ints().map(<[i64]>::to_vec).unwrap_or_default();
            let value = match self.opt_constant(node, i, 2)? {
                Some((v, _)) => v.floats().first().copied().unwrap_or(0.0),
                None => 0.0,
            };
            if let Some((axes, _)) = self.opt_constant(node, i, 3)? {
                // Pads of the listed axes only: spread them over all four.
                let axes = axes.ints().map(<[i64]>::to_vec).unwrap_or_default();
                let mut full = vec![0i64; 8];
                for (j, &a) in axes.iter().enumerate() {
                    let a = if a < 0 { a + 4 } else { a };
                    if !(0..4).contains(&a) || pads.len() != 2 * axes.len() {
                        return Err(self.err(
                            node,
                            i,
                            format!("axes {axes:?} do not fit pads {pads:?}"),
                        ));
                    }
                    full[a as usize] = pads[j];
                    full[a as usize + 4] = pads[j + axes.len()];
                }
                (full, value)
            } else {
                (pads, value)
            }
        } else {
            (
                attr::ints(node, "pads").unwrap_or_default(),
                attr::float(node, "value", 0.0),
            )
        };
        let ok = mode == "constant"
            && value == 0.0
            && pads.len() == 8
            && pads.iter().all(|&p| p >= 0)
            && pads[0] == 0
            && pads[1] == 0
            && pads[4] == 0
            && pads[5] == 0;
        if !ok {
            return Err(self.err(node, i, format!(
                "mode `{mode}`, value {value}, pads {pads:?}: only zero padding of H and W (no cropping) is supported"
            )));
        }
        let p = Pad2d {
            top: pads[2] as usize,
            left: pads[3] as usize,
            bottom: pads[6] as usize,
            right: pads[7] as usize,
        };
        let id = self.b.pad(x.id, p).map_err(|e| self.err(node, i, e))?;
        let shape = self.b.shape(id).to_vec();
        self.set(node, Value::Act(Act::plain(id, shape)));
        Ok(())
    }

    /// ReduceMean over H and W: a global average pool (`[C, 1, 1]` kept,
    /// or `[C]`), as the dynamo exporter writes `adaptive_avg_pool2d(x, 1)`.
    fn reduce_mean(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let x = self.map3(node, i, 0)?;
        // Opset 18 moved the axes from an attribute to an input.
        let axes = match self.opt_constant(node, i, 1)? {
            Some((c, _)) => c.ints().map(<[i64]>::to_vec),
            None => attr::ints(node, "axes"),
        };
        let mut axes: Vec<i64> = axes
            .unwrap_or_default()
            .iter()
            .map(|&a| if a < 0 { a + 4 } else { a })
            .collect();
        axes.sort_unstable();
        if axes != [2, 3] {
            return Err(self.err(
                node,
                i,
                format!("axes {axes:?}: only a mean over H and W (axes 2, 3) is supported"),
            ));
        }
        let id = self.b.global_avg_pool(x.id);
        let c = x.shape[0];
        let shape = if attr::int(node, "keepdims", 1) != 0 {
            vec![c, 1, 1]
        } else {
            vec![c]
        };
        self.set(node, Value::Act(Act::plain(id, shape)));
        Ok(())
    }

    fn unsupported(&self, node: &NodeProto, i: usize) -> Error {
        let domain = node.domain.as_deref().unwrap_or("");
        self.err(
            node,
            i,
            format!(
                "op {}{} is not supported; supported ops: {}",
                if domain.is_empty() || domain == "ai.onnx" {
                    String::new()
                } else {
                    format!("{domain}::")
                },
                node.op_type.as_deref().unwrap_or("?"),
                supported_ops().join(", ")
            ),
        )
    }

    fn step(&mut self, node: &NodeProto, i: usize) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        // Constant inputs: fold when the op can be evaluated here.
        let ins: Vec<Option<&Value>> = node
            .input
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    self.values.get(n)
                }
            })
            .collect();
        let all_const = ins
            .iter()
            .all(|v| matches!(v, Some(Value::Const(..)) | None))
            && fold::FOLDABLE.contains(&op);
        if all_const {
            let cs: Vec<&Const> = ins
                .iter()
                .filter_map(|v| match v {
                    Some(Value::Const(c, _)) => Some(c),
                    _ => None,
                })
                .collect();
            if let Some(c) = fold::fold(node, &cs, self.path)? {
                let name = node.output.first().cloned().unwrap_or_default();
                self.set(node, Value::Const(c, name));
                return Ok(());
            }
            if op == "Constant" {
                return Err(self.err(
                    node,
                    i,
                    "a Constant without a tensor, float or int value is not supported",
                ));
            }
        }
        if op == "CastLike" {
            // A constant cast like an activation (the dynamo exporter's zero
            // conv bias): activations are float.
            if let Some(Value::Const(c, _)) = node.input.first().and_then(|n| self.values.get(n)) {
                let c = fold::cast_like(c, &ConstData::Float(Vec::new()));
                let name = node.output.first().cloned().unwrap_or_default();
                self.set(node, Value::Const(c, name));
                return Ok(());
            }
        }
        if op == "Shape" {
            let shape: Vec<usize> = match self.value(node, i, 0)? {
                Value::Const(c, _) => {
                    let v: Vec<i64> = c.shape.iter().map(|&d| d as i64).collect();
                    let c = fold::shape_of(node, &v);
                    self.set(node, Value::Const(c, String::new()));
                    return Ok(());
                }
                Value::Act(a) if a.nhwc => vec![a.shape[1], a.shape[2], a.shape[0]],
                Value::Act(a) => a.shape,
                Value::Front { .. } => self.b_input().to_vec(),
                Value::MatMul { w, .. } => vec![w.shape()[0]],
            };
            let mut full = vec![BATCH];
            full.extend(shape.iter().map(|&d| d as i64));
            let c = fold::shape_of(node, &full);
            self.set(node, Value::Const(c, String::new()));
            return Ok(());
        }
        self.map_node(node, i)
    }
}

fn transpose(w: &Const, scale: f32) -> Result<Tensor> {
    let (r, c) = (w.shape[0], w.shape[1]);
    let v = w.floats();
    let mut d = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            d[j * r + i] = v[i * c + j] * scale;
        }
    }
    Tensor::new(&[c, r], d)
}

/// The model's input: its name and `[C, H, W]` (the batch axis may be
/// symbolic; another symbolic axis takes its extent from `input`, i.e.
/// `--input-shape`), and the batch extent if the file fixes it.
fn graph_input(
    g: &GraphProto,
    inits: &HashMap<String, Const>,
    input: Option<[usize; 3]>,
    path: &Path,
) -> Result<(String, [usize; 3], Option<i64>)> {
    use super::proto::tensor_shape_proto::dimension::Value as Dim;
    use super::proto::type_proto::Value as Ty;
    let real: Vec<_> = g
        .input
        .iter()
        .filter(|v| !inits.contains_key(v.name.as_deref().unwrap_or("")))
        .collect();
    let [vi] = real.as_slice() else {
        return Err(Error::format(
            path,
            format!(
                "the ONNX graph has {} inputs; one image input is needed",
                real.len()
            ),
        ));
    };
    let name = vi.name.clone().unwrap_or_default();
    let tensor = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Ty::TensorType(t)) => t,
        _ => {
            return Err(Error::format(
                path,
                format!("input `{name}` is not a tensor"),
            ))
        }
    };
    if tensor.elem_type != Some(1) {
        return Err(Error::format(
            path,
            format!(
                "input `{name}` has element type {:?}; float32 is needed",
                tensor.elem_type
            ),
        ));
    }
    let dims: Vec<Option<&Dim>> = tensor
        .shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| d.value.as_ref()).collect())
        .unwrap_or_default();
    if dims.len() != 4 {
        return Err(Error::format(
            path,
            format!(
                "input `{name}` has rank {}; images [N, C, H, W] are needed",
                dims.len()
            ),
        ));
    }
    let batch = match dims[0] {
        Some(Dim::DimValue(v)) if *v > 0 => Some(*v),
        _ => None,
    };
    let axes = ["channels", "height", "width"];
    let mut out = [0usize; 3];
    for k in 0..3 {
        match (dims[k + 1], input) {
            (Some(Dim::DimValue(v)), given) if *v > 0 => {
                if let Some(g) = given {
                    if g[k] != *v as usize {
                        return Err(Error::arg(
                            "--input-shape",
                            format!(
                                "{} {} is {v} in {}, not {}",
                                name,
                                axes[k],
                                path.display(),
                                g[k]
                            ),
                        ));
                    }
                }
                out[k] = *v as usize;
            }
            (_, Some(g)) => out[k] = g[k],
            (d, None) => {
                let sym = match d {
                    Some(Dim::DimParam(s)) => format!("symbolic (`{s}`)"),
                    _ => "unknown".to_string(),
                };
                return Err(Error::arg(
                    "--input-shape",
                    format!(
                        "the {} of input `{name}` of {} is {sym}; pass --input-shape C,H,W",
                        axes[k],
                        path.display()
                    ),
                ));
            }
        }
    }
    if out.contains(&0) {
        return Err(Error::arg(
            "--input-shape",
            format!("input shape {out:?} has a zero extent"),
        ));
    }
    Ok((name, out, batch))
}

/// Builds the graph of a parsed ONNX model. Every node is checked against
/// the supported set before any is mapped, so an unsupported op is the
/// first error a user sees.
pub fn import(
    model: &super::proto::ModelProto,
    opset: i64,
    inits: HashMap<String, Const>,
    input: Option<[usize; 3]>,
    path: &Path,
) -> Result<Imported> {
    let g = model.graph.as_ref().expect("checked by parse_model");
    let supported = supported_ops();
    for (i, node) in g.node.iter().enumerate() {
        let domain = node.domain.as_deref().unwrap_or("");
        let op = node.op_type.as_deref().unwrap_or("");
        if !(domain.is_empty() || domain == "ai.onnx") || !supported.contains(&op) {
            let probe = Importer::empty(path, opset);
            return Err(probe.unsupported(node, i));
        }
    }
    let (input_name, shape, batch) = graph_input(g, &inits, input, path)?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let arch = format!("onnx:{stem}");
    let mut imp = Importer::empty(path, opset);
    imp.b = Builder::new(&arch, shape, 0);
    imp.channels = shape[0];
    imp.batch = batch;
    imp.outputs = g.output.iter().filter_map(|o| o.name.clone()).collect();
    for (name, c) in inits {
        imp.values.insert(name.clone(), Value::Const(c, name));
    }
    imp.values.insert(
        input_name,
        Value::Front {
            a: vec![1.0; shape[0]],
            b: vec![0.0; shape[0]],
        },
    );
    for (i, node) in g.node.iter().enumerate() {
        imp.step(node, i)?;
    }
    let [out_name] = imp.outputs.as_slice() else {
        return Err(Error::format(
            path,
            format!(
                "the ONNX graph has {} outputs; one (the logits) is needed",
                imp.outputs.len()
            ),
        ));
    };
    let out_name = out_name.clone();
    let v = imp.values.get(&out_name).cloned().ok_or_else(|| {
        Error::format(path, format!("output `{out_name}` is produced by no node"))
    })?;
    let last = NodeProto {
        name: Some(out_name.clone()),
        op_type: Some("output".into()),
        ..Default::default()
    };
    let a = imp.materialise(v, &last, g.node.len())?;
    if a.shape.len() != 1 || imp.b.shape(a.id).len() != 1 {
        return Err(Error::format(
            path,
            format!(
                "output `{out_name}` has per-image shape {:?}; logits [N, classes] are needed",
                a.shape
            ),
        ));
    }
    if a.id + 1 != imp.b.node_count() {
        return Err(Error::format(path, format!("output `{out_name}` is not computed last: the graph has branches that do not lead to it")));
    }
    let num_classes = a.shape[0];
    if num_classes < 2 {
        return Err(Error::format(
            path,
            format!(
                "output `{out_name}` has {num_classes} class(es); a classifier needs at least 2"
            ),
        ));
    }
    let Importer {
        b, params, notes, ..
    } = imp;
    let mut graph = b.finish();
    graph.num_classes = num_classes;
    graph.check_params(&params)?;
    Ok(Imported {
        graph,
        params,
        notes,
    })
}

impl<'a> Importer<'a> {
    fn empty(path: &'a Path, opset: i64) -> Importer<'a> {
        Importer {
            b: Builder::new("onnx", [1, 1, 1], 0),
            params: Vec::new(),
            values: HashMap::new(),
            path,
            opset,
            channels: 1,
            batch: None,
            outputs: Vec::new(),
            notes: Vec::new(),
            param_names: HashMap::new(),
        }
    }
}
