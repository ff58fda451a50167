"""Quality benchmark: perplexity (and optionally zero-shot accuracy) of fp16 / RTN / GPTQ / DASH-Q
at several bit widths, group sizes and calibration sizes, plus quantization wall time, solver
time and peak RSS per run.

Each quantization and evaluation runs as its own `dashq-vllm` subprocess (so peak RSS is per run),
results accumulate in one JSON file and the run is resumable: configurations already in the
file are skipped. ``--jobs N`` runs N configurations at once (on one GPU: wall and solver times then
include the contention; time the solvers alone with solver_speed.py). Not a test: numbers are
measured, nothing is asserted.

    python -m dashq_vllm.benchmarks.quality --model smollm2-135m \\
        --settings 2:32,2:64,3:64,3:128,4:128 --methods rtn,gptq,dashq --nsamples 128,2 \\
        --seqlen 512 --eval-windows 40 --out benchmarks/results/quality-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .procs import Stopped, WorkerGroups, sigterm_as_interrupt
from .throughput import environment

CLI = [sys.executable, "-m", "dashq_vllm.cli"]


WORKERS = WorkerGroups()


def worker_env(jobs: int, environ: dict[str, str], cpus: int) -> dict[str, str]:
    """The environment of each quantize/eval subprocess: with several at once, each gets an equal
    share of the CPU threads (torch would otherwise start one thread per core in every process and
    oversubscribe the CPU: loading, packing and CPU-side work then crawl), unless the caller chose
    OMP_NUM_THREADS."""
    env = dict(environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cpus // jobs))
    return env


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_json(args: list[str], json_path: Path, env: dict[str, str] | None = None) -> dict:
    proc = WORKERS.run(CLI + args + ["--json", str(json_path), "--quiet"], env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def evaluate(model: str, opts, tmp: Path, tasks: bool) -> dict:
    args = ["eval", model, "--ppl", opts.eval_text, "--seqlen", str(opts.eval_seqlen),
            "--max-windows", str(opts.eval_windows), "--device", opts.device]
    if tasks:
        args += ["--tasks", opts.tasks, "--limit", str(opts.limit)]
    t0 = time.perf_counter()
    res = run_json(args, tmp / "eval.json", opts.worker_env)
    res["eval_s"] = time.perf_counter() - t0
    return res


def gets_tasks(tasks: str, task_nsamples: str, method: str, nsamples: int | None) -> bool:
    """Whether a configuration is also scored on the zero-shot tasks: all of them when
    ``task_nsamples`` is "all", else the source, RTN (no calibration) and the runs calibrated on
    one of the listed sample counts."""
    if not tasks:
        return False
    if task_nsamples == "all" or method in ("fp16", "rtn"):
        return True
    return nsamples in {int(x) for x in task_nsamples.split(",")}


def config_key(method: str, bits: int | None, group: int | None, nsamples: int | None) -> str:
    return "fp16" if method == "fp16" else f"{method}-w{bits}g{group}-n{nsamples}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", default="2:32,2:64,3:64,3:128,4:128", help="bits:group list")
    p.add_argument("--methods", default="rtn,gptq,dashq")
    p.add_argument("--nsamples", default="128,2", help="calibration sample counts")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--calib", default="news")
    p.add_argument("--eval-text", default="wiki")
    p.add_argument("--eval-seqlen", type=int, default=None, help="default: --seqlen")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--tasks", default="", help="zero-shot tasks (comma-separated), empty for none")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--task-nsamples", default="all",
                   help="calibration sample counts whose runs also get the zero-shot tasks (the source and RTN "
                        "always do), e.g. 128; default all")
    p.add_argument("--jobs", type=int, default=1, help="configurations run at once (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="results JSON (resumable)")
    p.add_argument("--workdir", default=None, help="where temporary checkpoints go")
    opts = p.parse_args(argv)
    opts.eval_seqlen = opts.eval_seqlen or opts.seqlen
    opts.worker_env = worker_env(opts.jobs, dict(os.environ), usable_cpus())

    out = Path(opts.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["meta"] = {"model": opts.model, "calib": opts.calib, "calib_seqlen": opts.seqlen,
                       "eval_text": opts.eval_text, "eval_seqlen": opts.eval_seqlen, "eval_windows": opts.eval_windows,
                       "tasks": opts.tasks, "limit": opts.limit, "machine": platform.platform(),
                       "cpu_count": os.cpu_count(), "python": platform.python_version(), "jobs": opts.jobs,
                       "task_nsamples": opts.task_nsamples, "environment": environment()}
    settings = [tuple(int(x) for x in s.split(":")) for s in opts.settings.split(",") if s]
    counts = [int(x) for x in opts.nsamples.split(",")]
    # RTN ignores calibration data: run it once, with the first sample count.
    plan = [("fp16", None, None, None)] + [
        (m, b, g, n) for n in counts for (b, g) in settings
        for m in opts.methods.split(",") if not (m == "rtn" and n != counts[0])]
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="dashq-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def run_one(method: str, bits: int | None, group: int | None, nsamples: int | None) -> None:
        key = config_key(method, bits, group, nsamples)
        print(f"[quality] {key}", flush=True)
        entry = measure(opts, work / key, method, bits, group, nsamples, gets_tasks(opts.tasks, opts.task_nsamples, method, nsamples))
        with lock:
            results["runs"][key] = entry
            save(out, results)
        print(f"[quality] {key}: " + json.dumps({k: v for k, v in entry.items() if k != "tasks"}), flush=True)

    # finished configurations are kept; failed ones (an out-of-memory kill, a full disk) are retried
    todo = [c for c in plan if "error" in results["runs"].get(config_key(*c), {"error": None})]
    pool = ThreadPoolExecutor(max_workers=max(1, opts.jobs))
    try:
        with sigterm_as_interrupt():
            for f in [pool.submit(run_one, *c) for c in todo]:
                f.result()
    except BaseException as e:
        # Running configurations are dropped, not recorded (a rerun redoes them); a second signal
        # must not cut this short and orphan the workers, which run in sessions of their own.
        old_term, old_int = signal.signal(signal.SIGTERM, signal.SIG_IGN), signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            pool.shutdown(wait=False, cancel_futures=True)
            WORKERS.stop_all()
            pool.shutdown(wait=True)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
        if isinstance(e, (KeyboardInterrupt, Stopped)):
            print(f"[quality] interrupted; {len(results['runs'])} configurations in {out}", file=sys.stderr)
            return 130
        raise
    pool.shutdown()
    print(markdown_table(results))
    if any("tasks" in r for r in results["runs"].values()):
        print("\n" + zero_shot_table(results))
    return 0


def measure(opts, run_dir: Path, method: str, bits: int | None, group: int | None, nsamples: int | None,
            tasks: bool) -> dict:
    """Quantize (unless fp16) and evaluate one configuration in subprocesses; a failure is recorded,
    not raised. The temporary checkpoint is removed afterwards."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    entry: dict = {"method": method, "bits": bits, "group_size": group, "nsamples": nsamples,
                   "jobs": opts.jobs}  # runs at once beside this one (times are inflated when > 1)
    try:
        model = opts.model
        if method != "fp16":
            q = run_json(["quantize", opts.model, "--out", str(run_dir / "ckpt"), "--bits", str(bits),
                          "--group-size", str(group), "--method", method, "--calib", opts.calib,
                          "--nsamples", str(nsamples), "--seqlen", str(opts.seqlen), "--device", opts.device],
                         run_dir / "quant.json", opts.worker_env)
            entry.update({k: q[k] for k in ("wall_s", "solver_s", "calib_s", "peak_rss_mb", "peak_gpu_mb")})
            entry["mean_weighted_err"] = sum(l["err_method"] for l in q["layers"]) / len(q["layers"])
            model = str(run_dir / "ckpt")
        ev = evaluate(model, opts, run_dir, tasks)
        entry["ppl"] = ev["perplexity"][opts.eval_text]["ppl"]
        entry["eval_tokens"] = ev["perplexity"][opts.eval_text]["tokens"]
        entry["eval_s"] = ev["eval_s"]
        if "tasks" in ev:
            entry["tasks"] = ev["tasks"]
    except RuntimeError as e:
        entry["error"] = str(e)[-500:]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return entry


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def markdown_table(results: dict) -> str:
    runs = results["runs"]
    fp = runs.get("fp16", {}).get("ppl")
    lines = [f"fp16 perplexity: {fp:.2f}" if fp else "fp16: not run", "",
             "| bits | group | calib samples | RTN | GPTQ | DASH-Q | DASH-Q solver s | GPTQ solver s |",
             "|---|---|---|---|---|---|---|---|"]
    combos = sorted({(r["bits"], r["group_size"], r["nsamples"]) for r in runs.values() if r["method"] != "fp16"},
                    key=lambda t: (-t[2], t[0], t[1]))
    for b, g, n in combos:
        def cell(m, field="ppl", fmt="{:.2f}"):
            r = runs.get(config_key(m, b, g, n)) or next(
                (v for v in runs.values() if m == "rtn" and (v["method"], v["bits"], v["group_size"]) == (m, b, g)), {})
            return fmt.format(r[field]) if field in r else ("err" if "error" in r else "-")
        lines.append(f"| {b} | {g} | {n} | {cell('rtn')} | {cell('gptq')} | {cell('dashq')} | "
                     f"{cell('dashq', 'solver_s', '{:.1f}')} | {cell('gptq', 'solver_s', '{:.1f}')} |")
    return "\n".join(lines)



