#!/usr/bin/env bash
# CPU throughput of cwp against PyTorch, measured in one go on this machine,
# printed as a table of ratios (cwp / PyTorch): the workloads of issue 10 and
# the source of the README's CPU performance table.
#
#   scripts/bench-cpu.sh [OUT_DIR]
#
# Environment:
#   CWP           the cwp binary (default: target/release/cwp, built if missing)
#   TORCH_VENV    a virtual environment holding PyTorch (default: .venv-torch
#                 in the repository; created, and CPU PyTorch installed into
#                 it, when it has no torch)
#   THREADS       threads for both engines (default: all cores)
#   SECONDS_EACH  seconds of timed repetitions per figure (default: 2)
#   MODELS        fwd+bwd-to-input plan, `ARCH[:CxHxW]:N;..` (default below)
#   SEARCH        batched search plan, `ARCH[:CxHxW]:S,S..;..` (default below)
#   TRAIN         training plan, `ARCH[:CxHxW]:N;..` (default below)
#
# Absolute speeds move with the host's load; the ratios, measured in the same
# run, are the figures to quote.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/target/bench-cpu}"
mkdir -p "$out"

cwp="${CWP:-$root/target/release/cwp}"
if [ ! -x "$cwp" ]; then
    echo "building cwp (release)..." >&2
    (cd "$root" && cargo build --release --bin cwp)
    cwp="$root/target/release/cwp"
fi

venv="${TORCH_VENV:-$root/.venv-torch}"
if ! "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    echo "installing CPU PyTorch into $venv..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # The CPU wheels are smaller; where their index is out of reach, PyPI's
    # (CUDA-enabled) wheels run on the CPU just the same.
    "$venv/bin/pip" install --quiet --retries 1 --timeout 15 torch torchvision numpy \
        --index-url https://download.pytorch.org/whl/cpu \
        || "$venv/bin/pip" install --quiet torch torchvision numpy
fi
py="$venv/bin/python"

threads="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
secs="${SECONDS_EACH:-2}"
models="${MODELS:-smallcnn:128;resnet18:32;resnet50:16;preact_resnet18:32;vgg16:32;wrn28_10:8}"
search="${SEARCH:-smallcnn:1,10,20;resnet18:1,10;resnet50:1,8;resnet50_imagenet:3x224x224:1,4}"
train="${TRAIN:-smallcnn:128;resnet18:32}"

echo "cwp bench on $threads threads..." >&2
"$cwp" bench --device cpu --models "$models" --search "$search" --train "$train" --convs none \
    --seconds "$secs" --json "$out/cwp.json" >"$out/cwp.txt"
echo "PyTorch baseline on $threads threads..." >&2
"$py" "$root/benches/pytorch_baseline.py" "$out/cwp.json" "$out/torch.json" \
    --device cpu --seconds "$secs" --zoo "$root/tests/fixtures" >"$out/torch.txt"

"$py" - "$out/cwp.json" "$out/torch.json" <<'EOF'
import json, sys

cwp = json.load(open(sys.argv[1]))
torch = json.load(open(sys.argv[2]))
print(f"cwp vs PyTorch {torch.get('torch', '?')} on the CPU (ratios > 1: cwp is faster)")
print()
print("| workload | cwp | PyTorch | cwp / PyTorch |")
print("|---|---|---|---|")
def per_image(kind, label):
    """Rows of an images/s section: cwp against PyTorch on the same model and batch."""
    tm = {(m["arch"], tuple(m["input"]), m["batch"]): m for m in torch.get(kind, [])}
    for m in cwp.get(kind, []):
        t = tm.get((m["arch"], tuple(m["input"]), m["batch"]))
        name = f"{label}, {m['arch']} {'x'.join(map(str, m['input']))} b{m['batch']}"
        if not t or "images_per_s" not in t:
            print(f"| {name} | {m['images_per_s']:.1f} img/s | (failed) | - |")
            continue
        r = m["images_per_s"] / t["images_per_s"]
        print(f"| {name} | {m['images_per_s']:.1f} img/s | {t['images_per_s']:.1f} img/s | {r:.2f}x |")


per_image("models", "fwd+bwd-to-input")
ts = {(s["arch"], tuple(s["input"]), s["searches"]): s for s in torch["search"]}
for s in cwp["search"]:
    key = (s["arch"], tuple(s["input"]))
    authors = ts.get(key + (1,))
    same = ts.get(key + (s["searches"],))
    name = f"search, {s['arch']} {'x'.join(map(str, s['input']))} S={s['searches']}"
    per = s["search_steps_per_s"]
    vs_authors = f"{per / authors['search_steps_per_s']:.2f}x" if authors else "-"
    vs_same = f"{per / same['search_steps_per_s']:.2f}x" if same else "-"
    print(f"| {name} (per search; vs PyTorch batched alike) | {per:.1f} steps/s | "
          f"{authors['search_steps_per_s'] if authors else float('nan'):.1f} steps/s (authors' loop) | "
          f"{vs_authors} ({vs_same}) |")
per_image("train", "training")
EOF
echo "(raw reports: $out/cwp.json, $out/torch.json)" >&2
