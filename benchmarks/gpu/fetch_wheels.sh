#!/usr/bin/env bash
# Wheels the GPU check carries to a device machine whose image lacks them (Python 3.12, x86_64,
# CUDA torch already installed): DeepSpeed (pure Python) and what it imports that such images
# often miss. Written to .whl/ (git-ignored); run.sh unpacks them into /tmp/megasink-site.
#   bash benchmarks/gpu/fetch_wheels.sh && du -sh .whl     (must stay under the 64 MiB carry limit)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip wheel --quiet --no-deps -w .whl deepspeed==0.19.8
$PY -m pip download --quiet --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp --abi cp312 \
  hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection 'typing-extensions>=4.16' \
  msgpack psutil py-cpuinfo einops nvidia-ml-py
ls -la .whl
