# Shell helpers shared by the GPU scripts (sourced, not run). dashq_env: this checkout installed
# and on PYTHONPATH, GPU_TAG set. stage_model: the model staged by
# `python -m dashq_vllm.benchmarks.gpu_stage --model MODEL` (chunks carried into /tmp/stage, one
# call per folder) assembled, checked against its sha256, converted to HF safetensors once.
# Needs PYTHONPATH to hold dashq_vllm and the host's torch/transformers; installs the gguf wheel
# into /tmp/site and copies the staged data assets into $DASHQ_HOME.

stage_model() {  # MODEL DEST: DEST holds the converted model afterwards (nothing done if it does)
  local model=$1 dest=$2
  [ -f "$dest/config.json" ] && return 0
  local sum=/tmp/stage/$model.gguf.sha256 gguf=/tmp/gguf/$model.gguf
  [ -f "$sum" ] || { echo "stage_model: $sum missing: stage every folder of .gpuq/$model first" >&2; return 1; }
  mkdir -p /tmp/gguf "${DASHQ_HOME:?}" /tmp/site
  # an assembled GGUF that checks out is reused (a conversion that failed or was cut off is redone)
  if ! (cd /tmp/gguf && sha256sum -c --quiet "$sum" 2>/dev/null); then
    cat /tmp/stage/"$model".gguf.[0-9][0-9] > "$gguf" || return 1
    (cd /tmp/gguf && sha256sum -c --quiet "$sum") || { echo "stage_model: $model GGUF incomplete or corrupt" >&2; return 1; }
  fi
  [ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/gguf-*.whl || return 1
  cp -r /tmp/stage/home/data "$DASHQ_HOME"/
  rm -rf "$dest.tmp"
  python3 -c "import sys; from pathlib import Path; from dashq_vllm.quantize.assets import convert_gguf; \
convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])" "$gguf" "$dest.tmp" "$model" \
    && mv "$dest.tmp" "$dest" && rm -f /tmp/stage/"$model".gguf.[0-9][0-9]
}

dashq_env() {  # REPO: install our package from the checkout (no deps: the host's torch/triton stay;
               # DASHQ_SKIP_INSTALL=1 for a second step started alongside one that installs), export
               # PYTHONPATH/DASHQ_COMMIT, cd /tmp (the checkout's dashq_vllm/ must not shadow the
               # installed package), print the GPU, set GPU_TAG (result files named h100, h200, ...)
  local repo=$1
  [ -n "${DASHQ_SKIP_INSTALL:-}" ] || \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/dashq-site "$repo" >/dev/null || return 1
  export PYTHONPATH=/tmp/dashq-site:/tmp/site DASHQ_COMMIT=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
  cd /tmp || return 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  GPU_TAG=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -o -i 'h[0-9]\+' | head -n 1 | tr 'H' 'h')}
  GPU_TAG=${GPU_TAG:-gpu}
}
