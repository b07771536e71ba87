#!/usr/bin/env bash
# The one-call GPU check for a session lent a device machine (one H200): ~4-5 min in one `run`.
# Stages in priority order, each under its own time limit (upper bounds: cold CUDA start-up and
# Triton/inductor compiles), each writing $OUT/<stage>.json as it goes, so a timeout still
# returns what ran (benchmarks/gpu/check.py says what each does). $OUT gets those seven JSON files
# and one log, check.log (the GPU line, each stage's output and status): the device tool returns
# only a few files, so training run directories live under /tmp.
#   kernels (70 s)  model (60 s)  cli (70 s)  hf (60 s)  cli --compile (120 s)  cli --no-aux (70 s)
#   profile (60 s)
# (measured on an H200, 2026-12-04: 24, 23, 34, 31, 32 s; the compiled run failed then)
# Before the call, here: bash benchmarks/gpu/fetch_wheels.sh   (DeepSpeed & co. into .whl/)
#   device run: command "bash benchmarks/gpu/run.sh", carry [".whl"], timeout_s 420
#   CPU dry run of the same logic (tests do this): bash benchmarks/gpu/run.sh --dry-run
# Numbers go into benchmarks/RESULTS.md by hand, with the date and the hardware line of check.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
OUT=${OUT:-/tmp/megasink-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "$DRY" ] && ls .whl/*.whl >/dev/null 2>&1; then
  # wheels are zip files: unpacked beside the image's packages, no pip or index needed
  for w in .whl/*.whl; do $PY -m zipfile -e "$w" /tmp/megasink-site || echo "could not unpack $w"; done
  export PYTHONPATH=/tmp/megasink-site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
LOG="$OUT/check.log"
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG"
RUNS=$(mktemp -d /tmp/megasink-gpu-runs.XXXXXX)  # the CLI stages' run directories, not returned
status=0
stage() {  # stage SECONDS ARGS...: one check.py stage; its exit status is recorded, the rest go on
  local limit=$1; shift
  [ -n "$DRY" ] && limit=$((limit * 8))  # two shared CPU cores are slower than an H200
  # -k: a stage that ignores SIGTERM (the trainer turns it into a checkpoint request) is killed
  # 10 s later, so nothing of it runs on into the next stage's GPU
  timeout -k 10 "$limit" "$PY" benchmarks/gpu/check.py "$@" $DRY --out "$OUT" --runs "$RUNS" >>"$LOG" 2>&1
  local rc=$?
  echo "stage $* rc=$rc" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
}
stage 70 kernels
stage 60 model
stage 70 cli
stage 60 hf
stage 120 cli --compile
stage 70 cli --no-aux
stage 60 profile
grep "^stage " "$LOG"
rm -rf "$RUNS"
exit $status
