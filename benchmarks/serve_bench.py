"""Online serving benchmark: ``vllm bench serve`` against a running ``vllm serve`` for fp16, vLLM's
GPTQ 4-bit (Machete on Hopper) and DASH-Q 2/3/4-bit, on the same dummy-weight models as
``benchmarks/throughput.py`` (issue 4).

    python -m dashq_vllm.benchmarks.serve_bench --shape llama3-8b \\
        --configs fp16,gptq4:128,dashq4:128,dashq3:128,dashq2:64 --concurrency 1,16,64 \\
        --input-len 128 --output-len 256 --out benchmarks/results/online-llama3-8b-h100.json \\
        --raw-dir benchmarks/results/online-raw --log-dir benchmarks/results/logs
    python -m dashq_vllm.benchmarks.serve_bench --report benchmarks/results/online-llama3-8b-h100.json \\
        [--plot benchmarks/results/online-llama3-8b-h100.png]

Per configuration: the model directory is written by throughput.py's ``write_model_dir`` (config.json
and, for DASH-Q, dashq_config.json; weights are ``--load-format dummy``) plus a word-level tokenizer
with the shape's vocabulary (token i is the word ``t<i>``), so that the client's random prompts are
exactly ``--input-len`` tokens on both sides. One server per configuration
(``python -m vllm.entrypoints.cli.main serve DIR --load-format dummy [--quantization dashq] ...`` on
127.0.0.1, CUDA graphs + torch.compile on, prefix caching off), ready within ``--ready-timeout``
seconds or given up, stopped by its PID (SIGTERM, then SIGKILL to its process group); its log is kept
in ``--log-dir``. Per maximum concurrency C one client run
``python -m vllm.entrypoints.cli.main bench serve --dataset-name random --max-concurrency C
--num-prompts max(--prompts-per-level x C, --min-prompts) --ignore-eos --temperature 0
--num-warmups C --save-result ...`` (request rate inf: the client keeps C requests in flight), bounded
by ``--bench-timeout``; its saved JSON stays in ``--raw-dir`` and its TTFT / TPOT / ITL / E2E latency
(mean, median, p90, p99), output tok/s and request counts go into ``--out`` under
``results[config]["levels"][C]``.

Resumable per (configuration, concurrency): levels already in ``--out`` are skipped (``--force``
re-runs them), and a level whose raw JSON is in ``--raw-dir`` but not yet in ``--out`` (a run stopped
between the two) is read back instead of re-run. A configuration with nothing left to do starts no
server. ``--budget-s`` stops starting servers / clients when the time is nearly spent; SIGINT or
SIGTERM stop the server and save what was measured. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from . import throughput as T
from .procs import run_bounded, sigterm_as_interrupt, vllm_env_overrides

VLLM_CLI = ["-m", "vllm.entrypoints.cli.main"]
METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p50", "p90", "p99")
COUNTS = ("num_prompts", "max_concurrency", "completed", "failed", "total_input_tokens", "total_output_tokens")
RATES = ("duration", "request_throughput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s")


# --------------------------------------------------------------------------- pure parts


def parse_levels(spec: str) -> list[int]:
    """``"1,16,64"`` -> [1, 16, 64] (positive, unique, in the given order)."""
    try:
        levels = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad concurrency list {spec!r}: expected e.g. 1,16,64") from None
    if not levels or any(c < 1 for c in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"bad concurrency list {spec!r}: expected distinct positive integers, e.g. 1,16,64")
    return levels


def num_prompts(concurrency: int, per_level: int = 4, minimum: int = 8) -> int:
    return max(per_level * concurrency, minimum)


def write_tokenizer(d: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (the ids in
    throughput.hf_config), then ``t3`` ... ``t{vocab_size-1}``; whitespace split, no special tokens
    added, so decode -> encode of any id sequence gives it back and prompt lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  model_max_length=1 << 20, clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(d))


def prepare_model_dir(d: Path, shape: str, cfg: dict, dtype: str) -> Path:
    """throughput.py's dummy model directory plus the tokenizer a server and client need."""
    T.write_model_dir(d, shape, cfg, dtype)
    if not (d / "tokenizer.json").is_file():
        write_tokenizer(d, T.SHAPES[shape]["vocab_size"])
    return d


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in T.CAPTURE_SIZES if s <= max_num_seqs]
    return sizes if max_num_seqs in sizes else sizes + [max_num_seqs]


