#!/usr/bin/env bash
# GPU check of the scale path: bf16 training (FlexAttention, grouped-GEMM MoE, eager and compiled),
# cached generation, and 2-GPU expert parallelism when there are 2 GPUs. Prints one table and writes
# gpu_check.json; under 8 minutes on one H100/H200-class GPU. See scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [--budget-s 420] [--out gpu_check.json]
#
# It needs torch (>= 2.11), timm and PyYAML, and neither DeepSpeed nor webdataset: the 2-GPU expert-
# parallel part needs both, and is skipped without them. On a machine without network, carry them as
# wheels built here: pip download deepspeed webdataset --only-binary=:all: --python-version 3.12 -d wheels/
# and install them there with: pip install --no-index --find-links wheels/ deepspeed webdataset
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
[[ " ${args[*]-} " == *" --out "* ]] || args+=(--out gpu_check.json)
exec "$PYTHON" scripts/gpu_check.py "${args[@]}"
