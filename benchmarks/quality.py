"""Quality benchmark: perplexity (and optionally zero-shot accuracy) of fp16 / RTN / GPTQ / DASH-Q
at several bit widths, group sizes and calibration sizes, plus quantization wall time, solver
time and peak RSS per run.

Each quantization and evaluation runs as its own `dashq-vllm` subprocess (so peak RSS is per run),
results accumulate in one JSON file and the run is resumable: configurations already in the
file are skipped. Not a test: numbers are measured, nothing is asserted.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "dashq_vllm.cli"]


def run_json(args: list[str], json_path: Path) -> dict:
    proc = subprocess.run(CLI + args + ["--json", str(json_path), "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def evaluate(model: str, opts, tmp: Path) -> dict:
    args = ["eval", model, "--ppl", opts.eval_text, "--seqlen", str(opts.eval_seqlen),
            "--max-windows", str(opts.eval_windows), "--device", opts.device]
    if opts.tasks:
        args += ["--tasks", opts.tasks, "--limit", str(opts.limit)]
    t0 = time.perf_counter()
    res = run_json(args, tmp / "eval.json")
    res["eval_s"] = time.perf_counter() - t0
    return res


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
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="results JSON (resumable)")
    p.add_argument("--workdir", default=None, help="where temporary checkpoints go")
    opts = p.parse_args(argv)
    opts.eval_seqlen = opts.eval_seqlen or opts.seqlen

    out = Path(opts.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["meta"] = {"model": opts.model, "calib": opts.calib, "calib_seqlen": opts.seqlen,
                       "eval_text": opts.eval_text, "eval_seqlen": opts.eval_seqlen, "eval_windows": opts.eval_windows,
                       "tasks": opts.tasks, "limit": opts.limit, "machine": platform.platform(),
                       "cpu_count": os.cpu_count(), "python": platform.python_version()}
    settings = [tuple(int(x) for x in s.split(":")) for s in opts.settings.split(",") if s]
    counts = [int(x) for x in opts.nsamples.split(",")]
    # RTN ignores calibration data: run it once, with the first sample count.
    plan = [("fp16", None, None, None)] + [
        (m, b, g, n) for n in counts for (b, g) in settings
        for m in opts.methods.split(",") if not (m == "rtn" and n != counts[0])]
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="dashq-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    for method, bits, group, nsamples in plan:
        key = config_key(method, bits, group, nsamples)
        if key in results["runs"]:
            continue
        print(f"[quality] {key}", flush=True)
        run_dir = work / key
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        entry: dict = {"method": method, "bits": bits, "group_size": group, "nsamples": nsamples}
        try:
            model = opts.model
            if method != "fp16":
                q = run_json(["quantize", opts.model, "--out", str(run_dir / "ckpt"), "--bits", str(bits),
                              "--group-size", str(group), "--method", method, "--calib", opts.calib,
                              "--nsamples", str(nsamples), "--seqlen", str(opts.seqlen), "--device", opts.device],
                             run_dir / "quant.json")
                entry.update({k: q[k] for k in ("wall_s", "solver_s", "calib_s", "peak_rss_mb", "peak_gpu_mb")})
                entry["mean_weighted_err"] = sum(l["err_method"] for l in q["layers"]) / len(q["layers"])
                model = str(run_dir / "ckpt")
            ev = evaluate(model, opts, run_dir)
            entry["ppl"] = ev["perplexity"][opts.eval_text]["ppl"]
            entry["eval_tokens"] = ev["perplexity"][opts.eval_text]["tokens"]
            if "tasks" in ev:
                entry["tasks"] = ev["tasks"]
        except RuntimeError as e:
            entry["error"] = str(e)[-500:]
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        results["runs"][key] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out)
        print(f"[quality] {key}: " + json.dumps({k: v for k, v in entry.items() if k != "tasks"}), flush=True)
    print(markdown_table(results))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
