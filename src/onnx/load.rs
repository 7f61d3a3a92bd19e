//! Decoding an ONNX file: the protobuf itself, its default-domain opset, and
//! its initializers (f32, f16, bf16 or f64 floats; integers), whether inline
//! (`raw_data` or the typed fields) or in external data files next to the
//! model.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use super::proto::{tensor_proto::DataType, ModelProto, TensorProto};
use crate::error::{Error, Result};

/// The opsets of the default domain the importer knows.
pub const OPSETS: std::ops::RangeInclusive<i64> = 11..=21;

/// A constant tensor: a decoded initializer, a `Constant` node or a folded value.
#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    /// Full ONNX shape (batch axis included where there is one).
    pub shape: Vec<usize>,
    /// The values.
    pub data: ConstData,
}

/// Values of a [`Const`]: floats as f32, integers (and booleans) as i64.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstData {
    /// Float data of any precision, as f32.
    Float(Vec<f32>),
    /// Integer data, as i64.
    Int(Vec<i64>),
}

impl Const {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            ConstData::Float(v) => v.len(),
            ConstData::Int(v) => v.len(),
        }
    }

    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (integers converted).
    pub fn floats(&self) -> Vec<f32> {
        match &self.data {
            ConstData::Float(v) => v.clone(),
            ConstData::Int(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as i64, or `None` for float data.
    pub fn ints(&self) -> Option<&[i64]> {
        match &self.data {
            ConstData::Int(v) => Some(v),
            ConstData::Float(_) => None,
        }
    }
}

/// Parses an ONNX model, refusing a file that does not decode (e.g. a
/// truncated one) or whose default-domain opset is outside [`OPSETS`].
pub fn parse_model(bytes: &[u8], path: &Path) -> Result<(ModelProto, i64)> {
    let model = ModelProto::decode(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid ONNX model ({e}); is the file truncated?"),
        )
    })?;
    if model.graph.is_none() {
        return Err(Error::format(
            path,
            "not a valid ONNX model: it has no graph; is the file truncated?",
        ));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| Error::format(path, "the ONNX model imports no default-domain opset"))?;
    if !OPSETS.contains(&opset) {
        return Err(Error::format(
            path,
            format!(
                "ONNX opset {opset} is not supported; opsets {} to {} are",
                OPSETS.start(),
                OPSETS.end()
            ),
        ));
    }
    Ok((model, opset))
}

fn dims(t: &TensorProto, name: &str, path: &Path) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                Error::format(
                    path,
                    format!("tensor `{name}` has a negative dimension {d}"),
                )
            })
        })
        .collect()
}

/// The bytes of a tensor stored in an external file (`location`, `offset`,
/// `length`), relative to the model file's folder.
fn external_bytes(t: &TensorProto, name: &str, path: &Path) -> Result<Vec<u8>> {
    let entry = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .and_then(|e| e.value.clone())
    };
    let location = entry("location").ok_or_else(|| {
        Error::format(
            path,
            format!("tensor `{name}` is stored externally but names no location"),
        )
    })?;
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::format(
            path,
            format!("tensor `{name}`: external data location `{location}` must be a path inside the model's folder"),
        ));
    }
    let file = path.parent().unwrap_or(Path::new(".")).join(rel);
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let num = |key: &str| -> Result<Option<usize>> {
        entry(key)
            .map(|v| {
                v.parse::<usize>().map_err(|_| {
                    Error::format(
                        path,
                        format!("tensor `{name}`: external data {key} `{v}` is not a whole number"),
                    )
                })
            })
            .transpose()
    };
    let offset = num("offset")?.unwrap_or(0);
    let length = num("length")?.unwrap_or(bytes.len().saturating_sub(offset));
    let end = offset
        .checked_add(length)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            Error::format(
                &file,
                format!(
                "tensor `{name}` needs bytes {offset}..{} but the file has {}; is it truncated?",
                offset.saturating_add(length),
                bytes.len()
            ),
            )
        })?;
    Ok(bytes[offset..end].to_vec())
}

