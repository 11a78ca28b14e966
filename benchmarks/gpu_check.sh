#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py --help): on a lent GPU machine, from any directory,
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check"
# It installs what that machine lacks (carried wheels in .whl/, else pip with a time box), runs every check within
# its time budget and prints one summary. PYTHON overrides the interpreter (default: python3, the image's torch).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
