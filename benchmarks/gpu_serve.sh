#!/usr/bin/env bash
# The GPU calls behind issue 3's GPU acceptance and issue 4's benchmarks (device tool, H100/H200).
# vLLM 0.26.0 comes from ../shared/gpu/bundle-vllm.sh (.gpu/p1..pN + .gpu/deps). A call carries at most
# 64 MiB *with* the ~6 MiB checkout, so re-split its 60 MiB parts into 52 MiB ones (6 parts):
#   cat .gpu/p*/vllm.part* > /tmp/v.whl && rm -rf .gpu/p[0-9] && split -b 52M -d -a 1 /tmp/v.whl .gpu/vllm.part \
#     && i=1 && for f in .gpu/vllm.part*; do mkdir .gpu/p$i && mv $f .gpu/p$i/; i=$((i+1)); done
# The models come from `python -m dashq_vllm.benchmarks.gpu_stage --model MODEL` (.gpuq/MODEL/NN:
# SmolLM2 3 folders, Qwen 21; the last holds the gguf wheel, the sha256 and every data asset).
# Back-to-back calls, machine warm (/tmp survives while it is; the machine goes back after 30 s idle; a
# staging call takes ~4-5 s when issued back to back: on 2026-12-02 21 folders took 105 s):
#   stage:  mkdir -p /tmp/stage && cp -r .gpu/pN/. /tmp/stage/            (carry .gpu/pN, N=1..6)
#           mkdir -p /tmp/stage/deps && cp .gpu/deps/* /tmp/stage/deps/   (carry .gpu/deps)
#           mkdir -p /tmp/stage && cp -r .gpuq/MODEL/NN/. /tmp/stage/    (carry .gpuq/MODEL/NN)
#   run:    bash benchmarks/gpu_serve.sh STEP ...   (carry .gpuq/diag for kernels-ab)
#   install: only installs vLLM and this checkout; then steps can run side by side with
#           DASHQ_SKIP_INSTALL=1 (e.g. `KAB_PARTS=check ... kernels-ab &` next to `qwen-ckpts`).
#   qwen-ckpts / ppl / mtbench: Qwen's DASH-Q checkpoints (three side by side on one H200: ~190 s),
#           their perplexity, then MT-Bench-style answers graded by the bf16 parent (~240 s for three).
#   online: `online llama3-8b`: a call stops starting servers when its budget (ONLINE_TIMEOUT 490 s) is
#           nearly spent and the next call resumes at the first (config, concurrency) not measured. On an
#           H200 (2026-12-02) each config took ~95 s (start-up 50-63 s), so ONLINE_TIMEOUT=555
#           ONLINE_MIN_CONFIG_S=125 did all five in one call (492 s).
#   profile: `profile llama3-8b` (PROFILE_TIMEOUT 270 s): dashq4:128@64, fp16@64, dashq2:64@1, then
#           gptq4:128@64 if time is left (a second call adds it; PROFILE_RUNS="CFG@BATCH ..." to choose;
#           ~45-50 s a run on an H200, so PROFILE_TIMEOUT=420 does the four in one call).
#   throughput: `throughput llama3-8b` or `throughput llama3-70b-20l` (~55-60 s a config on an H200).
#   tune: sweep decode kernel configs on this GPU (8B, 70B and Qwen-1.5B layer shapes; 4b g128, 3b g128,
#           2b g64/g32) into /tmp/results/k/tuned.json, used by every later step of the lease (commit it as
#           kernels/tuned/<GPU name>.json; on an H200 (2026-12-02) the 8B/70B shapes took 34 s, all twelve 64 s).
#   kernels-ptx: the inline-PTX unpack (on by default since 2026-12-02) checked, then timed off/on.
#   decode check|ncu|sweep|bench: M = 1-16 (KERNELS.md v11); runs without the vLLM bundle too (no Machete column).
#   qwen-throughput: offline throughput of Qwen's real checkpoints (QWEN_SETTINGS, after qwen-ckpts)
#           against the bf16 source run at fp16.
# Every step is resumable: results accumulate under /tmp/results and are copied to $OUT each call.
# Keep every call's own timeouts well under the device's 600 s per call (what is not tarred to $OUT
# when the call is killed is lost).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site DASHQ_HOME=/tmp/dashq-home
REPO=$(pwd)
. "$REPO"/benchmarks/gpu_common.sh
mkdir -p /tmp/results
if [ ! -f /tmp/site/.installed ] && [ "${1:-}" = decode ] && ! ls /tmp/stage/vllm.part* >/dev/null 2>&1; then
  echo "vLLM not staged: the decode step runs without it (no Machete column)"
