#!/usr/bin/env bash
# The one prepared check for a GPU machine (an H200 here): correctness of the
# CUDA backend against the CPU reference, its throughput in every precision
# mode, and the best PyTorch configurations on the same GPU in the same run,
# as one JSON of ratios.
#
# The GPU machine has no Rust toolchain and no network, so the work is split:
#
#   scripts/gpu-check.sh prepare DIR
#       Here, with Rust: builds `cwp` and the `gpu_cuda` test executable in
#       release mode, fills DIR/kernel-cache with every kernel compiled for
#       sm_90 (`cwp precompile`, with the NVRTC wheel of scripts/setup.sh),
#       and copies this script, scripts/gpu_check_report.py,
#       benches/gpu_peers.py, tests/fixtures/zoo_torch.py, the shipped
#       models (a relative link when DIR is inside the checkout) and
#       Fashion-MNIST's test split into DIR; cwp travels gzipped (a device
#       call carries at most 64 MiB, the checkout included).
#
#   DIR/gpu-check.sh run [OUT]
#       On the GPU machine, from DIR, with CWP_CACHE_DIR=DIR/kernel-cache so
#       that no kernel needs NVRTC. Each step runs under its own timeout and
#       the whole under a budget (CWP_CHECK_BUDGET seconds, default 480):
#         0. bare start: cwp selftest --quick with CWP_NVRTC_LIB pointing
#            nowhere (every kernel must come from the precompiled cache)
#         1. cwp selftest --device cuda   (equivalence suite, table of errors),
#            then once per tensor-core mode (--precision tf32x3, tf32, bf16)
#         2. gpu_cuda tests               (ops, out of memory, damaged cache,
#                                         a search window replayed as a CUDA graph)
#         3. cwp bench, once per --precision mode if `cwp bench --help` lists
#            that flag (else the one default mode), in three parts: whole
#            models at batch 256, batched searches (S = 1, 10, 40, 160; 4 and
#            16 at 224x224), resnet50's convolutions at batch 256
#         4. gpu_peers.py: PyTorch as the authors run it, fp32, TF32 and bf16
#            channels_last, on the same workloads
#         5. Neural Cleanse on the shipped BadNets model, all classes batched
#            and then one class at a time (`--sequential`), 20 steps each
#            (issue 13's target: batched at least 2x faster)
#         6. issue 9's accuracy gate: `cwp search` with full defaults on each
#            shipped model in every mode, and in fp32 with --seed 1 (the
#            search's own spread), each compared with fp32's (about 7 s a
#            search on an H200; CWP_CHECK_GATE_MODELS, _MODES and _ARGS narrow
#            it); then the benches of the remaining precision modes
#         7. NVRTC probe: `cwp precompile` with no hint where NVRTC is
#       After every step, gpu_check_report.py rewrites OUT (defaults to $OUT,
#       else DIR/out): gpu-check.json (ratios and verdicts against the issue's
#       targets), bench.json, selftest.json (every mode), torch.json,
#       gate.json (each gate search's power and positions) and log.txt, so a
#       run cut short still leaves what it measured.
#       Exit status: 0 when the selftest and the tests passed.
#
#   Dry run without a GPU (checks the script and its JSON, not the GPU):
#     CWP_CHECK_DEVICE=emu CWP_CHECK_SELFTEST_ARGS=--quick \
#     CWP_CHECK_MODELS='smallcnn:2' CWP_CHECK_SEARCH='smallcnn:1,2' CWP_CHECK_CONVS='smallcnn:2' \
#     CWP_CHECK_SECONDS=0.05 CWP_CHECK_NC_STEPS=1 CWP_CHECK_TORCH_ARGS=--smoke \
#     CWP_CHECK_SELFTEST_MODES=tf32 CWP_CHECK_GATE_MODELS= \
#     CWP_CHECK_PYTHON=/path/to/python-with-torch \
#     DIR/gpu-check.sh run
set -uo pipefail

die() { echo "gpu-check: $*" >&2; exit 2; }