/// Decodes one tensor (an initializer or a `Constant`'s value).
pub fn decode_tensor(t: &TensorProto, path: &Path) -> Result<Const> {
    let name = t.name.clone().unwrap_or_default();
    let shape = dims(t, &name, path)?;
    let n: usize = shape.iter().product();
    let external =
        t.data_location == Some(super::proto::tensor_proto::DataLocation::External as i32);
    let raw: Option<Vec<u8>> = if external {
        Some(external_bytes(t, &name, path)?)
    } else {
        t.raw_data.clone()
    };
    let dt = t.data_type.and_then(|d| DataType::try_from(d).ok());
    let bad = |what: &str| Error::format(path, format!("tensor `{name}` {what}"));
    let width = match dt {
        Some(DataType::Float | DataType::Int32 | DataType::Uint32) => 4,
        Some(DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16) => 2,
        Some(DataType::Double | DataType::Int64 | DataType::Uint64) => 8,
        Some(DataType::Int8 | DataType::Uint8 | DataType::Bool) => 1,
        other => {
            return Err(bad(&format!(
                "has data type {}; float (f32, f16, bf16, f64) and integer tensors are supported",
                other
                    .map(|d| d.as_str_name().to_string())
                    .unwrap_or_else(|| format!("{:?}", t.data_type))
            )))
        }
    };
    let dt = dt.expect("matched above");
    let data = if let Some(raw) = raw {
        if raw.len() != n * width {
            return Err(bad(&format!(
                "holds {} bytes, but {n} elements of {} need {}; is the file truncated?",
                raw.len(),
                dt.as_str_name(),
                n * width
            )));
        }
        let u16s = || {
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
        };
        match dt {
            DataType::Float => ConstData::Float(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DataType::Float16 => {
                ConstData::Float(u16s().map(|b| half::f16::from_bits(b).to_f32()).collect())
            }
            DataType::Bfloat16 => {
                ConstData::Float(u16s().map(|b| half::bf16::from_bits(b).to_f32()).collect())
            }
            DataType::Double => ConstData::Float(
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            DataType::Int64 | DataType::Uint64 => ConstData::Int(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            DataType::Int32 => ConstData::Int(
                raw.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                    .collect(),
            ),
            DataType::Uint32 => ConstData::Int(
                raw.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                    .collect(),
            ),
            DataType::Int16 => ConstData::Int(u16s().map(|b| b as i16 as i64).collect()),
            DataType::Uint16 => ConstData::Int(u16s().map(|b| b as i64).collect()),
            DataType::Int8 => ConstData::Int(raw.iter().map(|&b| b as i8 as i64).collect()),
            _ => ConstData::Int(raw.iter().map(|&b| b as i64).collect()),
        }
    } else {
        // The typed fields: f16/bf16 (and small integers) keep their bits in int32_data.
        let low16 = |v: &i32| *v as u32 as u16;
        match dt {
            DataType::Float => ConstData::Float(t.float_data.clone()),
            DataType::Double => ConstData::Float(t.double_data.iter().map(|&v| v as f32).collect()),
            DataType::Float16 => ConstData::Float(
                t.int32_data
                    .iter()
                    .map(|v| half::f16::from_bits(low16(v)).to_f32())
                    .collect(),
            ),
            DataType::Bfloat16 => ConstData::Float(
                t.int32_data
                    .iter()
                    .map(|v| half::bf16::from_bits(low16(v)).to_f32())
                    .collect(),
            ),
            DataType::Int64 => ConstData::Int(t.int64_data.clone()),
            DataType::Uint32 | DataType::Uint64 => {
                ConstData::Int(t.uint64_data.iter().map(|&v| v as i64).collect())
            }
            _ => ConstData::Int(t.int32_data.iter().map(|&v| v as i64).collect()),
        }
    };
    let c = Const { shape, data };
    if c.len() != n {
        return Err(bad(&format!(
            "holds {} values, but its shape {:?} needs {n}; is the file truncated?",
            c.len(),
            c.shape
        )));
    }
    if let ConstData::Float(v) = &c.data {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(&format!(
                "has a non-finite value ({}) at element {i}; the weights are corrupt",
                v[i]
            )));
        }
    }
    Ok(c)
}

/// Every initializer of the graph, by name.
pub fn initializers(model: &ModelProto, path: &Path) -> Result<HashMap<String, Const>> {
    let graph = model.graph.as_ref().expect("checked by parse_model");
    if let Some(s) = graph.sparse_initializer.first() {
        let name = s
            .values
            .as_ref()
            .and_then(|v| v.name.clone())
            .unwrap_or_default();
        return Err(Error::format(
            path,
            format!("sparse initializer `{name}`: sparse tensors are not supported"),
        ));
    }
    let mut out = HashMap::new();
    for t in &graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        out.insert(name, decode_tensor(t, path)?);
    }
    Ok(out)
}
