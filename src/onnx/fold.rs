//! Constant folding of what exporters emit around the real layers: the
//! `Constant` nodes, and the Shape -> Gather -> Unsqueeze -> Concat (-> Cast)
//! chains that compute a Reshape's target from the runtime batch size. The
//! batch size is not known at import, so `Shape` reports it as [`BATCH`], a
//! value no real extent has, which the Reshape mapping then recognises.

use std::path::Path;

use super::attr;
use super::load::{decode_tensor, Const, ConstData};
use super::proto::NodeProto;
use crate::error::Result;

/// Stand-in for the symbolic batch extent inside folded shape arithmetic.
pub const BATCH: i64 = 1 << 40;

/// The op types [`fold`] evaluates when all their inputs are constant.
pub const FOLDABLE: &[&str] = &[
    "Constant",
    "Identity",
    "Cast",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Reshape",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Expand",
    "CastLike",
    "ConstantOfShape",
    "Slice",
    "Transpose",
];

fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// The `Shape` of a value whose full ONNX shape is `shape` (batch first,
/// given as [`BATCH`]), with opset 15's `start`/`end`.
pub fn shape_of(node: &NodeProto, shape: &[i64]) -> Const {
    let r = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(attr::int(node, "start", 0));
    let end = clamp(attr::int(node, "end", r)).max(start);
    let v = shape[start..end].to_vec();
    Const {
        shape: vec![v.len()],
        data: ConstData::Int(v),
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn pick<T: Copy>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i]).collect()
}

fn map_data(c: &Const, idx: &[usize]) -> ConstData {
    match &c.data {
        ConstData::Float(v) => ConstData::Float(pick(v, idx)),
        ConstData::Int(v) => ConstData::Int(pick(v, idx)),
    }
}

fn gather(node: &NodeProto, data: &Const, indices: &Const) -> Option<Const> {
    let ax = axis(attr::int(node, "axis", 0), data.shape.len())?;
    let n = data.shape[ax] as i64;
    let ids: Vec<usize> = indices
        .ints()?
        .iter()
        .map(|&i| if i < 0 { i + n } else { i })
        .map(|i| (0..n).contains(&i).then_some(i as usize))
        .collect::<Option<_>>()?;
    let outer: usize = data.shape[..ax].iter().product();
    let inner: usize = data.shape[ax + 1..].iter().product();
    let mut idx = Vec::new();
    for o in 0..outer {
        for &i in &ids {
            for k in 0..inner {
                idx.push((o * data.shape[ax] + i) * inner + k);
            }
        }
    }
    let mut shape = data.shape[..ax].to_vec();
    shape.extend(&indices.shape);
    shape.extend(&data.shape[ax + 1..]);
    Some(Const {
        shape,
        data: map_data(data, &idx),
    })
}

fn axes_of(node: &NodeProto, inputs: &[&Const]) -> Option<Vec<i64>> {
    match inputs.get(1) {
        Some(c) => Some(c.ints()?.to_vec()),
        None => attr::ints(node, "axes"),
    }
}

fn concat(node: &NodeProto, inputs: &[&Const]) -> Option<Const> {
    let first = inputs.first()?;
    let ax = axis(attr::int(node, "axis", 0), first.shape.len())?;
    let outer: usize = first.shape[..ax].iter().product();
    let mut shape = first.shape.clone();
    shape[ax] = inputs
        .iter()
        .map(|c| c.shape.get(ax).copied().unwrap_or(0))
        .sum();
    let float = inputs.iter().any(|c| matches!(c.data, ConstData::Float(_)));
    let mut fl = Vec::new();
    let mut it = Vec::new();
    for o in 0..outer {
        for c in inputs {
            if c.shape.len() != first.shape.len() {
                return None;
            }
            let chunk: usize = c.shape[ax..].iter().product();
            let range = o * chunk..(o + 1) * chunk;
            if float {
                fl.extend_from_slice(&c.floats()[range]);
            } else {
                it.extend_from_slice(&c.ints()?[range]);
            }
        }
    }
    Some(Const {
        shape,
        data: if float {
            ConstData::Float(fl)
        } else {
            ConstData::Int(it)
        },
    })
}

