#!/usr/bin/env bash
# GPU checks for a session lent a device machine (one H200): numerics of the CUDA kernels and
# the model against the CPU float64 reference, then bf16 step and attention timings.
# Uses the machine's own python3/torch (plus wheels under .whl if carried); writes to $OUT.
#   device run:  bash benchmarks/gpu/run.sh          (timeout_s ~ 420; it takes ~3-5 minutes)
# Numbers go into benchmarks/RESULTS.md by hand, with the date and the hardware line it prints.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/megasink-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, yaml; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 400 python3 benchmarks/gpu/check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
