#!/usr/bin/env bash
# The detection benchmark: trains a population of smallcnn models on
# Fashion-MNIST (clean ones and backdoored ones with varied triggers, targets,
# poison rates and seeds), drops the backdoored models whose attack did not
# take (ASR below 90%), scans them all with the class-wise pattern search (the
# default canvases, and the paper's real-image canvas alone) and with Neural
# Cleanse, and prints one table: method, TPR, FPR, AUC, target accuracy,
# seconds per model. Each method is also judged against reference models
# (`+ref`): the population's clean models serve as the references, each
# clean model judged against the other clean ones (leave-one-out: a model is
# never its own reference), each backdoored one against all of them.
#
#   scripts/detect-bench.sh [DIR]      # default DIR: ./detect-bench
#
# Everything is resumable: a rerun skips trained models (a killed training
# continues from its checkpoint) and finished scans. Settings (environment):
#   CWP          the cwp binary (default: built here with cargo, release)
#   LIMIT        training images per model (default 15000)
#   EPOCHS       training epochs (default 4)
#   SCAN_EPOCHS  search epochs in the scan (default 2)
#   DEVICE       cpu, cuda, auto (default auto)
#   ONLY         a comma list of model names to train and scan (a quick look)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. scripts/setup.sh
DIR=${1:-detect-bench}
LIMIT=${LIMIT:-15000}
EPOCHS=${EPOCHS:-4}
SCAN_EPOCHS=${SCAN_EPOCHS:-2}
DEVICE=${DEVICE:-auto}
ensure_apt dataset-fashion-mnist python3
if [ -z "${CWP:-}" ]; then
    ensure_cxx
    ensure_rust
    cargo build --release --quiet
    CWP="$ROOT/${CARGO_TARGET_DIR:-target}/release/cwp"
    [ -x "$CWP" ] || CWP="${CARGO_TARGET_DIR:-$ROOT/target}/release/cwp"
fi
mkdir -p "$DIR/models" "$DIR/log"
# A folder holds one population: models trained with other settings are
# never mixed in.
settings="limit=$LIMIT epochs=$EPOCHS"
if [ -f "$DIR/settings" ] && [ "$(cat "$DIR/settings")" != "$settings" ]; then
    echo "detect-bench: $DIR holds models trained with $(cat "$DIR/settings"), not $settings; use another folder" >&2
    exit 1
fi
echo "$settings" > "$DIR/settings"

# name | seed | trigger | target | poison rate (empty trigger: a clean model).
# Patches of size 2-5 at corners, the centre and inner positions, with white,
# checker and random fills; noise blends at alpha 0.1-0.2; targets 0-9; rates
# 1-10%. Ten clean models; two more backdoors than the 20 asked for, in
# case an attack fails.
POPULATION="
clean-01|101|||
clean-02|102|||
clean-03|103|||
clean-04|104|||
bn-random-3-center|210|badnets:size=3,pos=center,fill=random:7|2|0.02
bn-white-3-br|201|badnets:size=3,pos=br,fill=white|0|0.05
clean-05|105|||
bn-white-2-tl|202|badnets:size=2,pos=tl,fill=white|1|0.1
bn-white-4-center|203|badnets:size=4,pos=center,fill=white|2|0.03
clean-06|106|||
bn-white-5-tr|204|badnets:size=5,pos=tr,fill=white|3|0.02
bn-white-3-bl|205|badnets:size=3,pos=bl,fill=white|4|0.01
clean-07|107|||
bn-checker-3-br|206|badnets:size=3,pos=br,fill=checker|5|0.05
bn-checker-4-tl|207|badnets:size=4,pos=tl,fill=checker|6|0.1
clean-08|108|||
bn-checker-5-center|208|badnets:size=5,pos=center,fill=checker|7|0.03
bn-checker-2-at|209|badnets:size=2,pos=6:18,fill=checker|8|0.05
clean-09|109|||
bn-random-3-br|211|badnets:size=3,pos=br,fill=random:11|9|0.05
bn-random-4-tl|212|badnets:size=4,pos=tl,fill=random:12|0|0.1
clean-10|110|||
bn-random-5-at|213|badnets:size=5,pos=16:4,fill=random:13|1|0.03
bn-random-2-center|214|badnets:size=2,pos=center,fill=random:14|3|0.05
bn-random-4-bl|215|badnets:size=4,pos=bl,fill=random:15|4|0.02
bn-white-2-at|216|badnets:size=2,pos=20:10,fill=white|5|0.08
blend-10-a|217|blend:alpha=0.1,pattern=noise:21|6|0.1
blend-15-b|218|blend:alpha=0.15,pattern=noise:22|7|0.05
blend-20-c|219|blend:alpha=0.2,pattern=noise:23|8|0.03
blend-20-d|220|blend:alpha=0.2,pattern=noise:24|9|0.1
blend-15-e|221|blend:alpha=0.15,pattern=noise:25|2|0.08
bn-checker-3-center|222|badnets:size=3,pos=center,fill=checker|3|0.01
"

meta() { # FILE KEY: a metadata string of a safetensors file
    python3 - "$1" "$2" <<'EOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    print(json.loads(f.read(n)).get("__metadata__", {}).get(sys.argv[2], ""))
EOF
}