/// Elementwise arithmetic with numpy broadcasting.
fn binary(op: &str, a: &Const, b: &Const) -> Option<Const> {
    let rank = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| {
        let mut v = vec![1; rank - s.len()];
        v.extend_from_slice(s);
        v
    };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let shape: Vec<usize> = sa
        .iter()
        .zip(&sb)
        .map(|(&x, &y)| (x == y || x == 1 || y == 1).then_some(x.max(y)))
        .collect::<Option<_>>()?;
    let (ta, tb, to) = (strides(&sa), strides(&sb), strides(&shape));
    let n: usize = shape.iter().product();
    let index = |i: usize, s: &[usize], t: &[usize]| -> usize {
        (0..rank)
            .map(|d| {
                if s[d] == 1 {
                    0
                } else {
                    (i / to[d]) % shape[d] * t[d]
                }
            })
            .sum()
    };
    let data = match (&a.data, &b.data) {
        (ConstData::Int(x), ConstData::Int(y)) => {
            let f = |p: i64, q: i64| -> Option<i64> {
                match op {
                    "Add" => p.checked_add(q),
                    "Sub" => p.checked_sub(q),
                    "Mul" => p.checked_mul(q),
                    _ => (q != 0).then(|| p.div_euclid(q)),
                }
            };
            ConstData::Int(
                (0..n)
                    .map(|i| f(x[index(i, &sa, &ta)], y[index(i, &sb, &tb)]))
                    .collect::<Option<_>>()?,
            )
        }
        _ => {
            let (x, y) = (a.floats(), b.floats());
            let f = |p: f32, q: f32| match op {
                "Add" => p + q,
                "Sub" => p - q,
                "Mul" => p * q,
                _ => p / q,
            };
            ConstData::Float(
                (0..n)
                    .map(|i| f(x[index(i, &sa, &ta)], y[index(i, &sb, &tb)]))
                    .collect(),
            )
        }
    };
    Some(Const { shape, data })
}

/// `Slice` of a constant (opset 10+: starts, ends, axes, steps as inputs;
/// before: attributes; steps of any sign).
fn slice(node: &NodeProto, inputs: &[&Const]) -> Option<Const> {
    let data = inputs.first()?;
    let rank = data.shape.len();
    let list = |k: usize, name: &str| -> Option<Vec<i64>> {
        match inputs.get(k) {
            Some(c) => Some(c.ints()?.to_vec()),
            None => attr::ints(node, name),
        }
    };
    let starts = list(1, "starts")?;
    let ends = list(2, "ends")?;
    let axes = list(3, "axes").unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = list(4, "steps").unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return None;
    }
    // Per axis: the source indices it keeps.
    let mut keep: Vec<Vec<usize>> = data.shape.iter().map(|&d| (0..d).collect()).collect();
    for k in 0..starts.len() {
        let ax = axis(axes[k], rank)?;
        let d = data.shape[ax] as i64;
        let step = steps[k];
        if step == 0 {
            return None;
        }
        let clampi = |v: i64, lo: i64, hi: i64| -> i64 {
            let v = if v < 0 { v + d } else { v };
            v.clamp(lo, hi)
        };
        let mut idx = Vec::new();
        if step > 0 {
            let (mut i, e) = (clampi(starts[k], 0, d), clampi(ends[k], 0, d));
            while i < e {
                idx.push(i as usize);
                i += step;
            }
        } else {
            let (mut i, e) = (clampi(starts[k], -1, d - 1), clampi(ends[k], -1, d - 1));
            while i > e {
                idx.push(i as usize);
                i += step;
            }
        }
        keep[ax] = idx;
    }
    let shape: Vec<usize> = keep.iter().map(Vec::len).collect();
    let st = strides(&data.shape);
    let mut flat = vec![0usize];
    for (ids, &stride) in keep.iter().zip(&st) {
        flat = flat
            .iter()
            .flat_map(|&base| ids.iter().map(move |&i| base + i * stride))
            .collect();
    }
    Some(Const {
        shape,
        data: map_data(data, &flat),
    })
}

