#!/usr/bin/env bash
# Quality benchmark (benchmarks/quality.py) on the lent GPU (device tool), no vLLM needed.
# Stage each model first, back to back (the machine goes back after 30 s idle; /tmp survives while
# it is warm): `python -m dashq_vllm.benchmarks.gpu_stage --model MODEL` here, then one call per
# folder:  mkdir -p /tmp/stage && cp -r .gpuq/MODEL/NN/. /tmp/stage/     (carry .gpuq/MODEL/NN)
# Then, as often as needed (resumable: finished configurations are kept in /tmp/results and
# copied to $OUT, with a tarball of everything, at the end of every call):
#   bash benchmarks/gpu_quality.sh MODEL [MODEL ...]
# one quality.py per model side by side, each running QUALITY_JOBS (default 3) configurations at
# once; QUALITY_TIMEOUT (default 480 s) bounds the call (configurations still running then are
# dropped and redone by the next call). Every configuration: 128 and 2 calibration samples x 2048
# tokens of news (SETTINGS, default 2:32,2:64,3:64,3:128,4:128), perplexity on 40 x 2048 wiki
# tokens, zero-shot tasks (QUALITY_TASKS, default all; empty for none; limit QUALITY_LIMIT, default
# 200) for the source and the 128-sample runs. Measured on an H200 (2026-12-02), 4 jobs at once:
# Qwen2.5-1.5B DASH-Q runs took ~180-200 s, GPTQ ~300-420 s (perplexity only); with the tasks on,
# a whole ~7-min call finished only Qwen's source and RTN 2-bit g32 (CPU threads were oversubscribed
# then; quality.py now gives each job its share). SOLVER_SPEED=1 first times the
# solvers alone on the GPU (solver_speed.py, SOLVER_MODELS default qwen2.5-1.5b, 2-bit g64 and 4-bit
# g128, nothing beside it).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  DASHQ_HOME=/tmp/dashq-home
REPO=$(pwd)
. "$REPO"/benchmarks/gpu_common.sh
mkdir -p /tmp/results
dashq_env "$REPO" || exit 1
deadline=$(( $(date +%s) + ${QUALITY_TIMEOUT:-480} ))
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
finish() { (cd /tmp/results && tar czf "$OUT"/quality-results.tgz .) ; cp /tmp/results/*.json "$OUT"/ 2>/dev/null; true; }
if [ -n "${SOLVER_SPEED:-}" ]; then
  for m in ${SOLVER_MODELS:-qwen2.5-1.5b}; do
    for bg in 2:64 4:128; do
      f=/tmp/results/solver-speed-$m-w${bg/:/g}-$GPU_TAG.json
      [ -f "$f" ] || python3 -m dashq_vllm.benchmarks.solver_speed --model $m --bits ${bg%:*} --group-size ${bg#*:} \
        --out "$f" | tail -n 3
    done
  done
fi
for model in "$@"; do  # one after the other: they share /tmp/site and $DASHQ_HOME
  stage_model "$model" /tmp/models/"$model" >> /tmp/results/stage-"$model".log 2>&1 || { tail -n 5 /tmp/results/stage-"$model".log; finish; exit 1; }
done
pids=()
for model in "$@"; do
  (
    left=$(( deadline - $(date +%s) ))
    [ $left -gt 30 ] || exit 0
    timeout -s INT -k 60 $left python3 -m dashq_vllm.benchmarks.quality --model /tmp/models/"$model" \
      --settings "${SETTINGS:-2:32,2:64,3:64,3:128,4:128}" --methods rtn,gptq,dashq --nsamples 128,2 \
      --seqlen 2048 --eval-windows 40 --tasks "${QUALITY_TASKS-all}" --limit "${QUALITY_LIMIT:-200}" --task-nsamples 128 \
      --jobs "${QUALITY_JOBS:-3}" --device cuda --workdir /tmp/qwork-"$model" \
      --out /tmp/results/quality-"$model"-$GPU_TAG.json >> /tmp/results/quality-"$model".log 2>&1
    rc=$?
    echo "$model: quality.py exit $rc"; tail -n 12 /tmp/results/quality-"$model".log
    case $rc in 0|124|130) exit 0 ;; *) exit 1 ;; esac  # 124/130: stopped at the deadline, resumable
  ) &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
finish
exit $failed
