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
        _ => None,
    };
    Ok(out)
}
