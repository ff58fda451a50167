"""benchmarks/quality.py's pure parts: which runs get the zero-shot tasks, the workers' thread
share, the zero-shot table; layer_error.py's error measure."""

import pytest
import torch

from dashq_vllm.benchmarks.quality import HEADLINE_METRIC, gets_tasks, worker_env, zero_shot_table


def test_task_selection():
    assert not gets_tasks("", "all", "fp16", None)
    assert gets_tasks("piqa", "all", "gptq", 2)
    assert gets_tasks("piqa", "128", "fp16", None) and gets_tasks("piqa", "128", "rtn", 2)
    assert gets_tasks("piqa", "128", "dashq", 128) and not gets_tasks("piqa", "128", "dashq", 2)
    assert gets_tasks("all", "2,128", "gptq", 2)


def test_worker_env_shares_the_cores():
    assert "OMP_NUM_THREADS" not in worker_env(1, {"PATH": "/bin"}, 16)
    assert worker_env(4, {"PATH": "/bin"}, 16) == {"PATH": "/bin", "OMP_NUM_THREADS": "4"}
    assert worker_env(3, {}, 2)["OMP_NUM_THREADS"] == "1"
    assert worker_env(4, {"OMP_NUM_THREADS": "8"}, 16)["OMP_NUM_THREADS"] == "8"  # the caller's choice wins


def test_zero_shot_table():
    def tasks(base):
        return {t: {"acc": base + 0.01 * i, "acc_norm": base + 0.02 * i, "n": 50} for i, t in enumerate(HEADLINE_METRIC)}

    results = {"runs": {"fp16": {"ppl": 10.0, "tasks": tasks(0.5)},
                        "dashq-w2g32-n2": {"ppl": 20.0},  # no tasks: not a row
                        "dashq-w2g32-n128": {"ppl": 15.0, "tasks": {"piqa": {"acc": 0.4, "acc_norm": 0.45, "n": 50}}}}}
    lines = zero_shot_table(results).splitlines()
    assert lines[0].startswith("| config | wiki ppl | piqa (acc_norm) | arc_easy (acc) |") and lines[0].endswith("| mean |")
    fp = next(ln for ln in lines if ln.startswith("| fp16 |")).split(" | ")
    # piqa acc_norm 0.50, arc_easy acc 0.51, arc_challenge acc_norm 0.54, ...
    assert fp[2:5] == ["50.0", "51.0", "54.0"]
    mean = sum(100 * (0.5 + (0.02 if HEADLINE_METRIC[t] == "acc_norm" else 0.01) * i)
               for i, t in enumerate(HEADLINE_METRIC)) / len(HEADLINE_METRIC)
    assert fp[-1] == f"{mean:.1f} |"
    dq = next(ln for ln in lines if ln.startswith("| dashq-w2g32-n128 |"))
    assert "| 45.0 | - |" in dq and dq.endswith("| - |")  # missing tasks, so no mean
    assert not any("n2" in ln for ln in lines)
    assert lines[-1] == "(documents per task: 50)"


def test_gpu_stage_chunks_concatenate_to_the_stream(tmp_path):
    """gpu_stage.py cuts the GGUF byte stream into per-call folders of at most one chunk each."""
    import os

    from dashq_vllm.benchmarks.gpu_stage import ChunkWriter

    data = os.urandom(10_000)
    chunks = ChunkWriter(tmp_path, "m", 3000)
    for i in range(0, len(data), 700):  # writes that straddle chunk boundaries
        chunks.write(data[i:i + 700])
    dirs = chunks.close()
    assert [d.name for d in dirs] == ["01", "02", "03", "04"]
    files = [d / f"m.gguf.{d.name}" for d in dirs]
    assert [f.stat().st_size for f in files] == [3000, 3000, 3000, 1000]
    assert b"".join(f.read_bytes() for f in files) == data


def test_main_redoes_failed_configurations_only(tmp_path, monkeypatch):
    import json

    from dashq_vllm.benchmarks import quality as Q

    monkeypatch.setattr(Q, "environment", lambda: {})
    out = tmp_path / "q.json"
    out.write_text(json.dumps({"runs": {
        "fp16": {"method": "fp16", "bits": None, "group_size": None, "nsamples": None, "ppl": 10.0},
        "rtn-w2g32-n2": {"method": "rtn", "bits": 2, "group_size": 32, "nsamples": 2, "error": "killed"}}}))
    calls = []

    def fake_measure(opts, run_dir, method, bits, group, nsamples, tasks):
        calls.append((method, bits, group, nsamples))
        return {"method": method, "bits": bits, "group_size": group, "nsamples": nsamples, "ppl": 20.0}

    monkeypatch.setattr(Q, "measure", fake_measure)
    assert Q.main(["--settings", "2:32", "--methods", "rtn", "--nsamples", "2", "--out", str(out),
                   "--workdir", str(tmp_path / "w")]) == 0
    assert calls == [("rtn", 2, 32, 2)]
    assert json.loads(out.read_text())["runs"]["rtn-w2g32-n2"]["ppl"] == 20.0


def test_module_prints_both_tables_of_a_finished_run(tmp_path):
    """Run as a script (python -m): everything main() uses is defined before it runs."""
    import json
    import subprocess
    import sys

    tasks = {t: {"acc": 0.5, "acc_norm": 0.5, "n": 10} for t in HEADLINE_METRIC}
    out = tmp_path / "q.json"
    out.write_text(json.dumps({"runs": {"fp16": {"method": "fp16", "bits": None, "group_size": None,
                                                 "nsamples": None, "ppl": 10.0, "tasks": tasks}}}))
    proc = subprocess.run([sys.executable, "-m", "dashq_vllm.benchmarks.quality", "--settings", "", "--tasks", "all",
                           "--out", str(out), "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fp16 perplexity: 10.00" in proc.stdout and "| fp16 | 10.00 | 50.0 |" in proc.stdout


def test_layer_output_error_matches_the_activations():
    """layer_error's measure, from the Gram matrix, equals ||dW X^T||^2 / ||W X^T||^2 computed from the
    activations themselves (float64), and its diagonal share is sum dW^2 diag(G) over the total."""
    from dashq_vllm.benchmarks.layer_error import output_error, quadratic

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 48, dtype=torch.float64)
    x[:, 5] += 2 * x[:, 7]  # correlated channels: the off-diagonal part is not zero
    w = torch.randn(20, 48, generator=g, dtype=torch.float64)
    w_hat = w + 0.05 * torch.randn(20, 48, generator=g, dtype=torch.float64)
    gram = (x.T @ x).float()
    r = output_error(w, w_hat, gram, quadratic(w.float(), gram))
    dw = w_hat - w
    want = float(((dw @ x.T) ** 2).sum() / ((w @ x.T) ** 2).sum())
    assert r["err"] == pytest.approx(want, rel=1e-4)
    diag = float((dw ** 2 * (x ** 2).sum(0)).sum())
    assert r["diag_share"] == pytest.approx(diag / float(((dw @ x.T) ** 2).sum()), rel=1e-4)
    assert abs(r["diag_share"] - 1) > 1e-3