/// `Transpose` of a constant.
fn transpose(node: &NodeProto, c: &Const) -> Option<Const> {
    let rank = c.shape.len();
    let perm: Vec<usize> = match attr::ints(node, "perm") {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Option<_>>()?,
        None => (0..rank).rev().collect(),
    };
    if perm.len() != rank {
        return None;
    }
    let shape: Vec<usize> = perm.iter().map(|&p| c.shape[p]).collect();
    let (st, out_st) = (strides(&c.shape), strides(&shape));
    let n = c.len();
    let idx: Vec<usize> = (0..n)
        .map(|o| {
            (0..rank)
                .map(|d| (o / out_st[d]) % shape[d].max(1) * st[perm[d]])
                .sum()
        })
        .collect();
    Some(Const {
        shape,
        data: map_data(c, &idx),
    })
}

/// `Expand`: numpy's two-way broadcast of `data` with the shape `target`
/// (the dynamo exporter builds a conv's zero bias so).
fn expand(data: &Const, target: &Const) -> Option<Const> {
    let dims: Vec<usize> = target
        .ints()?
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let n: usize = dims.iter().product();
    let ones = Const {
        shape: dims,
        data: match data.data {
            ConstData::Float(_) => ConstData::Float(vec![1.0; n]),
            ConstData::Int(_) => ConstData::Int(vec![1; n]),
        },
    };
    // x * 1 is x exactly, in both kinds.
    binary("Mul", data, &ones)
}

/// `CastLike`: `c` in the kind (float or integer) of `like`. Activations
/// are float, so a constant cast like one becomes float.
pub fn cast_like(c: &Const, like: &ConstData) -> Const {
    let data = match (like, &c.data) {
        (ConstData::Float(_), _) => ConstData::Float(c.floats()),
        (ConstData::Int(_), ConstData::Int(v)) => ConstData::Int(v.clone()),
        (ConstData::Int(_), ConstData::Float(v)) => {
            ConstData::Int(v.iter().map(|x| x.trunc() as i64).collect())
        }
    };
    Const {
        shape: c.shape.clone(),
        data,
    }
}

fn reshape(data: &Const, target: &Const) -> Option<Const> {
    let t = target.ints()?;
    let n = data.len();
    let mut shape = Vec::new();
    let mut infer = None;
    for (i, &d) in t.iter().enumerate() {
        match d {
            0 => shape.push(*data.shape.get(i)?),
            -1 if infer.is_none() => {
                infer = Some(i);
                shape.push(1);
            }
            d if d > 0 => shape.push(d as usize),
            _ => return None,
        }
    }
    let known: usize = shape.iter().product();
    if let Some(i) = infer {
        if known == 0 || !n.is_multiple_of(known) {
            return None;
        }
        shape[i] = n / known;
    }
    (shape.iter().product::<usize>() == n).then(|| Const {
        shape,
        data: data.data.clone(),
    })
}

