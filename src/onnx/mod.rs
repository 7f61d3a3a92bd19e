//! ONNX import: a model exported by `torch.onnx.export`, tf2onnx and the
//! like becomes a [`Graph`](crate::graph::Graph) with host parameters, so
//! `--weights model.onnx` runs wherever a zoo model does. The file is told
//! by its content, not its name. Parsing uses prost with the code generated
//! once from ONNX's `onnx.proto` ([`proto`], see `tools/gen_onnx_proto.sh`).
//!
//! - [`load`]: the protobuf, the opset, initializers (f32/f16/bf16, inline or external);
//! - [`fold`]: constant folding of the shape arithmetic exporters emit;
//! - [`map`]: ONNX nodes to graph ops, one match arm per op type.

pub mod fold;
pub mod load;
pub mod map;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod proto;

mod attr;

use std::path::Path;

use crate::error::Result;

pub use map::{supported_ops, Imported};

/// True when `bytes` look like an ONNX model rather than a safetensors
/// file: a safetensors file starts with an 8-byte header length and `{`;
/// an ONNX `ModelProto` starts with one of its field tags (`ir_version`
/// first, as every exporter writes it).
pub fn looks_like_onnx(bytes: &[u8]) -> bool {
    let safetensors = bytes.len() >= 9 && bytes[8] == b'{';
    // Field 1 (ir_version, varint) or a length-delimited field 2..8 (producer, graph, ...).
    let protobuf = matches!(
        bytes.first(),
        Some(0x08 | 0x12 | 0x1a | 0x22 | 0x2a | 0x32 | 0x3a | 0x42)
    );
    // Under 9 bytes neither format can be told apart; the safetensors reader reports it.
    bytes.len() >= 9 && !safetensors && protobuf
}

/// Imports an ONNX model from its bytes (`path` locates external data and
/// names the file in errors). `input` is `--input-shape`, needed when an
/// axis other than the batch is symbolic.
pub fn import(bytes: &[u8], path: &Path, input: Option<[usize; 3]>) -> Result<Imported> {
    let (model, opset) = load::parse_model(bytes, path)?;
    let inits = load::initializers(&model, path)?;
    map::import(&model, opset, inits, input, path)
}
