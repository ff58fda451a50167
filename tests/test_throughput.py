"""benchmarks/throughput.py's pure parts: config specs, the dummy model directories it writes
(GPTQ must name modules_in_block_to_quantize; DASH-Q must list every linear), log parsing."""

import json

import pytest

from dashq_vllm.benchmarks import throughput as T
from dashq_vllm.format import load_dashq_config


def test_parse_config():
    assert T.parse_config("fp16")["bits"] == 16
    assert T.parse_config("dashq2:64") == {"name": "dashq2-g64", "method": "dashq", "bits": 2, "group_size": 64}
    assert T.parse_config("gptq4")["group_size"] == 128
    for bad in ("dashq", "int4", "dashq4:abc"):
        with pytest.raises(ValueError):
            T.parse_config(bad)


def test_model_dirs(tmp_path):
    T.write_model_dir(tmp_path / "g", "tiny", T.parse_config("gptq4:128"), "float16")
    q = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["modules_in_block_to_quantize"] == T.GPTQ_GROUPS
    T.write_model_dir(tmp_path / "d", "tiny", T.parse_config("dashq3:64"), "float16")
    cfg = load_dashq_config(tmp_path / "d")
    c = T.SHAPES["tiny"]
    assert len(cfg.modules) == 7 * c["num_hidden_layers"]
    down = cfg.modules["model.layers.1.mlp.down_proj"]
    assert (down.in_features, down.out_features, down.nbits, down.group_size) == (512, 256, 3, 64)
    k = cfg.modules["model.layers.0.self_attn.k_proj"]
    assert k.out_features == 256 // 4 * 2
    assert json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]["quant_method"] == "dashq"


def test_parse_model(tmp_path):
    """--models NAME=DIR: DASH-Q from dashq_config.json, GPTQ from config.json, else fp16; bad specs say why."""
    T.write_model_dir(tmp_path / "d", "tiny", T.parse_config("dashq3:64"), "float16")
    T.write_model_dir(tmp_path / "g", "tiny", T.parse_config("gptq4:128"), "float16")
    T.write_model_dir(tmp_path / "f", "tiny", T.parse_config("fp16"), "float16")
    assert T.parse_model(f"q3 = {tmp_path / 'd'}") == {"name": "q3", "method": "dashq", "bits": 3, "group_size": 64,
                                                       "model_dir": str(tmp_path / "d")}
    g = T.parse_model(f"g={tmp_path / 'g'}")
    assert (g["method"], g["bits"], g["group_size"]) == ("gptq", 4, 128)
    assert T.parse_model(f"base={tmp_path / 'f'}")["method"] == "fp16"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    (tmp_path / "bad" / "dashq_config.json").write_text("{not json")
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text("[1, 2")
    for spec, msg in ((str(tmp_path / "d"), "NAME=DIR"), (f"x={tmp_path / 'badcfg'}", "not a readable JSON object"), ("x=", "NAME=DIR"), (f"x={tmp_path / 'nope'}", "no config.json"),
                      (f"x={tmp_path / 'bad'}", "unreadable JSON")):
        with pytest.raises(ValueError, match=msg):
            T.parse_model(spec)


def test_main_with_models_runs_the_directories_as_they_are(tmp_path, monkeypatch):
    """--models: each configuration is the given directory (no dummy directory written), the run is
    recorded under --label, and duplicate names are refused."""
    monkeypatch.setattr(T, "environment", lambda: {})
    for name, spec in (("a", "fp16"), ("b", "dashq4:128")):
        T.write_model_dir(tmp_path / name, "tiny", T.parse_config(spec), "float16")
    seen = []

    def fake_worker(cmd, timeout, name, log_path):
        seen.append((name, cmd[cmd.index("--model-dir") + 1], cmd[cmd.index("--load-format") + 1],
                     cmd[cmd.index("--method") + 1]))
        return {"startup_s": 1.0, "rows": [{"batch": 1, "output_tok_s": 2.0}]}, ""

    monkeypatch.setattr(T, "run_worker", fake_worker)
    monkeypatch.setattr(T, "write_model_dir", lambda *a: pytest.fail("a dummy directory was written"))
    out = tmp_path / "r.json"
    models = f"fp16={tmp_path / 'a'},dashq4={tmp_path / 'b'}"
    assert T.main(["--models", models, "--label", "real", "--batches", "1", "--out", str(out)]) == 0
    assert seen == [("fp16", str(tmp_path / "a"), "auto", "fp16"), ("dashq4", str(tmp_path / "b"), "auto", "dashq")]
    doc = json.loads(out.read_text())
    assert doc["shape"] == "real" and doc["results"]["dashq4"]["config"]["model_dir"] == str(tmp_path / "b")
    assert T.main(["--models", f"x={tmp_path / 'a'},x={tmp_path / 'b'}", "--batches", "1"]) == 2


def test_environment_records_the_kernel_settings(monkeypatch):
    """Result files say which kernels ran: the env settings that switch them are recorded."""
    for k in T.KERNEL_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DASHQ_PTX_UNPACK", "1")
    env = T.environment()
    assert env["dashq_settings"] == {"DASHQ_PTX_UNPACK": "1"} and env["torch"]