/// The value of `node` when every input is constant, `Ok(None)` when this
/// op (or this use of it) is not something folding handles. `path` names
/// the file in errors.
pub fn fold(node: &NodeProto, inputs: &[&Const], path: &Path) -> Result<Option<Const>> {
    let op = node.op_type.as_deref().unwrap_or("");
    let out = match op {
        "Constant" => {
            if let Some(t) = attr::get(node, "value").and_then(|a| a.t.as_ref()) {
                Some(decode_tensor(t, path)?)
            } else if let Some(a) = attr::get(node, "value_float").and_then(|a| a.f) {
                Some(Const {
                    shape: vec![],
                    data: ConstData::Float(vec![a]),
                })
            } else if let Some(a) = attr::get(node, "value_floats") {
                Some(Const {
                    shape: vec![a.floats.len()],
                    data: ConstData::Float(a.floats.clone()),
                })
            } else if let Some(a) = attr::get(node, "value_int").and_then(|a| a.i) {
                Some(Const {
                    shape: vec![],
                    data: ConstData::Int(vec![a]),
                })
            } else {
                attr::get(node, "value_ints").map(|a| Const {
                    shape: vec![a.ints.len()],
                    data: ConstData::Int(a.ints.clone()),
                })
            }
        }
        "Identity" => inputs.first().map(|c| (*c).clone()),
        "Cast" => inputs.first().map(|c| {
            // 1 float, 10 float16, 11 double, 16 bfloat16: floats; the rest integers.
            let to = attr::int(node, "to", 1);
            let data = if matches!(to, 1 | 10 | 11 | 16) {
                ConstData::Float(c.floats())
            } else {
                match &c.data {
                    ConstData::Int(v) => ConstData::Int(v.clone()),
                    ConstData::Float(v) => {
                        ConstData::Int(v.iter().map(|x| x.trunc() as i64).collect())
                    }
                }
            };
            Const {
                shape: c.shape.clone(),
                data,
            }
        }),
        "Gather" if inputs.len() == 2 => gather(node, inputs[0], inputs[1]),
        "Unsqueeze" => match (inputs.first(), axes_of(node, inputs)) {
            (Some(c), Some(axes)) => {
                let rank = c.shape.len() + axes.len();
                let mut ax: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, rank))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                ax.sort_unstable();
                let mut shape = c.shape.clone();
                for a in ax {
                    shape.insert(a.min(shape.len()), 1);
                }
                (shape.len() == rank).then(|| Const {
                    shape,
                    data: c.data.clone(),
                })
            }
            _ => None,
        },
        "Squeeze" => inputs.first().map(|c| {
            let axes: Vec<usize> = axes_of(node, inputs)
                .map(|a| a.iter().filter_map(|&x| axis(x, c.shape.len())).collect())
                .unwrap_or_else(|| (0..c.shape.len()).filter(|&i| c.shape[i] == 1).collect());
            let shape = c
                .shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect();
            Const {
                shape,
                data: c.data.clone(),
            }
        }),
        "Concat" => concat(node, inputs),
        "Reshape" if inputs.len() == 2 => reshape(inputs[0], inputs[1]),
        "Add" | "Sub" | "Mul" | "Div" if inputs.len() == 2 => binary(op, inputs[0], inputs[1]),
        "Expand" if inputs.len() == 2 => expand(inputs[0], inputs[1]),
        "ConstantOfShape" => match inputs.first().and_then(|c| c.ints()) {
            Some(dims) => {
                let value = match attr::get(node, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => decode_tensor(t, path)?,
                    None => Const {
                        shape: vec![1],
                        data: ConstData::Float(vec![0.0]),
                    },
                };
                let dims: Option<Vec<usize>> =
                    dims.iter().map(|&d| usize::try_from(d).ok()).collect();
                match (dims, value.len()) {
                    (Some(dims), 1) => {
                        let n: usize = dims.iter().product();
                        let data = match value.data {
                            ConstData::Float(v) => ConstData::Float(vec![v[0]; n]),
                            ConstData::Int(v) => ConstData::Int(vec![v[0]; n]),
                        };
                        Some(Const { shape: dims, data })
                    }
                    _ => None,
                }
            }
            None => None,
        },
        "Slice" => slice(node, inputs),
        "Transpose" => inputs.first().and_then(|c| transpose(node, c)),
        "CastLike" if inputs.len() == 2 => Some(cast_like(inputs[0], &inputs[1].data)),
        _ => None,
    };
    Ok(out)
}
