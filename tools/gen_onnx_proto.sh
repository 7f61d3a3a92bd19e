#!/bin/sh
# Regenerates src/onnx/proto.rs (prost code for ONNX's onnx.proto) so that the
# crate itself needs neither protoc nor prost-build. Run from anywhere.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cargo run --release --manifest-path "$root/tools/onnx-proto-gen/Cargo.toml" \
    --target-dir "${CARGO_TARGET_DIR:-$root/target}/onnx-proto-gen" -- "$root"
