"""``dashq-vllm serve`` / ``chat``: checkpoint validation (fast, no vLLM), and a real
``vllm serve`` on tiny DASH-Q checkpoints driven through the OpenAI client (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dashq_vllm import format as fmt
from dashq_vllm.serve import cli as serve_cli
from test_vllm_method import PROMPTS, _agreement, make_dense, quantize_checkpoint, reference_model, reference_outputs

SERVE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "TOKENIZERS_PARALLELISM": "false", "DASHQ_CPU_MODE": "op"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_dense(tmp_path_factory.mktemp("serve") / "dense")


@pytest.fixture(scope="module")
def good_ckpt(dense, tmp_path_factory) -> Path:
    return quantize_checkpoint(dense, tmp_path_factory.mktemp("serve") / "tiny-w4g64", bits=4, group=64)


def run_serve_cli(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = serve_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(code: int, err: str) -> list[str]:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err
    return lines


# --------------------------------------------------------------------------- validation (fast)


def test_valid_checkpoint_check_and_dry_run(good_ckpt, capsys):
    code, out, err = run_serve_cli(["serve", good_ckpt, "--check"], capsys)
    assert code == 0, err
    assert "valid DASH-Q checkpoint (14 DASH-Q linears, 4-bit, group 64)" in err
    code, out, err = run_serve_cli(["serve", good_ckpt, "--max-model-len", "512", "--enforce-eager", "--dry-run",
                                    "--port", "8123"], capsys)
    assert code == 0, err
    cmd = out.split()
    assert cmd[cmd.index("--quantization") + 1] == "dashq"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--served-model-name") + 1] == good_ckpt.name
    assert cmd[cmd.index("--chat-template") + 1].endswith("chat_template.jinja")
    assert cmd[-3:] == ["--max-model-len", "512", "--enforce-eager"]


def test_lead_cli_wires_serve(good_ckpt, capsys):
    from dashq_vllm import cli

    capsys.readouterr()
    assert cli.main(["serve", str(good_ckpt), "--check"]) == 0
    assert "valid DASH-Q checkpoint" in capsys.readouterr().err


def test_refuses_other_quantization(good_ckpt, capsys):
    code, _, err = run_serve_cli(["serve", good_ckpt, "--quantization", "gptq", "--dry-run"], capsys)
    assert "--quantization dashq" in error_lines(code, err)[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(ckpt: Path, fn) -> None:
    t = load_file(str(ckpt / "model.safetensors"))
    fn(t)
    save_file(t, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def _missing_tensor(c: Path):
    _rewrite_tensors(c, lambda t: t.pop("model.layers.1.mlp.up_proj.scale"))
    return "missing tensor model.layers.1.mlp.up_proj.scale"


def _wrong_shape(c: Path):
    def f(t):
        k = "model.layers.0.self_attn.k_proj.W_q_packed"
        t[k] = t[k][:-3].clone()
    _rewrite_tensors(c, f)
    return "model.layers.0.self_attn.k_proj.W_q_packed: shape"


def _wrong_dtype(c: Path):
    def f(t):
        k = "model.layers.0.mlp.down_proj.W_q_packed"
        t[k] = t[k].to(torch.int64)
    _rewrite_tensors(c, f)
    return "model.layers.0.mlp.down_proj.W_q_packed: dtype int64"


def _unknown_format(c: Path):
    d = json.loads((c / fmt.CONFIG_FILENAME).read_text())
    d["format"] = "gguf-q4"
    (c / fmt.CONFIG_FILENAME).write_text(json.dumps(d))
    return "unknown format 'gguf-q4'"


def _truncated(c: Path):
    p = c / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return "truncated safetensors file"


def _no_dashq_config(c: Path):
    (c / fmt.CONFIG_FILENAME).unlink()
    return "no dashq_config.json"


def _moe(c: Path):
    d = json.loads((c / "config.json").read_text())
    d["num_local_experts"] = 8
    (c / "config.json").write_text(json.dumps(d))
    return "mixture-of-experts"


def _other_method(c: Path):
    d = json.loads((c / "config.json").read_text())
    d["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (c / "config.json").write_text(json.dumps(d))
    return "quant_method 'gptq'"


def _no_tokenizer(c: Path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (c / f).unlink()
    return "no tokenizer files"


def _no_config(c: Path):
    (c / "config.json").unlink()
    return "config.json is missing"


BAD = {f.__name__[1:]: f for f in (_missing_tensor, _wrong_shape, _wrong_dtype, _unknown_format, _truncated,
                                   _no_dashq_config, _moe, _other_method, _no_tokenizer, _no_config)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_fails_fast(good_ckpt, tmp_path, capsys, case):
    bad = _copy(good_ckpt, tmp_path / case)
    expected = BAD[case](bad)
    code, out, err = run_serve_cli(["serve", bad], capsys)  # would start vLLM if it passed
    lines = error_lines(code, err)
    assert any(expected in line for line in lines), (expected, lines)


def test_every_problem_reported(good_ckpt, tmp_path, capsys):
    bad = _copy(good_ckpt, tmp_path / "two")
    _missing_tensor(bad)
    _moe(bad)
    code, _, err = run_serve_cli(["serve", bad], capsys)
    assert len(error_lines(code, err)) == 2


def test_chat_without_server(capsys):
    from dashq_vllm.serve.server import free_port

    code, _, err = run_serve_cli(["chat", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "-m", "hi",
                                  "--timeout", "5"], capsys)
    assert "cannot reach" in error_lines(code, err)[0]


def test_standalone_entry_point(good_ckpt):
    r = subprocess.run([sys.executable, "-m", "dashq_vllm.serve.cli", "serve", str(good_ckpt), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- real server (slow)


@pytest.fixture(scope="module")
def server(good_ckpt):
    from dashq_vllm.serve.server import ServerProcess

    # Default vLLM compilation (torch.compile of the model with the dashq::linear op inside);
    # float32 so that greedy tokens can be compared exactly with the reference.
    srv = ServerProcess(good_ckpt, env=SERVE_ENV, ready_timeout=420,
                        vllm_args=["--max-model-len", "256", "--dtype", "float32", "--max-num-seqs", "32"])
    with srv:
        yield srv


@pytest.fixture
def client(server):
    from dashq_vllm.serve.chat import make_client

    return make_client(server.base_url, timeout=120)


@pytest.mark.slow
def test_two_turn_chat_and_stream(server, client, good_ckpt):
    from dashq_vllm.serve.chat import ChatSession

    model = client.models.list().data[0].id
    assert model == good_ckpt.name
    s = ChatSession(client, model, max_tokens=12)
    t1 = s.send("the river city")
    t2 = s.send("and the music")
    assert t1.reply and t2.reply and t1.completion_tokens == 12
    # The second turn carries the first (history): more prompt than the first turn and its reply.
    assert t2.prompt_tokens > t1.prompt_tokens + t1.completion_tokens
    # The same conversation streamed gives the same greedy replies.
    s2 = ChatSession(client, model, max_tokens=12)
    deltas: list[str] = []
    u1 = s2.send("the river city", stream=True, on_delta=deltas.append)
    u2 = s2.send("and the music", stream=True)
    assert len(deltas) > 1 and "".join(deltas) == u1.reply
    assert (u1.reply, u2.reply) == (t1.reply, t2.reply)
    assert u1.first_token_s is not None and u1.completion_tokens == 12


@pytest.mark.slow
def test_completion_agrees_with_reference(server, client, dense, good_ckpt):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(good_ckpt)
    n = 32
    got = []
    for p in PROMPTS:
        r = client.completions.create(model=good_ckpt.name, prompt=tok(p).input_ids, max_tokens=n, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        got.append({"tokens": list(r.choices[0].token_ids), "prompt_logprobs": []})
        assert r.usage.completion_tokens == n
        # plain text prompt too
    r = client.completions.create(model=good_ckpt.name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 4
    ref_k = reference_outputs(reference_model(dense, good_ckpt, kernel_layout=True), tok, PROMPTS, n)
    ref_f = reference_outputs(reference_model(dense, good_ckpt), tok, PROMPTS, n)
    stats = {"kernel-layout reference": _agreement(ref_k, got)["agree"],
             "format.dequantize reference": _agreement(ref_f, got)["agree"]}
    print("served greedy tokens agreeing with the transformers reference (first 32, 5 prompts):", stats)
    assert stats["kernel-layout reference"] >= 0.9, stats


@pytest.mark.slow
def test_32_concurrent_streams(server, good_ckpt):
    from dashq_vllm.serve.check import concurrent_streams

    # raises CheckError on a failed, lost or short stream
    stats = concurrent_streams(server.base_url, good_ckpt.name, 32, max_tokens=16, timeout=600)
    assert stats["complete"] == 32


@pytest.mark.slow
def test_chat_cli_round_trip(server):
    r = subprocess.run([sys.executable, "-m", "dashq_vllm.serve.cli", "chat", "--base-url", server.base_url,
                        "-m", "the river city", "-m", "and the music", "--stream", "--max-tokens", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
    assert r.stderr.count("tokens/s") == 2


@pytest.mark.slow
def test_chat_launch_dashq_config_only(dense, tmp_path):
    # The author's layout (no quantization_config in config.json) at 2 bits, served for one chat.
    ckpt = quantize_checkpoint(dense, tmp_path / "tiny-w2g32", bits=2, group=32, write_quant_config=False)
    env = {**__import__("os").environ, **SERVE_ENV}
    r = subprocess.run([sys.executable, "-m", "dashq_vllm.serve.cli", "chat", "--launch", str(ckpt),
                        "--vllm-arg=--enforce-eager", "--vllm-arg=--max-model-len=256", "-m", "the river city",
                        "--max-tokens", "8", "--timeout", "420"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "assistant> " in r.stdout and "tokens/s" in r.stderr