echo "model,backdoored,target" > "$DIR/labels.csv.tmp"
: > "$DIR/population.tsv.tmp"
kept=0
while IFS='|' read -r name seed trigger target rate; do
    [ -n "$name" ] || continue
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
    out="$DIR/models/$name.safetensors"
    # A model dropped by an earlier run keeps its verdict: it is not
    # trained again.
    [ -f "$DIR/dropped/$name.safetensors" ] && out="$DIR/dropped/$name.safetensors"
    if [ ! -f "$out" ]; then
        echo "training $name" >&2
        args=(train --arch smallcnn --data fashion-mnist --out "$out" --epochs "$EPOCHS"
              --limit "$LIMIT" --seed "$seed" --device "$DEVICE" --quiet --resume)
        [ -n "$trigger" ] && args+=(--poison "$trigger" --target "$target" --poison-rate "$rate")
        "$CWP" "${args[@]}" > "$DIR/log/$name.train.log" 2>&1 \
            || { echo "training $name failed; see $DIR/log/$name.train.log" >&2; exit 1; }
    fi
    acc=$(meta "$out" clean_accuracy)
    asr=$(meta "$out" attack_success_rate)
    if [ -n "$trigger" ]; then
        if python3 -c "import sys; sys.exit(0 if float('$asr') >= 0.9 else 1)"; then
            echo "$out,1,$target" >> "$DIR/labels.csv.tmp"; kept=$((kept + 1))
            printf '%s\tbackdoor\t%s\t%s\t%s\t%s\t%s\n' "$name" "$trigger" "$target" "$rate" "$acc" "$asr" >> "$DIR/population.tsv.tmp"
        else
            echo "dropping $name: attack success rate $asr < 0.9" >&2
            printf '%s\tdropped\t%s\t%s\t%s\t%s\t%s\n' "$name" "$trigger" "$target" "$rate" "$acc" "$asr" >> "$DIR/population.tsv.tmp"
            if [ "$out" = "$DIR/models/$name.safetensors" ]; then
                mkdir -p "$DIR/dropped"; mv "$out" "$DIR/dropped/"
            fi
        fi
    else
        echo "$out,0," >> "$DIR/labels.csv.tmp"
        printf '%s\tclean\t-\t-\t-\t%s\t-\n' "$name" "$acc" >> "$DIR/population.tsv.tmp"
    fi
done <<< "$POPULATION"
mv "$DIR/labels.csv.tmp" "$DIR/labels.csv"
mv "$DIR/population.tsv.tmp" "$DIR/population.tsv"
echo "population: $(grep -c ',0,$' "$DIR/labels.csv") clean, $kept backdoored (see $DIR/population.tsv)" >&2

# 200 report images per class measure a pattern's power well enough to
# confirm a flag, so the scan costs a fraction of a full search. The
# canvases and the k-sweep are the scan's defaults, spelled out: the
# search's canvases plus a learned one (the extension for triggers of
# colours no canvas holds), so that one scan measures both, and no sweep.
scan_args=(--labels "$DIR/labels.csv" --device "$DEVICE" --quiet --epochs "$SCAN_EPOCHS"
           --k-sweep none --eval-per-class 200 --canvas "auto:1+solid:1+learn:0.5")
models=$(cut -d, -f1 "$DIR/labels.csv" | tail -n +2)
refs=()
for m in $(grep ',0,$' "$DIR/labels.csv" | cut -d, -f1); do refs+=(--reference "$m"); done
# One scan gives every figure: the search's verdict (on the learned canvas),
# each canvas kind's verdict (natural alone is the paper's method), and
# Neural Cleanse.
# shellcheck disable=SC2086
"$CWP" scan $models --out "$DIR/scan" --method both "${scan_args[@]}" "${refs[@]}" | tee "$DIR/scan.txt"

python3 - "$DIR" <<'EOF'
import json, sys
d = sys.argv[1]
names = {
    "cwp": "cwp (its verdict: learned canvas)",
    "cwp/learned": "cwp, learned canvas",
    "cwp/solid": "cwp, white canvas",
    "cwp/natural": "cwp, natural canvas (the paper's method alone)",
    "nc": "Neural Cleanse",
}
for k, v in list(names.items()):
    names[k + "+ref"] = v + ", against the clean references"

f = lambda v, pct=True: "-" if v is None else (f"{100*v:.1f}%" if pct else f"{v:.3f}")
lines = ["| method | backdoored | clean | TPR | FPR | AUC | target accuracy | s / model |",
         "|---|---|---|---|---|---|---|---|"]
for m in json.load(open(f"{d}/scan/detection.json")):
    spm = m["seconds_per_model"]
    lines.append(f"| {names.get(m['method'], m['method'])} | {m['backdoored']} | {m['clean']} | "
                 f"{f(m['tpr'])} | {f(m['fpr'])} | {f(m['auc'], False)} | {f(m['target_accuracy'])} | "
                 f"{'-' if spm is None else f'{spm:.1f}'} |")
table = "\n".join(lines)
open(f"{d}/table.md", "w").write(table + "\n")
print(table)
EOF