def test_parse_log():
    log = ("INFO Model loading took 5.43 GiB memory and 3.1 seconds\nINFO GPU KV cache size: 522,976 tokens\n"
           "INFO Maximum concurrency for 4,096 tokens per request: 127.68x\nINFO Using MacheteLinearKernel for X\n")
    assert T.parse_log(log) == {"weights_gib": 5.43, "kv_cache_tokens": 522976, "max_concurrency": 127.68,
                                "vllm_kernels": ["MacheteLinearKernel"]}
    assert T.parse_log("nothing") == {}


def test_run_bounded_kills_the_whole_process_group(tmp_path):
    """A worker's own children (vLLM's engine processes) must not outlive a timeout."""
    import sys
    import time

    from dashq_vllm.benchmarks.procs import TIMEOUT, run_bounded

    pidfile = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(120)\n")
    t = time.monotonic()
    out, code = run_bounded([sys.executable, "-c", script], timeout=3, grace=1)
    assert code == TIMEOUT and "started" in out and time.monotonic() - t < 30
    _assert_gone(int(pidfile.read_text()))
    out, code = run_bounded([sys.executable, "-c", "import sys; print('ok'); sys.exit(3)"], timeout=30)
    assert (out.strip(), code) == ("ok", 3)


def test_run_bounded_returns_when_the_command_exits_even_if_its_children_linger(tmp_path):
    """A worker that printed its result and exited is not a timeout because an engine it started
    still holds the output pipe; the lingering child is killed."""
    import sys
    import time

    from dashq_vllm.benchmarks.procs import run_bounded

    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "print('RESULT ok', flush=True)\n"
              "sys.stderr.write('done\\n')\n")
    t = time.monotonic()
    out, code = run_bounded([sys.executable, "-c", script], timeout=60)
    assert code == 0 and out.splitlines() == ["RESULT ok", "done"] and time.monotonic() - t < 20
    _assert_gone(int(pidfile.read_text()))


def test_run_bounded_takes_the_worker_down_when_the_driver_is_interrupted(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "worker.pid"
    worker = tmp_path / "worker.py"
    worker.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    driver = ("import sys\n"
              "from dashq_vllm.benchmarks.procs import run_bounded, sigterm_as_interrupt\n"
              "with sigterm_as_interrupt():\n"
              "    try:\n"
              f"        run_bounded([sys.executable, {str(worker)!r}], timeout=120, grace=1)\n"
              "    except KeyboardInterrupt:\n"
              "        sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver])
    for _ in range(200):
        if pidfile.is_file() and pidfile.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    _assert_gone(int(pidfile.read_text()))


def _assert_gone(pid: int) -> None:
    import os
    import time

    for _ in range(50):  # gone, or a zombie waiting for init to reap it
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"process {pid} survived")


def test_main_records_failures_until_they_succeed(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "environment", lambda: {})
    monkeypatch.setattr(T, "write_model_dir", lambda *a: None)
    out = tmp_path / "t.json"
    args = ["--shape", "tiny", "--configs", "fp16", "--batches", "1", "--out", str(out)]

    def broken(*a):
        raise RuntimeError("fp16: worker failed (exit timeout)")

    monkeypatch.setattr(T, "run_config", broken)
    assert T.main(args) == 1
    assert "exit timeout" in json.loads(out.read_text())["results"]["_failed"]["fp16"]
    monkeypatch.setattr(T, "run_config", lambda o, cfg, work: {"rows": [{"batch": 1, "output_tok_s": 5.0}],
                                                                "startup_s": 1.0})
    assert T.main(args) == 0
    res = json.loads(out.read_text())["results"]
    assert "_failed" not in res and res["fp16"]["rows"][0]["output_tok_s"] == 5.0


def test_worker_groups_stop_every_running_worker_and_refuse_new_ones(tmp_path):
    """quality.py's parallel configurations: stop_all (the driver interrupted) kills every worker
    and what it started, and their callers get Stopped instead of a result to record."""
    import sys
    import threading

    from dashq_vllm.benchmarks.procs import Stopped, WorkerGroups

    groups = WorkerGroups(grace=1)
    assert groups.run([sys.executable, "-c", "print('ok')"]).stdout == "ok\n"
    outcomes, pidfiles = [], [tmp_path / f"child{i}.pid" for i in range(2)]

    def work(pidfile):
        script = ("import subprocess, sys, time\n"
                  "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                  f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
                  "time.sleep(120)\n")
        try:
            groups.run([sys.executable, "-c", script])
            outcomes.append("finished")
        except Stopped:
            outcomes.append("stopped")

    threads = [threading.Thread(target=work, args=(f,)) for f in pidfiles]
    for t in threads:
        t.start()
    import time
    for _ in range(400):
        if all(f.is_file() and f.read_text() for f in pidfiles):
            break
        time.sleep(0.05)
    groups.stop_all()
    for t in threads:
        t.join(timeout=30)
    assert outcomes == ["stopped", "stopped"]
    for f in pidfiles:
        _assert_gone(int(f.read_text()))
    with pytest.raises(Stopped):
        groups.run([sys.executable, "-c", "print('too late')"])