def server_command(model_dir: Path | str, cfg: dict, *, port: int, served_name: str, dtype: str = "float16",
                   max_model_len: int = 4096, max_num_seqs: int = 64, gpu_memory_utilization: float = 0.9,
                   eager: bool = False, host: str = "127.0.0.1", python: str = sys.executable,
                   extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``vllm serve`` on a dummy-weight model directory; DASH-Q gets ``--quantization dashq`` (GPTQ is
    detected from config.json, as in throughput.py, and vLLM picks Machete/Marlin for it)."""
    cmd = [python, *VLLM_CLI, "serve", str(model_dir), "--host", host, "--port", str(port),
           "--served-model-name", served_name, "--load-format", "dummy", "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
           "--gpu-memory-utilization", str(gpu_memory_utilization), "--no-enable-prefix-caching", "--seed", "0"]
    if cfg["method"] == "dashq":
        cmd += ["--quantization", "dashq"]
    if eager:
        cmd.append("--enforce-eager")
    else:
        cmd += ["--compilation-config", json.dumps({"cudagraph_capture_sizes": capture_sizes(max_num_seqs)})]
    return cmd + list(extra)


def bench_command(*, port: int, served_name: str, tokenizer: Path | str, concurrency: int, prompts: int,
                  input_len: int, output_len: int, result_dir: Path | str, result_filename: str,
                  host: str = "127.0.0.1", warmups: int | None = None, seed: int = 0,
                  python: str = sys.executable, metadata: dict | None = None) -> list[str]:
    """``vllm bench serve`` at one maximum concurrency, saving its result JSON."""
    cmd = [python, *VLLM_CLI, "bench", "serve", "--backend", "vllm", "--host", host, "--port", str(port),
           "--model", served_name, "--served-model-name", served_name, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
           "--ignore-eos", "--temperature", "0", "--num-warmups", str(concurrency if warmups is None else warmups),
           "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", "50,90,99", "--seed", str(seed),
           "--disable-tqdm", "--save-result", "--result-dir", str(result_dir), "--result-filename", result_filename]
    if metadata:
        cmd += ["--metadata", *[f"{k}={v}" for k, v in metadata.items()]]
    return cmd


def raw_filename(shape: str, cfg_name: str, concurrency: int) -> str:
    return f"{shape}-{cfg_name}-c{concurrency}.json"


def parse_bench_result(raw: dict, output_len: int | None = None) -> dict:
    """The numbers we keep from a ``vllm bench serve --save-result`` JSON (0.26 to 0.32 keys)."""
    if "output_throughput" not in raw or "completed" not in raw:
        raise ValueError("not a `vllm bench serve` result (no output_throughput/completed)")
    row: dict = {}
    for k in COUNTS:
        if raw.get(k) is not None:
            row[k] = int(raw[k])
    for k in RATES:
        if raw.get(k) is not None:
            row[k] = round(float(raw[k]), 3)
    for m in METRICS:
        for s in STATS:
            k = f"{s}_{m}_ms"
            if raw.get(k) is not None:
                row[k] = round(float(raw[k]), 3)
    n = row.get("num_prompts")
    complete = n is not None and row["completed"] == n and not row.get("failed")
    if complete and output_len is not None and "total_output_tokens" in row:
        complete = row["total_output_tokens"] == n * output_len
    row["complete"] = bool(complete)
    return row


def pending_levels(doc: dict, cfg_name: str, levels: list[int], force: bool = False) -> list[int]:
    """Concurrency levels of ``cfg_name`` not yet measured in ``doc`` (all of them with ``force``)."""
    if force:
        return list(levels)
    done = doc.get("results", {}).get(cfg_name, {}).get("levels", {})
    return [c for c in levels if str(c) not in done]


def run_metadata(opts: argparse.Namespace, cfg_name: str) -> dict:
    """What a client run records in its result JSON (``--metadata``), to recognise it when resuming."""
    return {"config": cfg_name, "shape": opts.shape, "input_len": opts.input_len, "output_len": opts.output_len,
            "dtype": opts.dtype, "eager": opts.eager}


def expected_raw(opts: argparse.Namespace, cfg_name: str, concurrency: int) -> dict:
    """The fields a usable raw result of (cfg_name, concurrency) must have: our metadata and vLLM's own."""
    return {**run_metadata(opts, cfg_name), "max_concurrency": concurrency,
            "num_prompts": num_prompts(concurrency, opts.prompts_per_level, opts.min_prompts)}


def recover_raw(raw_dir: Path | None, shape: str, cfg_name: str, concurrency: int,
                expect: dict | None = None) -> dict | None:
    """A level measured by a run that stopped before recording it: its raw JSON, parsed, if its
    ``--metadata`` matches ``expect`` (values compared as strings, as vLLM stores them); else None."""
    if raw_dir is None:
        return None
    p = Path(raw_dir) / raw_filename(shape, cfg_name, concurrency)
    try:
        raw = json.loads(p.read_text())
        if any(str(raw.get(k)) != str(v) for k, v in (expect or {}).items()):
            return None
        return parse_bench_result(raw, int(expect["output_len"]) if expect and "output_len" in expect else None)
    except (OSError, ValueError):
        return None


def markdown_table(doc: dict) -> str:
    """One row per (configuration, concurrency): output tok/s and TTFT / TPOT / ITL mean, median, p99."""
    head = ("| config | concurrency | output tok/s | TTFT mean / median / p99 (ms) | TPOT mean / median / p99 (ms) "
            "| ITL mean / median / p99 (ms) | requests |")
    lines = [head, "|" + "---|" * 7]

    def trio(r: dict, m: str) -> str:
        vals = [r.get(f"{s}_{m}_ms") for s in ("mean", "median", "p99")]
        return " / ".join("-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}") for v in vals)

    for name, res in doc.get("results", {}).items():
        if name.startswith("_"):
            continue
        for c, r in sorted(res.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            req = f"{r.get('completed', '?')}/{r.get('num_prompts', '?')}" + ("" if r.get("complete") else " (incomplete)")
            lines.append(f"| {name} | {c} | {r.get('output_throughput', float('nan')):,.0f} | {trio(r, 'ttft')} "
                         f"| {trio(r, 'tpot')} | {trio(r, 'itl')} | {req} |")
    return "\n".join(lines)


def plot(doc: dict, png: Path | str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, res in doc.get("results", {}).items():
        if name.startswith("_") or not res.get("levels"):
            continue
        items = sorted(res["levels"].items(), key=lambda kv: int(kv[0]))
        cs = [int(c) for c, _ in items]
        for ax, key in zip(axes, ("output_throughput", "median_tpot_ms", "median_ttft_ms")):
            ax.plot(cs, [r.get(key, float("nan")) for _, r in items], marker="o", label=name)
    for ax, label in zip(axes, ("output tokens/s", "median TPOT (ms)", "median TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    env, s = doc.get("environment", {}), doc.get("settings", {})
    fig.suptitle(f"vllm bench serve (vLLM {env.get('vllm')}), {doc.get('shape')} dummy weights, "
                 f"{s.get('input_len')} in / {s.get('output_len')} out, {env.get('gpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


# --------------------------------------------------------------------------- running


class _Stop(Exception):
    """Out of time (--budget-s)."""


def _write_json(path: Path | None, doc: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _server_class():
    from ..serve.server import ServerProcess

    class BenchServer(ServerProcess):
        """ServerProcess (own session, /health polling, stop by PID) running plain ``vllm serve``."""

        def __init__(self, cmd: list[str], **kw):
            super().__init__(cmd[cmd.index("serve") + 1], **kw)
            self._cmd = cmd

        def command(self) -> list[str]:
            return self._cmd

    return BenchServer


def client_times(output: str) -> dict[int, float]:
    """Seconds per concurrency level from the ``--client-worker`` markers."""
    return {int(m.group(1)): float(m.group(3)) for m in re.finditer(r"^=== level c=(\d+) end rc=(\S+) s=([\d.]+)$",
                                                                 output, re.MULTILINE)}


def client_worker(spec_path: Path) -> int:
    """Runs vLLM's own CLI (``vllm bench serve ...``) in this process once per level: the same code and
    arguments as the console script, without importing vLLM again for every level."""
    import traceback

    from vllm.entrypoints.cli.main import main as cli_main

    for run in json.loads(Path(spec_path).read_text())["runs"]:
        print(f"=== level c={run['concurrency']} start", flush=True)
        t = time.monotonic()
        sys.argv = ["vllm", *run["argv"]]
        try:
            cli_main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        print(f"=== level c={run['concurrency']} end rc={code} s={time.monotonic() - t:.2f}", flush=True)
        if code != 0:
            return 1
    return 0


def run_config(opts: argparse.Namespace, cfg: dict, todo: list[int], doc: dict, work: Path, t_end: float) -> None:
    from ..serve.server import ServerError, free_port

    res = doc["results"].setdefault(cfg["name"], {"config": cfg, "levels": {}})
    res.setdefault("levels", {})
    d = prepare_model_dir(work / f"{opts.shape}-{cfg['name']}", opts.shape, cfg, opts.dtype)
    port = free_port()
    cmd = server_command(d, cfg, port=port, served_name=cfg["name"], dtype=opts.dtype, max_model_len=opts.kv_len,
                         max_num_seqs=max(opts.levels), gpu_memory_utilization=opts.gpu_memory_utilization,
                         eager=opts.eager, extra=opts.server_arg)
    log_path = Path(opts.log_dir) / f"online-{opts.shape}-{cfg['name']}.log" if opts.log_dir else None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    srv = _server_class()(cmd, port=port, env=vllm_env_overrides(), log_path=log_path,
                          ready_timeout=min(opts.ready_timeout, max(t_end - time.monotonic(), 1)))
    print(f"# {cfg['name']}: starting server on port {port}" + (f" (log {log_path})" if log_path else ""), flush=True)
    t0 = time.monotonic()
    srv.start()
    try:
        try:
            srv.wait_ready()
        except ServerError as e:
            raise RuntimeError(f"server not ready: {str(e)[-3000:]}") from None
        server = {"startup_s": round(time.monotonic() - t0, 1), "command": cmd[1:]}
        server.update(T.parse_log(srv.log_tail(10**7)))
        res["server"] = server
        print(f"# {cfg['name']}: ready in {server['startup_s']} s; weights {server.get('weights_gib')} GiB, "
              f"KV {server.get('kv_cache_tokens')} tokens", flush=True)
        cmds = {}
        for c in todo:
            fname = raw_filename(opts.shape, cfg["name"], c)
            cmds[c] = bench_command(port=port, served_name=cfg["name"], tokenizer=d, concurrency=c,
                                    prompts=num_prompts(c, opts.prompts_per_level, opts.min_prompts),
                                    input_len=opts.input_len, output_len=opts.output_len, result_dir=opts.raw_dir,
                                    result_filename=fname, metadata=run_metadata(opts, cfg["name"]))
            (opts.raw_dir / fname).unlink(missing_ok=True)
        runs = [todo] if opts.client_mode == "inline" else [[c] for c in todo]
        for group in runs:
            left = t_end - time.monotonic()
            if left < opts.min_level_s:
                raise _Stop(f"{left:.0f} s left")
            if opts.client_mode == "inline":  # one process, vLLM imported once, `vllm bench serve` per level
                spec = work / f"client-{cfg['name']}.json"
                spec.write_text(json.dumps({"runs": [{"concurrency": c, "argv": cmds[c][3:]} for c in group]}))
                cmd = [sys.executable, "-m", "dashq_vllm.benchmarks.serve_bench", "--client-worker", str(spec)]
                log_name = f"online-{opts.shape}-{cfg['name']}-client.log"
            else:
                cmd = cmds[group[0]]
                log_name = f"online-{opts.shape}-{cfg['name']}-c{group[0]}-client.log"
            t = time.monotonic()
            out, code = run_bounded(cmd, min(opts.bench_timeout * len(group), max(left - 5, 1)))
            if opts.log_dir:
                (Path(opts.log_dir) / log_name).write_text(
                    "".join("+ " + " ".join(cmds[c]) + "\n" for c in group) + out)
            times = client_times(out) if opts.client_mode == "inline" else {group[0]: time.monotonic() - t}
            for c in group:
                row = recover_raw(opts.raw_dir, opts.shape, cfg["name"], c, expected_raw(opts, cfg["name"], c))
                if row is None:
                    msg = f"c={c}: client failed ({code}): {out[-1500:]}"
                    doc["results"].setdefault("_failed", {})[f"{cfg['name']}@{c}"] = msg
                    _write_json(opts.out, doc)
                    print(f"# {cfg['name']} {msg}", flush=True)
                    return  # the higher levels would fail the same way
                if c in times:
                    row["client_s"] = round(times[c], 1)
                res["levels"][str(c)] = row
                doc["results"].get("_failed", {}).pop(f"{cfg['name']}@{c}", None)
                _write_json(opts.out, doc)
                print(f"# {cfg['name']} c={c}: {row['output_throughput']:.0f} out tok/s, TTFT median "
                      f"{row.get('median_ttft_ms')} ms, TPOT median {row.get('median_tpot_ms')} ms, ITL p99 "
                      f"{row.get('p99_itl_ms')} ms ({row['completed']}/{row.get('num_prompts')} requests"
                      + ("" if row["complete"] else ", INCOMPLETE") + f", {row.get('client_s')} s)", flush=True)
    finally:
        t = time.monotonic()
        code = srv.stop(timeout=opts.stop_timeout)
        print(f"# {cfg['name']}: server stopped (pid {srv.proc.pid if srv.proc else None}, exit {code}, "
              f"{time.monotonic() - t:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(T.SHAPES), default="llama3-8b")
    p.add_argument("--configs", default="fp16,gptq4:128,dashq4:128,dashq3:128,dashq2:64")
    p.add_argument("--concurrency", default="1,16,64", help="maximum concurrency levels (default %(default)s)")
    p.add_argument("--prompts-per-level", type=int, default=4, help="prompts = this x concurrency ...")
    p.add_argument("--min-prompts", type=int, default=8, help="... but at least this many")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--kv-len", type=int, default=4096, help="--max-model-len")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--eager", action="store_true", help="--enforce-eager (no torch.compile/CUDA graphs)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `vllm serve` (repeat; e.g. --server-arg=--max-num-batched-tokens=8192)")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds for a server to become ready")
    p.add_argument("--bench-timeout", type=float, default=300, help="seconds per client run (one concurrency)")
    p.add_argument("--stop-timeout", type=float, default=30,
                   help="seconds a server gets to exit after SIGTERM before its process group is killed")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting servers/clients when this many seconds since start are nearly spent")
    p.add_argument("--min-config-s", type=float, default=150, help="with --budget-s: time a configuration needs")
    p.add_argument("--min-level-s", type=float, default=20, help="with --budget-s: time a concurrency level needs")
    p.add_argument("--out", type=Path, help="results JSON (resumable)")
    p.add_argument("--raw-dir", type=Path, help="where the client's --save-result JSONs go (default: next to --out)")
    p.add_argument("--log-dir", help="keep the server and client logs here")
    p.add_argument("--force", action="store_true", help="re-run levels already in --out")
    p.add_argument("--work", type=Path, help="where the dummy model directories go (default: a temp dir)")
    p.add_argument("--client-mode", choices=["inline", "process"], default="inline",
                   help="inline: one client process per configuration runs `vllm bench serve` (vLLM's CLI main) for "
                        "every level, importing vLLM once; process: `python -m vllm.entrypoints.cli.main bench "
                        "serve` per level (~10 s more each)")
    p.add_argument("--client-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the table of an existing results JSON")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also plot the results")
    opts = p.parse_args(argv)

    if opts.client_worker:
        return client_worker(opts.client_worker)
    if opts.report:
        doc = json.loads(opts.report.read_text())
        print(markdown_table(doc))
        if opts.plot:
            plot(doc, opts.plot)
        return 0
    try:
        opts.levels = parse_levels(opts.concurrency)
        cfgs = [T.parse_config(s) for s in opts.configs.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc = json.loads(opts.out.read_text()) if opts.out and opts.out.is_file() else {}
    if doc and doc.get("shape") != opts.shape:
        print(f"error: {opts.out} holds results for shape {doc.get('shape')!r}, not {opts.shape!r}", file=sys.stderr)
        return 2
    settings = {k: getattr(opts, k) for k in ("input_len", "output_len", "kv_len", "dtype", "gpu_memory_utilization",
                                              "eager", "prompts_per_level", "min_prompts", "server_arg")}
    if doc.get("settings") and any(doc["settings"][k] != v for k, v in settings.items() if k in doc["settings"]):
        print(f"error: {opts.out} was measured with other settings ({doc['settings']}); use another --out",
              file=sys.stderr)
        return 2
    doc.update(shape=opts.shape, settings=settings, environment=T.environment(),
               client="vllm bench serve --dataset-name random --ignore-eos --temperature 0 --request-rate inf")
    doc.setdefault("results", {})
    opts.raw_dir = opts.raw_dir or ((opts.out.parent / "online-raw") if opts.out else Path(tempfile.mkdtemp(prefix="dashq-online-raw-")))
    opts.raw_dir.mkdir(parents=True, exist_ok=True)
    t_end = time.monotonic() + (opts.budget_s if opts.budget_s else 1e9)
    stopped = None
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="dashq-online-") as tmp:
            work = opts.work or Path(tmp)
            for cfg in cfgs:
                todo = pending_levels(doc, cfg["name"], opts.levels, opts.force)
                for c in list(todo):  # measured by a run that stopped before writing --out
                    row = None if opts.force else recover_raw(opts.raw_dir, opts.shape, cfg["name"], c,
                                                              expected_raw(opts, cfg["name"], c))
                    if row is not None:
                        doc["results"].setdefault(cfg["name"], {"config": cfg, "levels": {}})["levels"][str(c)] = row
                        todo.remove(c)
                        print(f"# {cfg['name']} c={c}: recovered from {opts.raw_dir}", flush=True)
                _write_json(opts.out, doc)
                if not todo:
                    print(f"# {cfg['name']}: all levels in {opts.out}, skipped", flush=True)
                    continue
                left = t_end - time.monotonic()
                if left < opts.min_config_s:
                    stopped = f"budget: {left:.0f} s left, {cfg['name']} and later configurations not started"
                    break
                try:
                    run_config(opts, cfg, todo, doc, work, t_end)
                except _Stop as e:
                    stopped = f"budget: {e}"
                    break
                except (RuntimeError, OSError) as e:
                    print(f"# {cfg['name']} FAILED: {str(e)[-2000:]}", flush=True)
                    doc["results"].setdefault("_failed", {})[cfg["name"]] = str(e)[-2000:]
                else:
                    doc["results"].get("_failed", {}).pop(cfg["name"], None)
                finally:
                    if not doc["results"].get("_failed"):
                        doc["results"].pop("_failed", None)
                    _write_json(opts.out, doc)
    except KeyboardInterrupt:
        stopped = "interrupted"
    _write_json(opts.out, doc)
    if stopped:
        print(f"# stopped ({stopped}); run again to resume", flush=True)
    print(markdown_table(doc))
    if opts.plot:
        plot(doc, opts.plot)
    if stopped == "interrupted":
        return 130
    failed = doc["results"].get("_failed", {})
    return 1 if any(k.split("@")[0] == c["name"] for k in failed for c in cfgs) else 0


if __name__ == "__main__":
    sys.exit(main())
