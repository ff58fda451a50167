"""benchmarks/serve_bench.py (online `vllm bench serve`) and benchmarks/vllm_profile.py (vLLM's torch
profiler): command lines (checked against the installed vLLM's own parsers where it is there), parsing
of a result JSON saved by `vllm bench serve` (vLLM 0.32 CPU, tests/data), resume logic, the tokenizer
that makes prompt lengths exact, and the trace summary on small synthetic Chrome traces. Pure: no server
and no engine is started here."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest

from dashq_vllm.benchmarks import serve_bench as S
from dashq_vllm.benchmarks import throughput as T
from dashq_vllm.benchmarks import vllm_profile as P

SAMPLE = Path(__file__).parent / "data" / "vllm_bench_serve_0.32_tiny-fp16-c2.json"


def _opts(**kw):
    import argparse

    base = dict(shape="tiny", input_len=16, output_len=8, dtype="bfloat16", eager=True, prompts_per_level=2,
                min_prompts=4)
    base.update(kw)
    return argparse.Namespace(**base)


# --------------------------------------------------------------------------- small pure parts


def test_levels_and_prompt_counts():
    assert S.parse_levels("1,16,64") == [1, 16, 64]
    for bad in ("", "0,1", "1,1", "a", "1,-2"):
        with pytest.raises(ValueError):
            S.parse_levels(bad)
    assert [S.num_prompts(c) for c in (1, 2, 16, 64)] == [8, 8, 64, 256]
    assert S.num_prompts(3, per_level=2, minimum=4) == 6
    assert S.capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert S.capture_sizes(1) == [1]
    assert S.capture_sizes(24) == [1, 2, 4, 8, 16, 24]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_server_command(tmp_path):
    d = tmp_path / "m"
    dq = S.server_command(d, T.parse_config("dashq2:64"), port=8123, served_name="dashq2-g64", max_num_seqs=64)
    assert dq[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(d)]
    assert _flag(dq, "--quantization") == "dashq"
    assert _flag(dq, "--host") == "127.0.0.1" and _flag(dq, "--port") == "8123"
    assert _flag(dq, "--load-format") == "dummy" and _flag(dq, "--max-num-seqs") == "64"
    assert "--no-enable-prefix-caching" in dq and "--enforce-eager" not in dq
    assert json.loads(_flag(dq, "--compilation-config")) == {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}
    for spec in ("fp16", "gptq4:128"):  # GPTQ is detected from config.json (Machete/Marlin), fp16 is plain
        c = S.server_command(d, T.parse_config(spec), port=1, served_name="x")
        assert "--quantization" not in c
    eager = S.server_command(d, T.parse_config("fp16"), port=1, served_name="x", eager=True, extra=["--foo", "1"])
    assert "--enforce-eager" in eager and "--compilation-config" not in eager and eager[-2:] == ["--foo", "1"]


def test_bench_command(tmp_path):
    cmd = S.bench_command(port=8123, served_name="dashq4-g128", tokenizer=tmp_path, concurrency=16, prompts=64,
                          input_len=128, output_len=256, result_dir=tmp_path / "raw", result_filename="r.json",
                          metadata={"config": "dashq4-g128", "eager": False})
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    assert _flag(cmd, "--max-concurrency") == "16" and _flag(cmd, "--num-prompts") == "64"
    assert _flag(cmd, "--num-warmups") == "16"
    assert _flag(cmd, "--random-input-len") == "128" and _flag(cmd, "--random-output-len") == "256"
    assert _flag(cmd, "--dataset-name") == "random" and "--ignore-eos" in cmd and "--save-result" in cmd
    assert _flag(cmd, "--model") == "dashq4-g128" and _flag(cmd, "--tokenizer") == str(tmp_path)
    assert cmd[-2:] == ["config=dashq4-g128", "eager=False"]


def _vllm_parsers():
    pytest.importorskip("vllm")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.benchmarks.serve import add_cli_args

    bench = FlexibleArgumentParser()
    add_cli_args(bench)
    return make_arg_parser(FlexibleArgumentParser()), bench


@pytest.mark.vllm
def test_commands_parse_with_installed_vllm(tmp_path):
    """Every flag we pass exists in the installed vLLM with the meaning we want."""
    serve_p, bench_p = _vllm_parsers()
    cmd = S.server_command(tmp_path, T.parse_config("dashq4:128"), port=8123, served_name="q", max_num_seqs=16)
    a = serve_p.parse_args(cmd[cmd.index("serve") + 2:])
    assert (a.quantization, a.load_format, a.port, a.max_num_seqs, a.enable_prefix_caching) == ("dashq", "dummy", 8123,
                                                                                                16, False)
    cc = a.compilation_config
    sizes = cc.get("cudagraph_capture_sizes") if isinstance(cc, dict) else cc.cudagraph_capture_sizes
    assert sizes == [1, 2, 4, 8, 16]
    cmd = S.bench_command(port=8123, served_name="q", tokenizer=tmp_path, concurrency=16, prompts=64, input_len=128,
                          output_len=256, result_dir=tmp_path, result_filename="r.json", metadata={"config": "q"})
    b = bench_p.parse_args(cmd[cmd.index("serve") + 1:])
    assert (b.max_concurrency, b.num_prompts, b.random_input_len, b.random_output_len) == (16, 64, 128, 256)
    assert b.ignore_eos and b.save_result and b.dataset_name == "random" and b.request_rate == float("inf")
    assert b.temperature == 0 and b.num_warmups == 16 and b.metadata == ["config=q"]
    assert b.result_filename == "r.json" and b.percentile_metrics == "ttft,tpot,itl,e2el"


def test_tokenizer_round_trip_is_exact(tmp_path):
    """Random ids -> text -> ids is the identity, so `--random-input-len` tokens reach the server."""
    from transformers import AutoTokenizer

    S.prepare_model_dir(tmp_path, "tiny", T.parse_config("dashq4:128"), "float16")
    assert (tmp_path / "dashq_config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    vocab = T.SHAPES["tiny"]["vocab_size"]
    assert len(tok) == vocab and tok.num_special_tokens_to_add() == 0
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)  # as in throughput.hf_config
    ids = list(range(3, vocab, 7))[:128]
    text = tok.decode(ids)
    assert tok(text, add_special_tokens=True).input_ids == ids


# --------------------------------------------------------------------------- results and resume


def test_parse_bench_result_sample():
    raw = json.loads(SAMPLE.read_text())
    row = S.parse_bench_result(raw, output_len=8)
    assert row["complete"] is True
    assert (row["num_prompts"], row["max_concurrency"], row["completed"], row["failed"]) == (4, 2, 4, 0)
    assert row["total_output_tokens"] == 32
    assert row["output_throughput"] == pytest.approx(347.496, abs=1e-3)
    assert row["median_ttft_ms"] == pytest.approx(17.415, abs=1e-3)
    assert row["p99_itl_ms"] == pytest.approx(9.979, abs=1e-3)
    assert row["mean_tpot_ms"] == pytest.approx(3.849, abs=1e-3)
    for m in ("ttft", "tpot", "itl", "e2el"):
        for s in ("mean", "median", "p99"):
            assert f"{s}_{m}_ms" in row
    assert "latencies" not in row and "generated_texts" not in row
    # a different requested length, a failed request or a missing one: not complete
    assert S.parse_bench_result(raw, output_len=16)["complete"] is False
    assert S.parse_bench_result({**raw, "failed": 1, "completed": 3})["complete"] is False
    with pytest.raises(ValueError):
        S.parse_bench_result({"duration": 1.0})


def _write_raw(raw_dir: Path, opts, cfg: str, c: int, **over) -> Path:
    raw = json.loads(SAMPLE.read_text())
    meta = S.run_metadata(opts, cfg)
    raw.update({k: str(v) for k, v in meta.items()}, max_concurrency=c, num_prompts=S.num_prompts(
        c, opts.prompts_per_level, opts.min_prompts), **over)
    raw_dir.mkdir(parents=True, exist_ok=True)
    p = raw_dir / S.raw_filename(opts.shape, cfg, c)
    p.write_text(json.dumps(raw))
    return p


def test_pending_and_recover(tmp_path):
    doc = {"results": {"fp16": {"levels": {"1": {"output_throughput": 1.0}}}}}
    assert S.pending_levels(doc, "fp16", [1, 16, 64]) == [16, 64]
    assert S.pending_levels(doc, "fp16", [1, 16, 64], force=True) == [1, 16, 64]
    assert S.pending_levels(doc, "dashq4-g128", [1, 16]) == [1, 16]
    opts = _opts()
    _write_raw(tmp_path, opts, "fp16", 2)
    row = S.recover_raw(tmp_path, "tiny", "fp16", 2, S.expected_raw(opts, "fp16", 2))
    assert row is not None and row["complete"] and row["max_concurrency"] == 2
    # measured with other settings (or another concurrency / prompt count): not reused
    assert S.recover_raw(tmp_path, "tiny", "fp16", 2, S.expected_raw(_opts(output_len=256), "fp16", 2)) is None
    assert S.recover_raw(tmp_path, "tiny", "fp16", 2, S.expected_raw(_opts(eager=False), "fp16", 2)) is None
    assert S.recover_raw(tmp_path, "tiny", "fp16", 2, S.expected_raw(_opts(min_prompts=8), "fp16", 2)) is None
    assert S.recover_raw(tmp_path, "tiny", "fp16", 1, S.expected_raw(opts, "fp16", 1)) is None  # no file
    (tmp_path / S.raw_filename("tiny", "fp16", 4)).write_text("{not json")
    assert S.recover_raw(tmp_path, "tiny", "fp16", 4, None) is None


def test_main_resumes_without_starting_servers(tmp_path, monkeypatch, capsys):
    """Levels already in --out are skipped, a level whose raw JSON is there is read back, and only the
    rest reaches run_config (which would start a server)."""
    out, raw = tmp_path / "online.json", tmp_path / "raw"
    args = ["--shape", "tiny", "--configs", "fp16,dashq2:64", "--concurrency", "1,2", "--input-len", "16",
            "--output-len", "8", "--min-prompts", "4", "--prompts-per-level", "2", "--dtype", "bfloat16", "--eager",
            "--out", str(out), "--raw-dir", str(raw)]
    opts = _opts()
    doc = {"shape": "tiny", "settings": {"input_len": 16, "output_len": 8, "dtype": "bfloat16", "eager": True},
           "results": {"fp16": {"config": T.parse_config("fp16"),
                                "levels": {"1": S.parse_bench_result(json.loads(SAMPLE.read_text()))}}}}
    out.write_text(json.dumps(doc))
    _write_raw(raw, opts, "fp16", 2)
    _write_raw(raw, opts, "dashq2-g64", 1)
    calls = []

    def fake_run_config(o, cfg, todo, d, work, t_end):
        calls.append((cfg["name"], list(todo)))
        d["results"].setdefault(cfg["name"], {"config": cfg, "levels": {}})["levels"].update(
            {str(c): {"output_throughput": 9.0, "complete": True} for c in todo})

    monkeypatch.setattr(S, "run_config", fake_run_config)
    monkeypatch.setattr(T, "environment", lambda: {"vllm": "test"})
    assert S.main(args) == 0
    assert calls == [("dashq2-g64", [2])]  # fp16 complete (one stored, one recovered), dashq2 c=1 recovered
    res = json.loads(out.read_text())["results"]
    assert sorted(res["fp16"]["levels"]) == ["1", "2"] and sorted(res["dashq2-g64"]["levels"]) == ["1", "2"]
    assert res["dashq2-g64"]["levels"]["1"]["max_concurrency"] == 1
    text = capsys.readouterr().out
    assert "fp16 c=2: recovered" in text and "| dashq2-g64 | 2 | 9 |" in text
    calls.clear()
    assert S.main(args) == 0 and calls == []  # nothing left
    assert S.main([*args, "--force"]) == 0 and calls == [("fp16", [1, 2]), ("dashq2-g64", [1, 2])]
    # other settings or another shape into the same file: refused
    assert S.main([*args[:-4], "--output-len", "9", "--out", str(out)]) == 2
    assert S.main(["--shape", "llama3-8b", "--out", str(out)]) == 2


def test_budget_stops_before_a_configuration(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "run_config", lambda *a: pytest.fail("no time for a server"))
    monkeypatch.setattr(T, "environment", lambda: {})
    out = tmp_path / "o.json"
    assert S.main(["--shape", "tiny", "--configs", "fp16", "--out", str(out), "--budget-s", "100",
                   "--min-config-s", "150"]) == 0
    assert "budget" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"] == {}


def test_failed_configuration_exits_1_until_it_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "environment", lambda: {})
    out = tmp_path / "o.json"
    args = ["--shape", "tiny", "--configs", "fp16", "--concurrency", "1", "--out", str(out)]

    def broken(*a):
        raise RuntimeError("server exited with status 1")

    monkeypatch.setattr(S, "run_config", broken)
    assert S.main(args) == 1
    assert "server exited" in json.loads(out.read_text())["results"]["_failed"]["fp16"]

    def works(o, cfg, todo, d, work, t_end):
        d["results"].setdefault(cfg["name"], {"config": cfg, "levels": {}})["levels"]["1"] = {"complete": True}

    monkeypatch.setattr(S, "run_config", works)
    assert S.main(args) == 0
    assert "_failed" not in json.loads(out.read_text())["results"]


def test_client_times_and_markdown():
    out = "x\n=== level c=1 start\n...\n=== level c=1 end rc=0 s=12.50\n=== level c=16 end rc=1 s=3.00\n"
    assert S.client_times(out) == {1: 12.5, 16: 3.0}
    row = S.parse_bench_result(json.loads(SAMPLE.read_text()), output_len=8)
    bad = {**row, "complete": False}
    md = S.markdown_table({"results": {"fp16": {"levels": {"2": row, "1": bad}}, "_failed": {"x": "y"}}})
    lines = md.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| fp16 | 1 |") and "(incomplete)" in lines[2]
    assert lines[3].startswith("| fp16 | 2 | 347 | 17.8 / 17.4 / 22.1 | 3.85 / 3.92 / 4.40 | 3.85 / 3.46 / 9.98 | 4/4 |")


# --------------------------------------------------------------------------- profiler


def _kernel(name, ts, dur, tid=7):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur}


def synthetic_trace(context_step: bool = False) -> dict:
    ev = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}}]
    steps = ["execute_context_0(0)_generation_64(64)"] * 3
    if context_step:
        steps[0] = "execute_context_64(8192)_generation_0(0)"
    t = 0.0
    for name in steps:
        ev.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": 1, "tid": 1, "ts": t, "dur": 900})
        ev.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": t + 1, "dur": 50})
        for i in range(4):  # per step: 4 dashq GEMMs of 100 us, 1 flash attention of 40, 1 cuBLAS of 20
            ev.append(_kernel("dashq_linear_kernel", t + 10 + 110 * i, 100))
        ev.append(_kernel("void flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64>, true>(Flash_fwd_params)",
                          t + 500, 40))
        ev.append(_kernel("nvjet_hsh_128x64_64x4_2x1_v_bz_coopA_NTN", t + 550, 20))
        ev.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "pid": 0, "tid": 8, "ts": t, "dur": 5})
        t += 1000
    return {"schemaVersion": 1, "traceEvents": ev}


def test_summarize_trace_kernels():
    s = P.summarize_trace(synthetic_trace(), top=2)
    assert s["event_category"] == "kernel" and s["events"] == 18 and s["distinct"] == 3
    assert s["total_us"] == pytest.approx(3 * 460)
    assert s["n_steps"] == 3 and s["decode_only"] is True and s["per_step_us"] == pytest.approx(460)
    assert s["span_us"] == pytest.approx(2000 + 570 - 10) and s["gpu_memcpy_us"] == pytest.approx(15)
    top = s["top"]
    assert [r["name"] for r in top] == ["dashq_linear_kernel", top[1]["name"]] and top[1]["category"] == "attention"
    assert (top[0]["count"], top[0]["total_us"], top[0]["mean_us"], top[0]["per_step_us"]) == (12, 1200, 100, 400)
    assert top[0]["pct"] == pytest.approx(100 * 1200 / 1380, abs=0.01)
    assert top[1]["short"] == "flash_fwd_splitkv_kernel<>()"
    assert s["rest"] == {"distinct": 1, "count": 3, "total_us": 60.0, "pct": pytest.approx(100 * 60 / 1380, abs=0.01)}
    assert set(s["by_category"]) == {"dashq", "attention", "gemm"}
    assert sum(v["pct"] for v in s["by_category"].values()) == pytest.approx(100, abs=0.05)
    text = P.format_summary(s, "title")
    assert "3 profiled steps" in text and "dashq_linear_kernel" in text and "(1 more)" in text
    assert "NOT decode only" not in text
    assert P.summarize_trace(synthetic_trace(context_step=True))["decode_only"] is False
    assert "NOT decode only" in P.format_summary(P.summarize_trace(synthetic_trace(context_step=True)))


def test_summarize_cpu_only_trace_uses_self_time():
    ev = [{"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
          {"ph": "X", "cat": "cpu_op", "name": "aten::matmul", "pid": 1, "tid": 1, "ts": 5, "dur": 80},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 10, "dur": 60},
          {"ph": "X", "cat": "cpu_op", "name": "aten::add", "pid": 1, "tid": 1, "ts": 120, "dur": 10},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 2, "ts": 0, "dur": 30}]
    s = P.summarize_trace({"traceEvents": ev})
    assert s["event_category"] == "cpu_op" and s["n_steps"] == 0 and s["per_step_us"] is None
    by = {r["name"]: r["total_us"] for r in s["top"]}
    assert by == {"aten::mm": 90, "aten::linear": 20, "aten::matmul": 20, "aten::add": 10}
    assert s["total_us"] == 140  # = the wall time covered, not 280 (nesting not double counted)
    assert "CPU operators by self time" in P.format_summary(s)


def test_trace_files(tmp_path):
    trace = synthetic_trace()
    old = tmp_path / "llama3-8b-fp16-b64_dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    new = tmp_path / "llama3-8b-fp16-b64_dp0_pp0_tp0_dcp0_ep0_rank0.2.pt.trace.json.gz"
    other = tmp_path / "llama3-8b-fp16-b640_rank0.3.pt.trace.json"
    for p in (old, new):
        with gzip.open(p, "wt") as f:
            json.dump(trace, f)
    other.write_text(json.dumps({"traceEvents": []}))
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now - 50, now - 50))
    assert P.find_trace(tmp_path, "llama3-8b-fp16-b64") == new  # not the b640 one, newest of the two
    assert P.find_trace(tmp_path) == other
    assert P.find_trace(tmp_path, "nothing") is None
    assert P.load_trace(new) == trace and P.load_trace(other) == {"traceEvents": []}
    js = tmp_path / "s.json"
    assert P.main(["--summarize", str(new), "--json", str(js), "--top", "5"]) == 0
    assert json.loads(js.read_text())["summary"]["n_steps"] == 3
    assert P.main(["--summarize", str(tmp_path / "missing.json")]) == 2


def test_decode_plan_and_profiler_config(tmp_path):
    delay, max_tokens = P.decode_plan(batch=64, input_len=128, steps=8)
    assert delay == 6 and max_tokens == 18  # 8192 prompt tokens: <= 4 prefill iterations at 2048 a step
    assert P.decode_plan(batch=1, input_len=128, steps=8) == (3, 15)
    cfg = P.profiler_config(tmp_path / "t", delay, 8)
    assert cfg["profiler"] == "torch" and Path(cfg["torch_profiler_dir"]).is_absolute()
    assert (cfg["delay_iterations"], cfg["max_iterations"]) == (6, 8)
    try:
        from vllm.config import ProfilerConfig
    except ImportError:
        return
    pc = ProfilerConfig(**cfg)  # every key exists in the installed vLLM and validates
    assert (pc.profiler, pc.delay_iterations, pc.max_iterations, pc.ignore_frontend) == ("torch", 6, 8, True)
