# Shared set-up of scripts/demo.sh and scripts/test.sh (sourced, not run):
# installs, on a fresh Debian machine, what building and testing need.
# Each step is skipped when its result is already there.

set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages, installed only when missing.
ensure_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# A Rust toolchain (rustup) when cargo is missing.
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
      ensure_apt curl ca-certificates
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    }
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}

# The C++ compiler that build.rs uses for the emulated CUDA driver.
ensure_cxx() {
  command -v g++ >/dev/null 2>&1 || ensure_apt g++
}

# NVRTC (the nvidia-cuda-nvrtc wheel) for the kernel compile check; sets
# CWP_NVRTC_LIB and LD_LIBRARY_PATH.
ensure_nvrtc() {
  local root="$PWD/target/nvrtc-wheel"
  local lib
  lib=$(find "$root" -name 'libnvrtc.so.13*' -not -name '*builtins*' 2>/dev/null | head -n 1 || true)
  if [ -z "$lib" ]; then
    command -v python3 >/dev/null 2>&1 || ensure_apt python3
    python3 -m pip --version >/dev/null 2>&1 || ensure_apt python3-pip
    echo "setup: installing the nvidia-cuda-nvrtc wheel into $root" >&2
    python3 -m pip install -q --disable-pip-version-check --target "$root" 'nvidia-cuda-nvrtc>=13,<14' \
      || python3 -m pip install -q --disable-pip-version-check --break-system-packages --target "$root" 'nvidia-cuda-nvrtc>=13,<14'
    lib=$(find "$root" -name 'libnvrtc.so.13*' -not -name '*builtins*' | head -n 1)
  fi
  export CWP_NVRTC_LIB="$lib"
  export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
