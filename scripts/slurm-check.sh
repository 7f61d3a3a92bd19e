#!/usr/bin/env bash
# The sharded search on a real one-node Slurm cluster, from a fresh Debian
# machine: installs slurm-wlm and munge when missing, starts a private
# cluster, runs a small `cwp search` once plainly and once as a 4-task job
# array (one task cancelled midway with scancel, then resubmitted), merges
# the shards and checks that the merged report is the single run's.
#
#   scripts/slurm-check.sh [CWP_BINARY]      (default: target/release/cwp)
#
# Needs root: it installs packages, and slurmd starts jobs as their user.
# The cluster is its own: munge key and socket, ports, configuration, state,
# spool and logs all live in one temporary folder (SLURM_CONF points there),
# so nothing in /etc is touched and a cluster or munged already on the
# machine is neither used nor disturbed. It stops exactly the daemons it
# started and removes its folder (set SLURM_CHECK_KEEP=1 to keep it).
# The last line is `slurm-check: passed`, or it exits non-zero saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

say() { echo "slurm-check: $*" >&2; }
die() {
  echo "slurm-check: FAILED: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs slurm-wlm and munge and runs slurmd); \
run it as root, or set CWP_SKIP_SLURM=1 to skip the test that runs it"
CWP=${1:-target/release/cwp}
[ -x "$CWP" ] || die "$CWP: no such executable (build it: cargo build --release, or name it as the first argument)"
CWP=$(realpath "$CWP")
MODEL=$PWD/models/smallcnn_fmnist_badnets.safetensors
[ -f "$MODEL" ] || die "$MODEL: the shipped model is missing"

ensure_apt slurm-wlm munge python3 dataset-fashion-mnist
for tool in munged slurmctld slurmd sbatch squeue scontrol scancel; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found after installing slurm-wlm and munge"
done

START=$SECONDS
WORK=$(mktemp -d /tmp/slurm-check.XXXXXX)
mkdir -p "$WORK"/{munge,etc,state,spool,log,jobs}
# munged wants its socket's folders searchable by everyone (not listable).
chmod 711 "$WORK" "$WORK/munge"
export SLURM_CONF=$WORK/etc/slurm.conf
unset SLURM_JOB_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID
STARTED=() # "name pid" of each daemon this script started, in start order
JOBS=()    # job ids submitted here

# Jobs first (a stopped slurmd leaves running steps behind), then the
# daemons in reverse order, each by its pid; the folder last.
cleanup() {
  local rc=$? i name pid
  set +e
  if [ ${#JOBS[@]} -gt 0 ]; then
    scancel "${JOBS[@]}" 2>/dev/null
    for _ in $(seq 60); do
      [ -z "$(squeue -h -o %i -j "$(IFS=,; echo "${JOBS[*]}")" 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    read -r name pid <<<"${STARTED[$i]}"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) ignored SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
  done
  # Job processes that outlived their slurmd: only ours name our folder.
  for pid in $(pgrep -f -- "$WORK/" 2>/dev/null); do
    kill -KILL "$pid" 2>/dev/null
  done
  if [ "$rc" != 0 ]; then
    for f in "$WORK"/log/*.log "$WORK"/jobs/*.out; do
      [ -f "$f" ] || continue
      echo "---- last lines of $f" >&2
      tail -n 15 "$f" >&2
    done
  fi
  if [ "${SLURM_CHECK_KEEP:-0}" = 1 ]; then
    say "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds; a
# daemon of ours that exits meanwhile ends the wait at once.
wait_for() {
  local limit=$1 what=$2 t0=$SECONDS d name pid
  shift 2
  until "$@"; do
    for d in "${STARTED[@]}"; do
      read -r name pid <<<"$d"
      kill -0 "$pid" 2>/dev/null || die "$name exited while waiting for $what (see $WORK/log/$name.log)"
    done
    [ $((SECONDS - t0)) -lt "$limit" ] || die "timed out after ${limit}s waiting for $what"
    sleep 0.5
  done
}

# Two free TCP ports for slurmctld and slurmd.
read -r CTLD_PORT SLURMD_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])
')
HOST=$(hostname -s)
NCPU=$(nproc)

# munged: a private key and socket.
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
MUNGE_SOCKET=$WORK/munge/munge.socket
munged --foreground --socket="$MUNGE_SOCKET" --key-file="$WORK/munge/munge.key" \
  --pid-file="$WORK/munge/munged.pid" --seed-file="$WORK/munge/munged.seed" \
  --log-file="$WORK/log/munged.log" >>"$WORK/log/munged.log" 2>&1 &
STARTED+=("munged $!")
wait_for 20 "munged's socket $MUNGE_SOCKET (see $WORK/log/munged.log)" test -S "$MUNGE_SOCKET"
munge --socket="$MUNGE_SOCKET" -n </dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
  || die "munged does not answer on $MUNGE_SOCKET"

cat >"$SLURM_CONF" <<EOF
ClusterName=cwpcheck
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -D -f "$SLURM_CONF" >>"$WORK/log/slurmctld.out" 2>&1 &
STARTED+=("slurmctld $!")
ctld_up() { scontrol ping >/dev/null 2>&1; }
wait_for 30 "slurmctld to answer (see $WORK/log/slurmctld.log)" ctld_up
slurmd -D -f "$SLURM_CONF" >>"$WORK/log/slurmd.out" 2>&1 &
STARTED+=("slurmd $!")
node_idle() { [ "$(sinfo -h -n "$HOST" -o %t 2>/dev/null)" = idle ]; }
wait_for 60 "node $HOST to be idle (sinfo: $(sinfo -h -o '%t %E' 2>&1); see $WORK/log/slurmd.log)" node_idle
say "one-node cluster up in $((SECONDS - START))s (node $HOST, $NCPU CPUs, ports $CTLD_PORT/$SLURMD_PORT)"

# A small run: four classes, two canvases each, so eight searches.
SEARCH=(search --weights "$MODEL" --data fashion-mnist --classes 0,1,2,3 --canvas auto:1+solid:1
  --epochs 1 --search-frac 0.05 --sweep-per-class 20 --eval-per-class 50 --device cpu)

t0=$SECONDS
"$CWP" "${SEARCH[@]}" --quiet --out "$WORK/single" >"$WORK/log/single.out" 2>&1 \
  || { cat "$WORK/log/single.out" >&2; die "the single run failed"; }
say "single run: $((SECONDS - t0))s"

SHARED=$WORK/sharded
JOB_SCRIPT=$WORK/shard.sh
{
  echo '#!/bin/bash'
  echo 'echo "task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID running"'
  printf 'exec'
  printf ' %q' "$CWP" "${SEARCH[@]}" --out "$SHARED"
  echo ' --shard "$SLURM_ARRAY_TASK_ID/4"'
} >"$JOB_SCRIPT"

submit() { # ARRAY: prints the job id
  sbatch --parsable --array="$1" --job-name=cwp-shard --chdir="$WORK" \
    --output="$WORK/jobs/%A_%a.out" "$JOB_SCRIPT" | cut -d';' -f1
}
state() { # JOB TASK: the task's JobState
  scontrol -o show job "$1_$2" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1
}
is_state() { [ "$(state "$1" "$2")" = "$3" ]; }
finished() { # JOB TASK: true once the task has ended, in any state
  case "$(state "$1" "$2")" in PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | "") return 1 ;; esac
}
must_complete() { # JOB TASK
  wait_for 600 "task $2 of job $1 to finish" finished "$1" "$2"
  local s
  s=$(state "$1" "$2")
  [ "$s" = COMPLETED ] || {
    cat "$WORK/jobs/$1_$2.out" >&2 2>/dev/null
    die "task $2 of job $1 ended $s, not COMPLETED"
  }
}

t0=$SECONDS
JOB=$(submit 0-3)
[[ "$JOB" =~ ^[0-9]+$ ]] || die "sbatch gave no job id: $JOB"
JOBS+=("$JOB")
say "submitted job array $JOB (tasks 0-3)"

# Task 2 is cancelled as soon as its search reports progress (its first
# line comes at about 10%): the output file is polled often and cheaply so
# that the cancel lands well before the search ends, even on a fast machine.
OUT2=$WORK/jobs/${JOB}_2.out
polls=0
until grep -q '^search: ' "$OUT2" 2>/dev/null; do
  polls=$((polls + 1))
  if [ $((polls % 20)) = 0 ]; then
    finished "$JOB" 2 && die "task 2 of job $JOB ended ($(state "$JOB" 2)) before its search reported progress"
    [ $((SECONDS - t0)) -lt 600 ] || die "timed out after 600s waiting for task 2 of job $JOB to search ($(state "$JOB" 2))"
  fi
  sleep 0.1
done
scancel "${JOB}_2" || die "scancel ${JOB}_2 failed"
wait_for 60 "task 2 of job $JOB to end after scancel" finished "$JOB" 2
[ "$(state "$JOB" 2)" = CANCELLED ] || die "task 2 of job $JOB ended $(state "$JOB" 2), not CANCELLED: \
its search finished before scancel took effect (too quick on this machine to cancel midway)"
say "cancelled task 2 midway: $(grep '^search: ' "$WORK/jobs/${JOB}_2.out" | tail -n 1)"
for task in 0 1 3; do must_complete "$JOB" "$task"; done
[ ! -e "$SHARED/shards/2-of-4.json" ] || die "the cancelled task 2 left its manifest: it was not cancelled midway"
if "$CWP" merge "$SHARED" --out "$WORK/early" >"$WORK/log/early-merge.out" 2>&1; then
  die "cwp merge succeeded with task 2 cancelled"
fi
grep -q 'shard 2/4' "$WORK/log/early-merge.out" \
  || die "cwp merge without task 2 does not name shard 2/4: $(cat "$WORK/log/early-merge.out")"

RESUB=$(submit 2)
[[ "$RESUB" =~ ^[0-9]+$ ]] || die "sbatch gave no job id: $RESUB"
JOBS+=("$RESUB")
say "resubmitted task 2 as job $RESUB"
must_complete "$RESUB" 2
say "job array with the resubmission: $((SECONDS - t0))s"

"$CWP" merge "$SHARED" --out "$WORK/merged" >"$WORK/log/merge.out" 2>&1 \
  || { cat "$WORK/log/merge.out" >&2; die "cwp merge failed after every task ran"; }

python3 - "$WORK/single/report.json" "$WORK/merged/report.json" <<'EOF' || die "the merged report differs from the single run's"
import json, sys

# What legitimately differs between a single run and a merged one.
RUN_ONLY = {"command", "device", "reused", "search_seconds", "steps_per_second",
            "images_per_second", "total_seconds"}
SEARCH_ONLY = {"eval_seconds"}

def load(path):
    with open(path) as f:
        r = json.load(f)
    out = {k: v for k, v in r.items() if k not in RUN_ONLY}
    out["searches"] = [{k: v for k, v in s.items() if k not in SEARCH_ONLY} for s in r["searches"]]
    return r, out

def first_difference(a, b, path="report"):
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: present in only one report"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
    elif isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
    elif a != b:
        return f"{path}: {a!r} (single) vs {b!r} (merged)"
    return None

(single_raw, single), (merged_raw, merged) = load(sys.argv[1]), load(sys.argv[2])
for key in ("searches", "classes", "verdict_mask", "verdict_min_k", "flagged", "clean_accuracy"):
    if key not in single:
        sys.exit(f"slurm-check: the single run's report has no `{key}`")
if len(single["searches"]) != 8:
    sys.exit(f"slurm-check: expected 8 searches (4 classes x 2 canvases), got {len(single['searches'])}")
for s in single["searches"]:
    for key in ("mask", "positions", "power", "min_k", "sweep"):
        if key not in s:
            sys.exit(f"slurm-check: a search in the single run's report has no `{key}`")
if "merged from 4 manifest(s)" not in merged_raw["command"]:
    sys.exit(f"slurm-check: the merged report's command does not say it merged 4 shards: {merged_raw['command']!r}")
d = first_difference(single, merged)
if d:
    sys.exit(f"slurm-check: first difference: {d}")
print(f"slurm-check: merged report equals the single run's: {len(merged['searches'])} searches, "
      f"{len(merged['classes'])} classes, flagged {merged['flagged']}", file=sys.stderr)
EOF

say "took $((SECONDS - START))s in all (after installing)"
echo "slurm-check: passed"
