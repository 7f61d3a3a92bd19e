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
#   CONVS         models whose distinct convolutions are timed one by one
#                 (forward, backward-data, backward-filter), `ARCH[:CxHxW]:N;..`
#                 (default below; `none` leaves them out)
#   ROUNDS        rounds of (cwp, PyTorch), alternating (default: 1)
#   CPU_FORWARD   cwp's --cpu-forward: direct (default, as cwp) or winograd
#
# Absolute speeds move with the host's load; the ratios, measured in the same
# run, are the figures to quote. On a shared host whose speed drifts over
# minutes, take several rounds: each ratio is then the median of the rounds'
# ratios (each round's cwp figure over the same round's PyTorch figure), with
# their range, and the speeds shown are the rounds' medians.
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
convs="${CONVS:-smallcnn:128}"

rounds="${ROUNDS:-1}"
pairs=()
for r in $(seq "$rounds"); do
    echo "round $r of $rounds: cwp bench on $threads threads..." >&2
    "$cwp" bench --device cpu --cpu-forward "${CPU_FORWARD:-direct}" \
        --models "$models" --search "$search" --train "$train" --convs "$convs" \
        --seconds "$secs" --json "$out/cwp-$r.json" >"$out/cwp-$r.txt"
    echo "round $r of $rounds: PyTorch baseline on $threads threads..." >&2
    "$py" "$root/benches/pytorch_baseline.py" "$out/cwp-$r.json" "$out/torch-$r.json" \
        --device cpu --seconds "$secs" --zoo "$root/tests/fixtures" >"$out/torch-$r.txt"
    pairs+=("$out/cwp-$r.json" "$out/torch-$r.json")
done

"$py" - "${pairs[@]}" <<'EOF'
import json, statistics, sys

rounds = [(json.load(open(c)), json.load(open(t))) for c, t in zip(sys.argv[1::2], sys.argv[2::2])]
print(f"cwp vs PyTorch {rounds[0][1].get('torch', '?')} on the CPU (ratios > 1: cwp is faster"
      + (f"; medians of {len(rounds)} alternating rounds, range in brackets)" if len(rounds) > 1 else ")"))
print()
print("| workload | cwp | PyTorch | cwp / PyTorch |")
print("|---|---|---|---|")


def ratio(rs):
    """The median ratio, with the rounds' range when there are several."""
    if not rs:
        return "-"
    med = f"{statistics.median(rs):.2f}x"
    return med if len(rs) == 1 else f"{med} [{min(rs):.2f}-{max(rs):.2f}]"


def per_image(kind, label):
    """Rows of an images/s section: cwp against PyTorch on the same model and batch."""
    for i, m in enumerate(rounds[0][0].get(kind, [])):
        key = (m["arch"], tuple(m["input"]), m["batch"])
        name = f"{label}, {m['arch']} {'x'.join(map(str, m['input']))} b{m['batch']}"
        ours, theirs, rs = [], [], []
        for cwp, torch in rounds:
            c = cwp[kind][i]["images_per_s"]
            t = {(x["arch"], tuple(x["input"]), x["batch"]): x for x in torch.get(kind, [])}.get(key)
            ours.append(c)
            if t and "images_per_s" in t:
                theirs.append(t["images_per_s"])
                rs.append(c / t["images_per_s"])
        if not theirs:
            print(f"| {name} | {statistics.median(ours):.1f} img/s | (failed) | - |")
            continue
        print(f"| {name} | {statistics.median(ours):.1f} img/s | "
              f"{statistics.median(theirs):.1f} img/s | {ratio(rs)} |")


per_image("models", "fwd+bwd-to-input")
for i, s in enumerate(rounds[0][0]["search"]):
    key = (s["arch"], tuple(s["input"]))
    name = f"search, {s['arch']} {'x'.join(map(str, s['input']))} S={s['searches']}"
    ours, authors_rate, vs_authors, vs_same = [], [], [], []
    for cwp, torch in rounds:
        ts = {(x["arch"], tuple(x["input"]), x["searches"]): x for x in torch["search"]}
        per = cwp["search"][i]["search_steps_per_s"]
        ours.append(per)
        authors, same = ts.get(key + (1,)), ts.get(key + (s["searches"],))
        if authors:
            authors_rate.append(authors["search_steps_per_s"])
            vs_authors.append(per / authors["search_steps_per_s"])
        if same:
            vs_same.append(per / same["search_steps_per_s"])
    theirs = f"{statistics.median(authors_rate):.1f}" if authors_rate else "nan"
    print(f"| {name} (per search; vs PyTorch batched alike) | {statistics.median(ours):.1f} steps/s | "
          f"{theirs} steps/s (authors' loop) | {ratio(vs_authors)} ({ratio(vs_same)}) |")
per_image("train", "training")

convs = rounds[0][0].get("convs", [])
if convs:
    print()
    print("| convolution (count in the model) | forward | backward-data | backward-filter |")
    print("|---|---|---|---|")
    conv_key = lambda c: (tuple(c["x"]), tuple(c["w"]), c["stride"], c["pad"])
    theirs = [{conv_key(x): x for x in torch.get("convs", [])} for _, torch in rounds]
    for i, c in enumerate(convs):
        cells = []
        for k in range(3):
            rs = []
            for (cwp, _), by_key in zip(rounds, theirs):
                t = by_key.get(conv_key(c))
                if t:
                    rs.append(cwp["convs"][i]["tflops"][k] / t["tflops"][k])
            gf = statistics.median(cwp["convs"][i]["tflops"][k] for cwp, _ in rounds) * 1e3
            cells.append(f"{gf:.0f} GFLOP/s, {ratio(rs)}")
        name = f"{c['arch']} {c['w']} on {c['x']} s{c['stride']} p{c['pad']} (x{c['count']})"
        print(f"| {name} | " + " | ".join(cells) + " |")
EOF
echo "(raw reports: $out/cwp-*.json, $out/torch-*.json)" >&2
