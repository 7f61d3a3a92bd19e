#!/usr/bin/env bash
# The one prepared check for a GPU machine (an H200 here): correctness of the
# CUDA backend against the CPU reference, its throughput, and PyTorch's on the
# same machine, as one JSON of ratios.
#
# The GPU machine has no Rust toolchain and no network, so the work is split:
#
#   scripts/gpu-check.sh prepare DIR
#       Here, with Rust: builds `cwp` and the `gpu_cuda` test executable in
#       release mode and copies them, this script, benches/pytorch_baseline.py
#       and tests/fixtures/zoo_torch.py into DIR (a few tens of MiB).
#
#   DIR/gpu-check.sh run [OUT]
#       On the GPU machine, from DIR: finds libcuda and NVRTC (the
#       nvidia-cuda-nvrtc wheel that PyTorch installs), then runs, each under
#       its own timeout:
#         1. cwp selftest --device cuda        (equivalence suite, table of errors)
#         2. gpu_cuda tests                    (ops, out of memory, damaged kernel cache)
#         3. cwp bench --device cuda           (images/s, search steps/s, conv TFLOP/s)
#         4. pytorch_baseline.py               (the same workloads in PyTorch)
#       and writes five files to OUT (defaults to $OUT, else DIR/out; the
#       device tool returns at most 8): gpu-check.json (the ratios and
#       verdicts), selftest.json, bench.json, torch.json and log.txt (every
#       step's output). Worst case about 8 minutes, typically 4.
#       Exit status: 0 when the selftest and the tests passed.
#
#   Dry run without a GPU (checks the script and its JSON, not the GPU):
#     CWP_CHECK_DEVICE=emu CWP_CHECK_SELFTEST_ARGS=--quick CWP_CHECK_TORCH_DEVICE=cpu \
#     CWP_CHECK_BENCH_ARGS='--models smallcnn:2 --search smallcnn:1,2 --convs smallcnn:2 --seconds 0.05' \
#     DIR/gpu-check.sh run
set -uo pipefail

die() { echo "gpu-check: $*" >&2; exit 2; }

