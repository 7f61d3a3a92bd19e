#!/usr/bin/env bash
# The main job, from a fresh Debian machine: installs what it needs, builds
# cwp, and runs `cwp demo` on the embedded default models (report in
# ./cwp-demo/). Extra arguments go to `cwp demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ensure_apt dataset-fashion-mnist
ensure_cxx
ensure_rust
cargo build --release
./target/release/cwp demo "$@"