elif [ ! -f /tmp/site/.installed ]; then
  cat /tmp/stage/vllm.part* > /tmp/stage/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    /tmp/stage/vllm-0.26.0-*.whl /tmp/stage/deps/*.whl || exit 1
  touch /tmp/site/.installed
fi
dashq_env "$REPO" || exit 1
use_tuned_table() {  # the kernel table `tune` swept on this GPU earlier in the lease, if any
  [ -f /tmp/results/k/tuned.json ] && export DASHQ_KERNEL_CONFIGS=/tmp/results/k/tuned.json; true
}
qwen_hf() { stage_model qwen2.5-coder-1.5b /tmp/qwen-hf; }  # /tmp/qwen-hf from the staged GGUF
qwen_ckpt() {  # BITS GROUP -> prints the checkpoint dir, quantized on the GPU unless it exists
  local ck=/tmp/ckpt/qwen2.5-coder-1.5b-dashq-w$1g$2
  [ -d "$ck" ] || python3 -m dashq_vllm.cli quantize /tmp/qwen-hf --out "$ck" --bits $1 --group-size $2 \
    --nsamples 128 --seqlen 2048 --device cuda --quiet --json /tmp/results/quant-qwen-w$1g$2.json >&2 || return 1
  echo "$ck"
}
qwen_ppl() {  # MODEL_DIR TAG: wiki perplexity into /tmp/results/ppl-qwen-TAG.json unless it is there
              # (bounded by PPL_TIMEOUT seconds when set)
  [ -f /tmp/results/ppl-qwen-$2.json ] || timeout ${PPL_TIMEOUT:-0} python3 -m dashq_vllm.cli eval "$1" \
    --seqlen 2048 --max-windows 40 --device cuda --json /tmp/results/ppl-qwen-$2.json --quiet
}
step=${1:-throughput}; shift || true
case "$step" in
  throughput)  # bash benchmarks/gpu_serve.sh throughput [SHAPE] [CONFIGS]
    shape=${1:-llama3-8b}
    use_tuned_table
    timeout ${TPUT_TIMEOUT:-560} python3 -m dashq_vllm.benchmarks.throughput --shape "$shape" \
      --configs "${2:-fp16,gptq4:128,dashq4:128,dashq3:128,dashq2:64}" --batches 1,16,64,256 \
      --out /tmp/results/throughput-$shape-$GPU_TAG${TPUT_TAG:-}.json --log-dir /tmp/results/logs --timeout 400 \
      || echo "throughput: stopped (resumable)" ;;
  qwen-throughput)  # real checkpoints, their own weights (throughput.py --models); run qwen-ckpts first
    qwen_hf || exit 1
    models="fp16=/tmp/qwen-hf"
    for bg in ${QWEN_SETTINGS:-4:128 3:128 2:32}; do
      ck=$(qwen_ckpt ${bg%:*} ${bg#*:}) || exit 1; models="$models,dashq${bg%:*}-g${bg#*:}=$ck"
    done
    use_tuned_table
    timeout ${TPUT_TIMEOUT:-560} python3 -m dashq_vllm.benchmarks.throughput --models "$models" \
      --label qwen2.5-coder-1.5b --batches 1,16,64,256 --out /tmp/results/throughput-qwen2.5-coder-1.5b-$GPU_TAG.json \
      --log-dir /tmp/results/logs --timeout 300 || echo "qwen-throughput: stopped (resumable)" ;;
  online)  # bash benchmarks/gpu_serve.sh online [SHAPE] [CONFIGS]: `vllm bench serve` against `vllm serve`
           # at max concurrency 1/16/64 (TTFT/TPOT/ITL, output tok/s); resumable per (config, concurrency)
    shape=${1:-llama3-8b}; budget=${ONLINE_TIMEOUT:-490}
    use_tuned_table
    timeout -s INT -k 20 $budget python3 -m dashq_vllm.benchmarks.serve_bench --shape "$shape" \
      --configs "${2:-fp16,gptq4:128,dashq4:128,dashq3:128,dashq2:64}" --concurrency ${ONLINE_CONCURRENCY:-1,16,64} \
      --input-len 128 --output-len 256 --out /tmp/results/online-$shape-$GPU_TAG${ONLINE_TAG:-}.json \
      --raw-dir /tmp/results/online-raw --log-dir /tmp/results/logs --ready-timeout 240 --bench-timeout 150 \
      --stop-timeout 20 --budget-s $(( budget - 30 )) --min-config-s ${ONLINE_MIN_CONFIG_S:-150} \
      || echo "online: stopped (resumable)" ;;
  profile)  # bash benchmarks/gpu_serve.sh profile [SHAPE]: vLLM's torch profiler over 8 decode steps per
            # CONFIG@BATCH; summaries (JSON + text, KB) in /tmp/results/profile, traces in /tmp/prof-traces
    shape=${1:-llama3-8b}; t_end=$(( $(date +%s) + ${PROFILE_TIMEOUT:-270} ))
    use_tuned_table
    for run in ${PROFILE_RUNS:-dashq4:128@64 fp16@64 dashq2:64@1 gptq4:128@64}; do
      left=$(( t_end - $(date +%s) ))
      [ $left -lt 100 ] && { echo "profile: ${left}s left, $run and later not run (resumable)"; break; }
      timeout -s INT -k 15 $left python3 -m dashq_vllm.benchmarks.vllm_profile --shape "$shape" --config ${run%@*} \
        --batch ${run#*@} --steps 8 --out-dir /tmp/results/profile --trace-dir /tmp/prof-traces \
        --log-dir /tmp/results/logs --timeout $(( left - 15 )) || echo "profile $run: failed or stopped"
    done ;;
  tune)  # decode configs (M = 1 and 2-16) swept on this GPU for Llama-3-8B's, the 70B stack's and Qwen-1.5B's layers ->
         # /tmp/results/k/tuned.json, which the throughput/online/profile steps then use (commit it as
         # kernels/tuned/<GPU name>.json); mid M keeps the heuristic
    mkdir -p /tmp/results/k
    timeout -s INT ${TUNE_TIMEOUT:-540} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
      --sections info,sweep --sweep-m ${TUNE_M:-1,16} --sweep-budget-s ${TUNE_BUDGET_S:-400} --tag _tune \
      --sweep-bits ${TUNE_BITS:-4:128,3:128,2:64,2:32} \
      --sweep-shapes ${TUNE_SHAPES:-qkv,o,gate_up,down,70b_qkv,70b_o,70b_gate_up,70b_down,q15_qkv,q15_o,q15_gate_up,q15_down} \
      || echo "tune: stopped"
    tail -n 5 /tmp/results/k/kernels_tune.log ;;
  midm)  # v9/v10 (KERNELS.md "Mid M"): `midm check` (every bits (MIDM_CHECK_BITS) x group x dtype x path,
         # swap included), then `midm sweep`: M = 16-1024 on the 8B shapes and the 70B shard, the swapped kind
         # against the others, merged (buckets 32-1024) into the committed table as /tmp/results/k/tuned.json
         # (later steps use it), then `midm bench`: that table against fp16 cuBLAS, CUDA graphs up to M = 256
    mkdir -p /tmp/results/k
    tag=${MIDM_TAG:-v10}
    case "${1:-check}" in
      check) timeout -s INT ${MIDM_TIMEOUT:-500} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
               --sections info,check --check-bits ${MIDM_CHECK_BITS:-2,3,4,8} --tag _${tag}_check \
               || echo "midm check: stopped" ;;
      sweep) timeout -s INT ${MIDM_TIMEOUT:-540} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
               --sections info,sweep --sweep-m ${MIDM_M:-16,32,64,128,256,512,1024} --sweep-bits 4:128,3:128,2:64 \
               --sweep-shapes ${MIDM_SHAPES:-qkv,o,gate_up,down,70b_gate_up_shard} \
               --sweep-keep-buckets ${MIDM_KEEP:-32,64,128,256,512,1024} \
               --sweep-budget-s ${MIDM_BUDGET_S:-420} --tag _${tag}_sweep || echo "midm sweep: stopped"
             cp /tmp/results/k/tuned.json /tmp/results/k/tuned_${tag}.json 2>/dev/null ;;
      bench) use_tuned_table
             timeout -s INT ${MIDM_TIMEOUT:-540} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
               --sections info,bench,graph --bench-m ${MIDM_BENCH_M:-1,16,32,64,128,256,512,1024} \
               --tag _${tag}_bench || echo "midm bench: stopped" ;;
    esac ;;
  decode)  # v11 (KERNELS.md): M = 1-16. `decode check`: the decode paths (DECODE_CHECK_PATHS) for 2/3/4 bits x
           # group x dtype; `decode ncu`: stall reasons of M = 1 gate_up launches (DECODE_NCU: "shape,bits,group,m|JSON
           # config or default" ...); `decode sweep`: M = 1 and 16 on the 8B and 70B layer shapes, merged (buckets
           # 1-16) into the committed table as /tmp/results/k/tuned.json; `decode bench`: that table, M = 1 and 16
    mkdir -p /tmp/results/k
    tag=${DECODE_TAG:-v11}
    case "${1:-check}" in
      check) timeout -s INT ${DECODE_TIMEOUT:-500} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
               --sections info,check --check-bits ${DECODE_CHECK_BITS:-2,3,4} \
               --check-paths ${DECODE_CHECK_PATHS:-default-m1,default-m16,decode-scaled,decode-dot-half,swap-dot-half-128} \
               --tag _${tag}_check || echo "decode check: stopped" ;;
      ncu) NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
           [ -n "$NCU" ] || { echo "decode ncu: no ncu on this machine"; exit 1; }
           half='{"block_m":16,"block_n":64,"split_k":4,"group_m":1,"kind":"dot","half_dq":true}'
           i=0
           for spec in ${DECODE_NCU:-"gate_up,4,128,1|" "gate_up,4,128,1|$half" "gate_up,2,64,1|" "gate_up,2,64,1|$half" "gate_up,3,128,1|"}; do
             i=$(( i + 1 )); single=${spec%%|*}; cfg=${spec#*|}
             timeout 120 "$NCU" --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
               --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
               --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active" \
               -k regex:dashq -c 1 python3 "$REPO"/benchmarks/bench_kernels.py --single "$single" \
               ${cfg:+--single-config "$cfg"} > /tmp/results/k/ncu_${tag}_$i.txt 2>&1
             echo "ncu $i: $spec"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Ipc|stalled_(long|barrier|wait|math|short|mio|lg|not_sel|dispatch|no_inst|tex|branch|sleep|drain|membar|selected)" /tmp/results/k/ncu_${tag}_$i.txt | head -30
           done ;;
      sweep) timeout -s INT ${DECODE_TIMEOUT:-540} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
               --sections info,sweep --sweep-bits ${DECODE_BITS:-4:128,3:128,2:64} \
               --sweep-shapes ${DECODE_SHAPES:-qkv,o,gate_up,down,70b_qkv,70b_o,70b_gate_up,70b_down} \
               --sweep-keep-buckets 1,2,4,8,16 --sweep-budget-s ${DECODE_BUDGET_S:-420} --tag _${tag}_sweep \
               --sweep-m ${DECODE_SWEEP_M:-1,16} ${DECODE_KINDS:+--sweep-kinds $DECODE_KINDS} \
               || echo "decode sweep: stopped"
             cp /tmp/results/k/tuned.json /tmp/results/k/tuned_${tag}.json 2>/dev/null ;;
      bench) use_tuned_table
             timeout -s INT ${DECODE_TIMEOUT:-540} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
               --sections info,bench,graph --bench-m ${DECODE_BENCH_M:-1,16} --tag _${tag}_bench || echo "decode bench: stopped" ;;
    esac ;;
  kernels)  # v5: sweep the "wide" GEMM against dequant + cuBLAS at mid/large M, check, bench
    mkdir -p /tmp/results/k
    timeout -s INT ${KERNELS_TIMEOUT:-560} python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/k \
      --sections info,check,sweep,bench --quick-check --wide --sweep-m 32,64,128,256,1024 \
      --sweep-shapes qkv,o,gate_up,down --sweep-keep-buckets 32,64,128,256,512,1024 --sweep-budget-s 240 \
      --bench-m 1,16,32,64,128,256,1024,4096 --tag _v5 || echo "kernels: stopped" ;;
  smollm2)  # quantize SmolLM2 on the GPU, serve 4-bit and 2-bit (dashq_config.json only) with CUDA graphs
    stage_model smollm2-135m /tmp/smol-hf || exit 1
    for bg in 4:128 2:32; do
      b=${bg%:*}; g=${bg#*:}; ck=/tmp/ckpt/smollm2-135m-dashq-w${b}g${g}
      [ -d "$ck" ] || python3 -m dashq_vllm.cli quantize /tmp/smol-hf --out "$ck" --bits $b --group-size $g \
        --nsamples 128 --seqlen 2048 --device cuda --quiet || exit 1
      [ "$b" = 2 ] && python3 -c "import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); c.pop('quantization_config',None); json.dump(c,open(p,'w'),indent=1)" "$ck"
      grep -q "\"${ck##*/}-fp16\"" /tmp/results/serve-smollm2-$GPU_TAG.json 2>/dev/null || \
        timeout 400 python3 -m dashq_vllm.serve.check "$ck" --launch --reference-device cuda --concurrent 32 \
          --label "${ck##*/}-fp16" --out /tmp/results/serve-smollm2-$GPU_TAG.json -- --dtype float16 --max-model-len 2048
    done ;;
  qwen)  # Qwen2.5-Coder-1.5B (staged from .gpuq/qwen2.5-coder-1.5b/NN): converted, quantized on the
         # GPU, perplexity, served with CUDA graphs
    qwen_hf || exit 1
    qwen_ppl /tmp/qwen-hf bf16
    for bg in ${QWEN_SETTINGS:-4:128 2:32 3:128}; do
      b=${bg%:*}; g=${bg#*:}; ck=$(qwen_ckpt $b $g) || exit 1
      qwen_ppl "$ck" w${b}g${g}
      # the float32 reference shares the GPU: the server gets half of it
      grep -q "\"${ck##*/}\"" /tmp/results/serve-qwen-$GPU_TAG.json 2>/dev/null || \
        timeout 400 python3 -m dashq_vllm.serve.check "$ck" --launch --reference-device cuda --concurrent 32 \
          --out /tmp/results/serve-qwen-$GPU_TAG.json -- --dtype float16 --max-model-len 4096 --gpu-memory-utilization 0.5
    done ;;
  qwen-ckpts)  # Qwen converted, DASH-Q checkpoints of QWEN_SETTINGS quantized side by side (one process
               # per setting, spread over the GPUs); their perplexity is the `ppl` step
    qwen_hf || exit 1
    ngpu=$(nvidia-smi -L | wc -l); i=0; pids=()
    for bg in ${QWEN_SETTINGS:-4:128 2:32 3:128}; do
      CUDA_VISIBLE_DEVICES=$(( i % ngpu )) qwen_ckpt ${bg%:*} ${bg#*:} > /tmp/results/quant-qwen-${bg/:/g}.log 2>&1 &
      pids+=($!); i=$((i + 1))
    done
    for p in "${pids[@]}"; do wait "$p" || echo "qwen-ckpts: a quantization failed (see quant-qwen-*.log)"; done
    tail -n 2 /tmp/results/quant-qwen-*.log ;;
  kernels-ptx)  # KERNELS.md v6: the inline-PTX unpack (DASHQ_PTX_UNPACK=1, the default) checked (every bits x group x dtype x
                # path against float64), then M = 1/16 timed with it off and on (CUDA graphs), in one call
    mkdir -p /tmp/results/kptx
    DASHQ_PTX_UNPACK=1 timeout -s INT ${KPTX_CHECK_TIMEOUT:-200} python3 "$REPO"/benchmarks/bench_kernels.py \
      --out /tmp/results/kptx --sections info,check --tag _check_ptx
    for v in 0 1; do
      DASHQ_PTX_UNPACK=$v timeout -s INT 150 python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/kptx \
        --sections info,bench,graph --quick --bench-m 1,16 --tag _ptx$v
    done
    grep -h "FAIL\|graph M=1" /tmp/results/kptx/*.log | tail -n 30; true ;;
  kernels-ab)  # the kernels at HEAD checked (every bits x group x dtype x path), then timed at M=1/16
               # against older kernels: AB_REV=<git revision> takes kernels/{layout,configs,triton_kernels}.py
               # from it (e.g. AB_REV=7bd99a2: v6, before rows16) when the machine's copy has the history;
               # else AB_OLD_DIR (default .gpuq/diag/kernels_old, carried) holds those three files, e.g.
               # `mkdir -p .gpuq/diag/kernels_old && for f in layout configs triton_kernels; do
               #  git show 7bd99a2:kernels/$f.py > .gpuq/diag/kernels_old/$f.py; done` here first
    mkdir -p /tmp/results/kab
    if [ ! -d /tmp/dashq-site-old ]; then  # built aside and moved in only when complete
      rm -rf /tmp/repo-old /tmp/dashq-site-old.tmp && mkdir /tmp/repo-old && (cd "$REPO" && tar cf - --exclude=./.gpu --exclude=./.gpuq --exclude=./.venv .) | tar xf - -C /tmp/repo-old
      old_dir=${AB_OLD_DIR:-$REPO/.gpuq/diag/kernels_old}
      for f in layout.py configs.py triton_kernels.py; do
        if [ -n "${AB_REV:-}" ] && git -C "$REPO" cat-file -e "$AB_REV:kernels/$f" 2>/dev/null; then
          git -C "$REPO" show "$AB_REV:kernels/$f" > /tmp/repo-old/kernels/$f
        elif [ -f "$old_dir/$f" ]; then
          cp "$old_dir/$f" /tmp/repo-old/kernels/$f
        else
          echo "kernels-ab: no old kernels/$f (AB_REV=${AB_REV:-unset} not in this copy's history, $old_dir/$f missing)"
          rm -rf /tmp/repo-old; exit 1
        fi
      done
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/dashq-site-old.tmp /tmp/repo-old >/dev/null || exit 1
      mv /tmp/dashq-site-old.tmp /tmp/dashq-site-old
    fi
    parts=${KAB_PARTS:-check bench}  # "check" alone can share the GPU with other work; "bench" cannot
    [[ $parts == *check* ]] && timeout -s INT ${KAB_CHECK_TIMEOUT:-200} python3 "$REPO"/benchmarks/bench_kernels.py \
      --out /tmp/results/kab --sections info,check --tag _check
    [[ $parts == *bench* ]] && for v in new old; do
      site=/tmp/dashq-site; [ $v = old ] && site=/tmp/dashq-site-old
      PYTHONPATH=$site:/tmp/site timeout -s INT 150 python3 "$REPO"/benchmarks/bench_kernels.py --out /tmp/results/kab \
        --sections info,bench,graph --quick --bench-m 1,16 --tag _$v
    done; true ;;
  install) ;;  # only the installs above (then steps side by side with DASHQ_SKIP_INSTALL=1)
  tp2)  # on nvidia-h200-x2 (Qwen staged as for `qwen`): greedy tokens at tensor parallel 2 against 1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    qwen_hf || exit 1
    for bg in ${TP_SETTINGS:-2:32 4:128}; do
      b=${bg%:*}; g=${bg#*:}; ck=$(qwen_ckpt $b $g) || exit 1; name=${ck##*/}
      for tp in 1 2; do
        match=(); [ $tp = 2 ] && match=(--match $name-tp1)
        grep -q "\"$name-tp$tp\"" /tmp/results/serve-qwen-tp.json 2>/dev/null || \
          timeout 400 python3 -m dashq_vllm.serve.check "$ck" --launch --reference-device cuda --concurrent 32 \
            --label $name-tp$tp "${match[@]}" --out /tmp/results/serve-qwen-tp.json -- \
            --dtype float16 --max-model-len 4096 --gpu-memory-utilization ${TP_GPU_UTIL:-0.5} --tensor-parallel-size $tp
      done
    done ;;
  mtbench)  # after `qwen-ckpts`: MT-Bench-style answers and log-probs of Qwen's DASH-Q checkpoints
            # (MTB_CKPTS, default w4g128 w3g128 w2g32), graded by the bf16 parent (the largest model served
            # here). One mtbench_local.sh per checkpoint, side by side on the GPU(s), each with its own
            # parent server as judge and its own directory holding a copy of the parent's answers, grades
            # and log-probs of an earlier run (in the repo), so that nothing of the parent is redone
    mkdir -p /tmp/results/mtbench; i=0; pids=()
    ngpu=$(nvidia-smi -L | wc -l)
    for name in ${MTB_CKPTS:-w4g128 w3g128 w2g32}; do
      # servers start one after another: vLLM sizes its KV cache from the free memory
      [ $i -gt 0 ] && sleep ${MTB_STAGGER:-20}
      ck=/tmp/ckpt/qwen2.5-coder-1.5b-dashq-$name; d=/tmp/results/mtbench/$name
      [ -d "$ck" ] || { echo "mtbench: $ck missing (run qwen-ckpts first)"; continue; }
      mkdir -p "$d"
      for f in "$REPO"/benchmarks/results/qwen-h100/mtbench/parent.*.jsonl; do
        [ -f "$d/${f##*/}" ] || cp "$f" "$d/"
      done
      port=$(( 8100 + 10 * i ))
      CUDA_VISIBLE_DEVICES=$(( i % ngpu )) PYTHON=python3 DTYPE=bfloat16 OUT_DIR=$d LIMIT=${MTB_LIMIT:-80} MAX_TOKENS=512 \
        MTB_PORT=$port JUDGE_URL=http://127.0.0.1:$port/v1 CONCURRENCY=${MTB_CONCURRENCY:-128} \
        EXTRA_ARGS="--gpu-memory-utilization ${MTB_GPU_UTIL:-0.12} --enforce-eager" \
        timeout -s INT ${MTB_TIMEOUT:-500} bash "$REPO"/benchmarks/mtbench_local.sh /tmp/qwen-hf "$ck" \
        > /tmp/results/mtbench/$name.log 2>&1 &
      pids+=($!); i=$(( i + 1 ))
    done
    for p in "${pids[@]}"; do wait "$p" || echo "mtbench: an instance stopped (resumable)"; done
    tail -n 3 /tmp/results/mtbench/*.log ;;
  ppl)  # perplexity of QWEN_SETTINGS' checkpoints (after qwen-ckpts), PPL_TIMEOUT (default 300 s) each
    PPL_TIMEOUT=${PPL_TIMEOUT:-300}
    for bg in ${QWEN_SETTINGS:-4:128 2:32 3:128}; do
      qwen_ppl /tmp/ckpt/qwen2.5-coder-1.5b-dashq-w${bg/:/g} w${bg/:/g}
    done ;;
esac
tar czf "$OUT/results.tgz" -C /tmp/results . && ls -la "$OUT"; ls /tmp/results