prepare() {
  local dir=$1
  local root
  root=$(cd "$(dirname "$0")/.." && pwd)
  mkdir -p "$dir" || die "cannot create $dir"
  (cd "$root" && cargo build --release --bin cwp) || die "cargo build failed"
  local test_exe
  test_exe=$(cd "$root" && cargo test --release --no-run --test gpu_cuda --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_cuda":
        print(m["executable"])')
  [ -x "$test_exe" ] || die "could not build the gpu_cuda test executable"
  cp "$root/target/release/cwp" "$dir/cwp"
  cp "$test_exe" "$dir/gpu_cuda"
  command -v strip >/dev/null && strip "$dir/cwp" "$dir/gpu_cuda" 2>/dev/null
  cp "$root/scripts/gpu-check.sh" "$dir/gpu-check.sh"
  cp "$root/benches/pytorch_baseline.py" "$dir/pytorch_baseline.py"
  local zoo="$root/tests/fixtures/zoo_torch.py"
  [ -f "$zoo" ] || die "zoo_torch.py not found at $zoo"
  cp "$zoo" "$dir/zoo_torch.py"
  chmod +x "$dir/gpu-check.sh" "$dir/cwp" "$dir/gpu_cuda"
  du -sh "$dir"
  echo "gpu-check: ready; on the GPU machine run: $dir/gpu-check.sh run"
}

find_libs() {
  if [ -z "${CWP_NVRTC_LIB:-}" ]; then
    CWP_NVRTC_LIB=$(python3 - <<'PY' 2>/dev/null
import importlib.util as u, os
for m in ("nvidia.cu13", "nvidia.cuda_nvrtc", "nvidia"):
    try:
        s = u.find_spec(m)
    except Exception:
        s = None
    for d in (s.submodule_search_locations if s and s.submodule_search_locations else []):
        for sub in ("lib", "cu13/lib", "cuda_nvrtc/lib"):
            p = os.path.join(d, sub, "libnvrtc.so.13")
            if os.path.exists(p):
                print(p)
                raise SystemExit
PY
)
    [ -n "$CWP_NVRTC_LIB" ] || CWP_NVRTC_LIB=$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.13 /{print $NF; exit}')
    [ -n "$CWP_NVRTC_LIB" ] || CWP_NVRTC_LIB=$(find / -name 'libnvrtc.so.13' -not -path '/proc/*' 2>/dev/null | head -n 1)
  fi
  [ -n "$CWP_NVRTC_LIB" ] && export CWP_NVRTC_LIB && export LD_LIBRARY_PATH="$(dirname "$CWP_NVRTC_LIB")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 ' && [ -z "${CWP_CUDA_LIB:-}" ]; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
      [ -e "$d/libcuda.so.1" ] && export CWP_CUDA_LIB="$d/libcuda.so.1" && break
    done
  fi
  echo "NVRTC: ${CWP_NVRTC_LIB:-not found}; libcuda: ${CWP_CUDA_LIB:-from the ld.so cache}"
}

run() {
  local dir out work
  dir=$(cd "$(dirname "$0")" && pwd)
  out=${1:-${OUT:-$dir/out}}
  work="$dir/work"
  mkdir -p "$out" "$work" || die "cannot create $out or $work"
  cd "$dir" || die "cannot enter $dir"
  find_libs | tee "$work/env.txt"
  nvidia-smi -L >>"$work/env.txt" 2>&1
  export CWP_CACHE_DIR="$dir/kernel-cache"
  local t0=$SECONDS rc_self rc_tests rc_bench rc_torch
  local dev=${CWP_CHECK_DEVICE:-cuda} tdev=${CWP_CHECK_TORCH_DEVICE:-cuda}

  echo "== 1/4 cwp selftest --device $dev"
  # shellcheck disable=SC2086
  timeout 150 ./cwp selftest --device "$dev" ${CWP_CHECK_SELFTEST_ARGS:-} --json "$work/selftest.json" >"$work/selftest.txt" 2>"$work/selftest.err"
  rc_self=$?
  tail -n 3 "$work/selftest.txt"; tail -n 2 "$work/selftest.err"

  echo "== 2/4 gpu_cuda tests (ops, out of memory, damaged cache)"
  # The tests are #[ignore]d so that a machine without a GPU counts them as
  # ignored; here they are what we came for. A dry run (not cuda) has no
  # device for them, so it says so instead of running them.
  if [ "$dev" = cuda ]; then
    timeout 90 ./gpu_cuda --ignored --test-threads=1 --nocapture cuda_ops cuda_out_of_memory cuda_corrupted >"$work/cuda-tests.txt" 2>&1
    rc_tests=$?
  else
    echo "SKIPPED: gpu_cuda tests need --device cuda (this run: $dev)" >"$work/cuda-tests.txt"
    rc_tests=0
  fi
  grep -E '^test |test result|SKIPPED|no CUDA device' "$work/cuda-tests.txt" | sort -u

  echo "== 3/4 cwp bench --device $dev"
  # shellcheck disable=SC2086
  timeout 150 ./cwp bench --device "$dev" ${CWP_CHECK_BENCH_ARGS:---seconds 0.3} --json "$work/bench.json" >"$work/bench.txt" 2>"$work/bench.err"
  rc_bench=$?
  cat "$work/bench.txt"

  echo "== 4/4 PyTorch baseline"
  if { [ "$tdev" != cuda ] || python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; } &&
     python3 -c 'import torch' 2>/dev/null && [ -f "$work/bench.json" ]; then
    timeout 150 python3 pytorch_baseline.py "$work/bench.json" "$work/torch.json" --zoo "$dir" --seconds 0.3 --device "$tdev" >"$work/torch.txt" 2>&1
    rc_torch=$?
  else
    echo "PyTorch with CUDA is not available here (or the bench failed): baseline skipped" | tee "$work/torch.txt"
    rc_torch=99
  fi
  tail -n 2 "$work/torch.txt"

  python3 - "$work" "$rc_self" "$rc_tests" "$rc_bench" "$rc_torch" "$((SECONDS - t0))" <<'PY'
import json, os, sys
out, rc_self, rc_tests, rc_bench, rc_torch, secs = sys.argv[1:7]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None
self_, bench, torch = load("selftest.json"), load("bench.json"), load("torch.json")
doc = {"seconds": int(secs),
       "exit_codes": {"selftest": int(rc_self), "cuda_tests": int(rc_tests), "bench": int(rc_bench), "torch": int(rc_torch)}}
try:
    doc["cuda_tests_skipped"] = open(os.path.join(out, "cuda-tests.txt")).read().startswith("SKIPPED:")
except Exception:
    pass
if self_:
    checks = self_["checks"]
    doc["selftest"] = {"device": self_["device"], "checks": len(checks),
                       "failed": [c["group"] + ": " + c["name"] for c in checks if not c["pass"]],
                       "worst_ratio": max((c["ratio"] for c in checks), default=None)}
if bench:
    doc["device"] = bench["device"]
    peak = bench.get("fp32_peak_tflops")
    tm = {(m["arch"], m["batch"]): m for m in (torch or {}).get("models", [])}
    doc["models"] = [{"arch": m["arch"], "batch": m["batch"], "cwp_images_per_s": m["images_per_s"],
                      "torch_images_per_s": tm.get((m["arch"], m["batch"]), {}).get("images_per_s"),
                      "ratio": (m["images_per_s"] / tm[(m["arch"], m["batch"])]["images_per_s"])
                               if tm.get((m["arch"], m["batch"]), {}).get("images_per_s") else None}
                     for m in bench["models"]]
    ts = {(s["arch"], s["searches"]): s for s in (torch or {}).get("search", [])}
    rows = []
    for s in bench["search"]:
        t = ts.get((s["arch"], s["searches"]), {})
        eager = ts.get((s["arch"], 1), {})
        rows.append({"arch": s["arch"], "searches": s["searches"],
                     "cwp_search_steps_per_s": s["search_steps_per_s"],
                     "torch_search_steps_per_s": t.get("search_steps_per_s"),
                     "ratio_same_workload": s["search_steps_per_s"] / t["search_steps_per_s"] if t.get("search_steps_per_s") else None,
                     "ratio_vs_torch_eager_batch4": s["search_steps_per_s"] / eager["search_steps_per_s"] if eager.get("search_steps_per_s") else None})
    doc["search"] = rows
    w = bench.get("conv_tflops_weighted")
    conv = {"cwp_tflops_weighted": {"fwd": w[0], "dgrad": w[1], "wgrad": w[2], "all": w[3]} if w else None,
            "fp32_peak_tflops": peak,
            "cwp_share_of_peak": {"fwd": w[0] / peak, "dgrad": w[1] / peak, "wgrad": w[2] / peak, "all": w[3] / peak} if (w and peak) else None}
    if torch and torch.get("convs"):
        tot = sum(c["flops"] * c["count"] for c in torch["convs"])
        tt = [sum(c["flops"] * c["count"] / (c["tflops"][k] * 1e12) for c in torch["convs"]) for k in range(3)]
        conv["torch_tflops_weighted"] = {"fwd": tot / tt[0] / 1e12, "dgrad": tot / tt[1] / 1e12, "wgrad": tot / tt[2] / 1e12,
                                         "all": 3 * tot / sum(tt) / 1e12}
        if w:
            conv["ratio_vs_cudnn_fp32"] = w[3] / conv["torch_tflops_weighted"]["all"]
    doc["convs"] = conv
    doc["targets"] = {
        "conv_at_least_40pct_fp32_peak": (w[3] / peak >= 0.4) if (w and peak) else None,
        "batched_search_at_least_torch": all(r["ratio_same_workload"] >= 1 for r in rows if r["searches"] > 1 and r["ratio_same_workload"])
                                         if any(r["searches"] > 1 and r["ratio_same_workload"] for r in rows) else None,
    }
path = os.path.join(out, "gpu-check.json")
json.dump(doc, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
print(json.dumps(doc.get("targets", {})), "->", path)
PY
  for f in env.txt selftest.txt selftest.err cuda-tests.txt bench.txt bench.err torch.txt; do
    echo "===== $f"; cat "$work/$f" 2>/dev/null
  done >"$out/log.txt"
  for f in gpu-check.json selftest.json bench.json torch.json; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/$f"
  done
  echo "gpu-check: done in $((SECONDS - t0)) s; results in $out"
  [ "$rc_self" = 0 ] && [ "$rc_tests" = 0 ]
}

case "${1:-}" in
  prepare) [ $# -ge 2 ] || die "usage: $0 prepare DIR"; prepare "$2" ;;
  run) shift; run "$@" ;;
  *) die "usage: $0 prepare DIR | $0 run [OUT]" ;;
esac
