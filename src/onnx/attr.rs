//! Reading a node's attributes by name, with ONNX's defaults.

use super::proto::{AttributeProto, NodeProto};

fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
}

/// An integer attribute, or `default`.
pub fn int(node: &NodeProto, name: &str, default: i64) -> i64 {
    find(node, name).and_then(|a| a.i).unwrap_or(default)
}

/// A float attribute, or `default`.
pub fn float(node: &NodeProto, name: &str, default: f32) -> f32 {
    find(node, name).and_then(|a| a.f).unwrap_or(default)
}

/// An integer-list attribute, if present.
pub fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    find(node, name).map(|a| a.ints.clone())
}

/// A string attribute, if present.
pub fn string(node: &NodeProto, name: &str) -> Option<String> {
    find(node, name)
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// The attribute itself (for `Constant`'s tensor-valued ones).
pub fn get<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    find(node, name)
}
