#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): SD1.5 shapes with random weights, stage 1 → stage 2 → export →
# translate → sampling and memory benchmarks, one JSON summary. Made for a GPU machine that has PyTorch,
# transformers and accelerate but no internet and not diffusers: the missing pure-Python wheels travel
# in .whl/ at the repository root (ignored by git), fetched once where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 lpips==0.1.4 importlib_metadata==8.7.0
# (importlib_metadata 9+ needs lazy-importer, which the device image lacks; its other needs are there)
# Usage (from the repository root):  bash benchmarks/gpu_check.sh [--smoke] [--only STEP ...]
# Results: $OUT/gpu_check.json (OUT defaults to ./gpu-check-out) and each step's log beside it.
# All steps take ~10 min on an H200 (2026-12-04: ~460 s without distill and profile), more than one 600-s device
# command: choose with --only. The device run prepared on 2026-12-06 (not run: no machine was lent), one call:
#   OUT=/tmp/gc bash benchmarks/gpu_check.sh --only weights data stage1 profile stage2 distill export translate \
#     --deadline 445 --budget 550; then tar /tmp/gc into the device's $OUT (it holds more logs than come back)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import diffusers, lpips" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: diffusers/lpips are not installed and .whl/ holds no wheels; fetch them as this script's header says" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ffasynth-site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/ffasynth-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/nvidia-smi.txt"
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