# The metric reported per task (both acc and acc_norm are in the JSON): length-normalised accuracy
# where the choices are free text of different lengths, plain accuracy where they are not.
HEADLINE_METRIC = {"piqa": "acc_norm", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
                   "winogrande": "acc", "boolq": "acc", "openbookqa": "acc_norm"}


def zero_shot_table(results: dict) -> str:
    """Markdown table of the zero-shot accuracies (%) of every run that has them, with their mean."""
    runs = [(k, r) for k, r in results["runs"].items() if r.get("tasks")]
    tasks = [t for t in HEADLINE_METRIC if any(t in r["tasks"] for _, r in runs)]
    head = "| config | wiki ppl | " + " | ".join(f"{t} ({HEADLINE_METRIC[t]})" for t in tasks) + " | mean |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for key, r in runs:
        vals = [r["tasks"].get(t, {}).get(HEADLINE_METRIC[t]) for t in tasks]
        cells = [f"{100 * v:.1f}" if v is not None else "-" for v in vals]
        mean = f"{100 * sum(vals) / len(vals):.1f}" if vals and None not in vals else "-"
        lines.append(f"| {key} | {r['ppl']:.2f} | " + " | ".join(cells) + f" | {mean} |")
    docs = sorted({v["n"] for _, r in runs for v in r["tasks"].values()})
    lines.append(f"\n(documents per task: {', '.join(map(str, docs))})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