prepare() {
  local dir=$1
  local root
  root=$(cd "$(dirname "$0")/.." && pwd)
  mkdir -p "$dir" || die "cannot create $dir"
  dir=$(cd "$dir" && pwd)
  # The executables' paths come from cargo, wherever CARGO_TARGET_DIR puts them.
  local exes
  exes=$(cd "$root" && cargo build --release --bin cwp --message-format=json-render-diagnostics &&
    cargo test --release --no-run --test gpu_cuda --message-format=json-render-diagnostics) || die "cargo build failed"
  local cwp test_exe
  cwp=$(exe_of cwp <<<"$exes")
  test_exe=$(exe_of gpu_cuda <<<"$exes")
  [ -x "$cwp" ] || die "could not build cwp"
  [ -x "$test_exe" ] || die "could not build the gpu_cuda test executable"
  rm -f "$dir/cwp" "$dir/cwp.gz"
  cp "$cwp" "$dir/cwp"
  cp "$test_exe" "$dir/gpu_cuda"
  command -v strip >/dev/null && strip "$dir/cwp" "$dir/gpu_cuda" 2>/dev/null
  # The CUBINs for the H200 (sm_90), made here through the product's own
  # compile path, so the GPU machine needs no NVRTC at all.
  (cd "$root" && . scripts/setup.sh && ensure_nvrtc &&
    "$dir/cwp" precompile --arch sm_90 --out "$dir/kernel-cache") || die "precompiling the kernels failed"
  cp "$root/scripts/gpu-check.sh" "$dir/gpu-check.sh"
  cp "$root/scripts/gpu_check_report.py" "$dir/gpu_check_report.py"
  cp "$root/benches/gpu_peers.py" "$dir/gpu_peers.py"
  local zoo="$root/tests/fixtures/zoo_torch.py"
  [ -f "$zoo" ] || die "zoo_torch.py not found at $zoo"
  cp "$zoo" "$dir/zoo_torch.py"
  # Neural Cleanse and the whole searches need the shipped models and clean
  # images: models/ and Fashion-MNIST's test split (the GPU machine has no
  # network). Inside the checkout (which travels to the GPU machine anyway)
  # models/ is a relative link, so that the models do not travel twice.
  rm -rf "$dir/models" "$dir/badnets.safetensors"
  case "$dir/" in
    "$root/"*) ln -s "$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' \
      "$root/models" "$dir")" "$dir/models" ;;
    *) cp -r "$root/models" "$dir/models" ;;
  esac
  mkdir -p "$dir/fashion-mnist"
  (cd "$root" && . scripts/setup.sh && ensure_apt dataset-fashion-mnist) || die "no Fashion-MNIST"
  cp /usr/share/datasets/fashion-mnist/t10k-*-ubyte.gz "$dir/fashion-mnist/" || die "Fashion-MNIST's test split not found"
  chmod +x "$dir/gpu-check.sh" "$dir/cwp" "$dir/gpu_cuda"
  # A device call carries at most 64 MiB with the checkout: cwp travels
  # compressed and `run` unpacks it.
  gzip -9 "$dir/cwp" || die "cannot compress cwp"
  du -shL "$dir"
  echo "gpu-check: ready; on the GPU machine run: $dir/gpu-check.sh run"
}

# The executable of cargo target $1, from cargo's JSON messages on stdin.
exe_of() {
  python3 -c 'import json,sys
for l in sys.stdin:
    try:
        m = json.loads(l)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -n 1
}

# Finds libcuda where the ld.so cache does not list it. NVRTC is not looked
# for here: cwp finds it itself (toolkit folders, Python wheels) when a
# kernel is missing from the precompiled cache, and step 5 checks that it
# does; a CWP_NVRTC_LIB set by the caller is kept.
find_libs() {
  # Read whole first, for the same pipefail reason as the --precision probe.
  local cache
  cache=$(ldconfig -p 2>/dev/null)
  if ! grep -q 'libcuda\.so\.1 ' <<<"$cache" && [ -z "${CWP_CUDA_LIB:-}" ]; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
      [ -e "$d/libcuda.so.1" ] && export CWP_CUDA_LIB="$d/libcuda.so.1" && break
    done
  fi
  echo "CWP_NVRTC_LIB: ${CWP_NVRTC_LIB:-unset}; libcuda: ${CWP_CUDA_LIB:-from the ld.so cache}"
}

