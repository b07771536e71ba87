#!/usr/bin/env bash
# The one-call GPU check for a session lent a device machine (one H200): ~300 s in one `run`.
# Stages in priority order, each under its own timeout, each writing $OUT/<stage>.json when it
# finishes, so a timeout still returns what ran (benchmarks/gpu/check.py says what each does):
#   kernels (45 s)  model (45 s)  cli (60 s)  cli --compile (90 s)  hf (50 s)
# Before the call, here: bash benchmarks/gpu/fetch_wheels.sh   (DeepSpeed & co. into .whl/)
#   device run: command "bash benchmarks/gpu/run.sh", carry [".whl"], timeout_s 420
#   CPU dry run of the same logic (tests do this): bash benchmarks/gpu/run.sh --dry-run
# Numbers go into benchmarks/RESULTS.md by hand, with the date and the hardware line of gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
OUT=${OUT:-/tmp/megasink-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "$DRY" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/megasink-site .whl/*.whl \
    && export PYTHONPATH=/tmp/megasink-site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
status=0
stage() {  # stage SECONDS ARGS...: one check.py stage; its exit status is recorded, the rest go on
  local limit=$1; shift
  [ -n "$DRY" ] && limit=$((limit * 8))  # two shared CPU cores are slower than an H200
  timeout "$limit" "$PY" benchmarks/gpu/check.py "$@" $DRY --out "$OUT" >>"$OUT/check.log" 2>&1
  local rc=$?
  echo "stage $* rc=$rc" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}
stage 45 kernels
stage 45 model
stage 60 cli
stage 90 cli --compile
stage 50 hf
tail -n 20 "$OUT/check.log"
exit $status
