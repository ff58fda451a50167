#!/usr/bin/env bash
# Quality benchmark of SmolLM2-135M on the lent GPU (device tool), seqlen 2048.
# The GGUF travels in two parts (transfer limit): call 1 stages part 0 in /tmp/stage, the next
# calls (machine still warm) run this script, which is resumable: results accumulate in /tmp and
# are copied to $OUT at the end of every call.
#   call 1: mkdir -p /tmp/stage && cp .gpuq/p1/* /tmp/stage/            (carry .gpuq/p1)
#   call 2+: bash benchmarks/gpu_quality.sh NSAMPLES_LIST [extra]      (carry .gpuq/p2)
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NS=${1:-128,2}
if [ ! -d /tmp/smol-hf ]; then
  mkdir -p /tmp/smol
  cat /tmp/stage/smolpart0 .gpuq/p2/smolpart1 > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/smol/*.gguf
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .gpuq/p2/gguf-*.whl .
  export PYTHONPATH=/tmp/site
  mkdir -p /tmp/dashq-home && cp -r .gpuq/p2/home/data /tmp/dashq-home/
fi
# Run from outside the checkout: its dashq_vllm/ folder would shadow the installed package.
cd /tmp
if [ ! -d /tmp/smol-hf ]; then
  export PYTHONPATH=/tmp/site
  python3 -c "from pathlib import Path; from dashq_vllm.quantize.assets import convert_gguf; print(convert_gguf(Path('/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/smol-hf'), 'smollm2-135m'))"
fi
export PYTHONPATH=/tmp/site DASHQ_HOME=/tmp/dashq-home
# Resume from the results of an earlier call when they travel with this one.
[ -f /tmp/quality-smollm2-135m-h100.json ] || cp "$OLDPWD"/.gpuq/p2/quality-smollm2-135m-h100.json /tmp/ 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${QUALITY_TIMEOUT:-480} python3 -m dashq_vllm.benchmarks.quality --model /tmp/smol-hf \
  --settings "${SETTINGS:-2:32,2:64,3:64,3:128,4:128}" --methods rtn,gptq,dashq --nsamples "$NS" --seqlen 2048 \
  --eval-windows 40 --device cuda --workdir /tmp/qwork --out /tmp/quality-smollm2-135m-h100.json || echo "quality: stopped (resumable)"
cp /tmp/quality-smollm2-135m-h100.json "$OUT/" || true
if [ "${2:-}" = "speed" ]; then
  python3 -m dashq_vllm.benchmarks.solver_speed --bits 2 --group-size 64 --out "$OUT/solver-speed-llama3-8b-h100.json" | tail -8
fi
