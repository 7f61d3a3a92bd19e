#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests
# need (Fashion-MNIST, a C++ compiler, NVRTC, Rust if missing), then runs
# every test in release mode. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ensure_apt dataset-fashion-mnist
ensure_cxx
ensure_rust
ensure_nvrtc
cargo test --release "$@"