run() {
  local dir out work
  dir=$(cd "$(dirname "$0")" && pwd)
  out=${1:-${OUT:-$dir/out}}
  work="$dir/work"
  rm -rf "$work"
  mkdir -p "$out" "$work" || die "cannot create $out or $work"
  out=$(cd "$out" && pwd)
  cd "$dir" || die "cannot enter $dir"
  if [ ! -x cwp ] && [ -f cwp.gz ]; then
    gunzip -kf cwp.gz && chmod +x cwp || die "cannot unpack cwp.gz"
  fi
  local py=${CWP_CHECK_PYTHON:-python3}
  # Not in a pipeline: its exports must reach the steps.
  find_libs >"$work/env.txt"
  cat "$work/env.txt"
  nvidia-smi -L >>"$work/env.txt" 2>&1
  ls "$dir/kernel-cache" >>"$work/env.txt" 2>&1
  export CWP_CACHE_DIR="$dir/kernel-cache"
  local dev=${CWP_CHECK_DEVICE:-cuda}
  local budget=${CWP_CHECK_BUDGET:-480} t0=$SECONDS
  local seconds=${CWP_CHECK_SECONDS:-0.15}
  local models=${CWP_CHECK_MODELS-smallcnn:256;resnet18:256;resnet50:256}
  local search=${CWP_CHECK_SEARCH-smallcnn:1,10,40,160;resnet18:1,10,40,160;resnet50:1,10,40,160;resnet50_imagenet:1,4,16}
  local convs=${CWP_CHECK_CONVS-resnet50:256}

  # The steps' own output goes to files; their headers to the terminal (fd 3).
  exec 3>&1
  # step NAME CAP CMD...: runs CMD under a timeout of CAP seconds, less when
  # the budget has less left (then the step is skipped below 5 s), records
  # its exit code and time in steps.txt, and rewrites the report.
  step() {
    local name=$1 cap=$2 s=$SECONDS rc
    shift 2
    local left=$((budget - (SECONDS - t0)))
    [ "$cap" -gt "$left" ] && cap=$left
    if [ "$cap" -lt 5 ]; then
      echo "$name 124 0 skipped: budget spent" >>"$work/steps.txt"
      echo "== $name: skipped (budget spent)" >&3
      return 124
    fi
    echo "== $name (at most ${cap} s)" >&3
    timeout -k 5 "$cap" "$@"
    rc=$?
    echo "$name $rc $((SECONDS - s))" >>"$work/steps.txt"
    "$py" gpu_check_report.py "$work" "$out" >/dev/null 2>>"$work/report.err" ||
      python3 gpu_check_report.py "$work" "$out" >/dev/null 2>>"$work/report.err"
    return $rc
  }

  if [ "$dev" = cuda ]; then
    CWP_NVRTC_LIB=/nonexistent/libnvrtc.so.13 step bare_start 45 ./cwp selftest --device cuda --quick \
      >"$work/bare-start.txt" 2>&1
    tail -n 3 "$work/bare-start.txt"
  fi

  # shellcheck disable=SC2086
  step selftest 100 ./cwp selftest --device "$dev" ${CWP_CHECK_SELFTEST_ARGS:-} --json "$work/selftest.json" \
    >"$work/selftest.txt" 2>"$work/selftest.err"
  local rc_self=$?
  tail -n 3 "$work/selftest.txt"; tail -n 2 "$work/selftest.err"

  # The tensor-core modes against their own derived bounds (selftest.json
  # above is fp32's), if this cwp has them.
  local self_help
  self_help=$(./cwp selftest --help 2>/dev/null)
  if grep -q -- '--precision' <<<"$self_help"; then
    local sm
    for sm in ${CWP_CHECK_SELFTEST_MODES-tf32x3 tf32 bf16}; do
      # shellcheck disable=SC2086
      step "selftest_$sm" 60 ./cwp selftest --device "$dev" --precision "$sm" ${CWP_CHECK_SELFTEST_ARGS:-} \
        --json "$work/selftest-$sm.json" >"$work/selftest-$sm.txt" 2>"$work/selftest-$sm.err"
      tail -n 1 "$work/selftest-$sm.txt"
    done
  fi

  # The tests are #[ignore]d so that a machine without a GPU counts them as
  # ignored; here they are what we came for.
  local rc_tests=0
  if [ "$dev" = cuda ]; then
    step cuda_tests 60 ./gpu_cuda --ignored --test-threads=1 --nocapture cuda_ops cuda_out_of_memory cuda_corrupted \
      cuda_search_window \
      >"$work/cuda-tests.txt" 2>&1
    rc_tests=$?
    grep -E '^test |test result|no CUDA device' "$work/cuda-tests.txt" | sort -u
  fi

  # Precision modes, if this cwp has them: the tensor-core modes first (the
  # issue's targets), fp32 (today's path) and tf32x3 after.
  local modes=default
  # The help is read whole first: `grep -q` in a pipe would close it early,
  # and under pipefail cwp's SIGPIPE would read as "no such flag".
  local bench_help
  bench_help=$(./cwp bench --help 2>/dev/null)
  if grep -q -- '--precision' <<<"$bench_help"; then
    modes=${CWP_CHECK_MODES:-tf32 bf16 fp32 tf32x3}
  fi
  bench_mode() {
    local mode=$1 flag=()
    [ "$mode" = default ] || flag=(--precision "$mode")
    step "bench_${mode}_models" 40 ./cwp bench --device "$dev" "${flag[@]}" --models "$models" --search '' \
      --train '' --convs none --seconds "$seconds" --json "$work/bench-$mode-models.json" >"$work/bench-$mode.txt" 2>&1
    step "bench_${mode}_search" 60 ./cwp bench --device "$dev" "${flag[@]}" --models '' --search "$search" \
      --train '' --convs none --seconds "$seconds" --json "$work/bench-$mode-search.json" >>"$work/bench-$mode.txt" 2>&1
    [ -n "$convs" ] && step "bench_${mode}_convs" 40 ./cwp bench --device "$dev" "${flag[@]}" --models '' \
      --search '' --train '' --convs "$convs" --seconds "$seconds" --json "$work/bench-$mode-convs.json" \
      >>"$work/bench-$mode.txt" 2>&1
    grep -v '^bench:' "$work/bench-$mode.txt"
  }
  local first rest
  first=${modes%% *}
  rest=${modes#"$first"}
  bench_mode "$first"

  # PyTorch gets up to 150 s and at least 90 (without it there are no
  # ratios); the other modes about 60 s each where the budget allows.
  local torch_cap=150 left=$((budget - (SECONDS - t0)))
  local others=$(( $(wc -w <<<"$rest") * 60 ))
  [ $((left - others)) -lt "$torch_cap" ] && torch_cap=$((left - others))
  [ "$torch_cap" -lt 90 ] && torch_cap=90
  [ "$torch_cap" -gt "$left" ] && torch_cap=$left
  local torch_budget=$((torch_cap - 15))
  [ "$torch_budget" -lt 5 ] && torch_budget=5
  # shellcheck disable=SC2086
  step torch "$torch_cap" "$py" gpu_peers.py "$work/torch.json" --zoo "$dir" --budget "$torch_budget" \
    ${CWP_CHECK_TORCH_ARGS:-} >"$work/torch.txt" 2>&1
  tail -n 1 "$work/torch.txt"

  # Neural Cleanse batched over the classes against one class at a time.
  if [ -f models/smallcnn_fmnist_badnets.safetensors ]; then
    local nc_mode
    for nc_mode in batched sequential; do
      local nc_flag=()
      [ "$nc_mode" = sequential ] && nc_flag=(--sequential)
      step "nc_$nc_mode" 45 ./cwp cleanse --device "$dev" --weights models/smallcnn_fmnist_badnets.safetensors \
        --data "fashion-mnist:$dir/fashion-mnist" --steps "${CWP_CHECK_NC_STEPS:-20}" --quiet \
        "${nc_flag[@]}" --out "$work/nc-$nc_mode" >"$work/nc-$nc_mode.txt" 2>&1
    done
  fi

  # Issue 9's accuracy gate: a whole search (full defaults) on each shipped
  # model in each mode, and fp32 again with --seed 1 for the search's own
  # spread; gpu_check_report.py compares each with fp32's.
  if [ "$modes" != default ]; then
    local model gm
    # shellcheck disable=SC2086
    for model in ${CWP_CHECK_GATE_MODELS-models/*.safetensors}; do
      [ -f "$model" ] || continue
      local mname
      mname=$(basename "$model" .safetensors)
      for gm in fp32 ${CWP_CHECK_GATE_MODES-tf32x3 tf32 bf16} fp32-seed1; do
        local gflag=(--precision "${gm%-seed1}")
        [ "$gm" = fp32-seed1 ] && gflag+=(--seed 1)
        # shellcheck disable=SC2086
        step "gate_${mname}_$gm" 40 ./cwp search --device "$dev" "${gflag[@]}" --weights "$model" \
          --data "fashion-mnist:$dir/fashion-mnist" ${CWP_CHECK_GATE_ARGS:-} --quiet \
          --out "$work/gate/$mname/$gm" >"$work/gate-$mname-$gm.txt" 2>&1
      done
    done
  fi

  local m
  for m in $rest; do bench_mode "$m"; done

  if [ "$dev" = cuda ]; then
    (unset CWP_NVRTC_LIB; export LD_LIBRARY_PATH=; step nvrtc_probe 40 ./cwp precompile --arch sm_90 \
      --out "$work/probe-cache" >"$work/nvrtc-probe.txt" 2>&1)
    tail -n 2 "$work/nvrtc-probe.txt"
  fi

  "$py" gpu_check_report.py "$work" "$out" 2>>"$work/report.err" || python3 gpu_check_report.py "$work" "$out"
  echo "gpu-check: done in $((SECONDS - t0)) s; results in $out"
  [ "$rc_self" = 0 ] && [ "$rc_tests" = 0 ]
}

case "${1:-}" in
  prepare) [ $# -ge 2 ] || die "usage: $0 prepare DIR"; prepare "$2" ;;
  run) shift; run "$@" ;;
  *) die "usage: $0 prepare DIR | $0 run [OUT]" ;;
esac
