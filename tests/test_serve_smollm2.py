"""Acceptance on CPU: ``dashq-vllm quantize`` SmolLM2-135M at 4 and 2 bits, ``dashq-vllm serve``
(vLLM's OpenAI server on 127.0.0.1, bounded start-up, stopped by PID), then with the openai
client: a two-turn chat, a streamed chat, a plain completion, 32 concurrent streams, and the
greedy tokens against our transformers reference (``quantize.model_io.load_model``) on 5 fixed
prompts. The 2-bit checkpoint has its ``quantization_config`` removed (the DASH-Q author's
layout: ``dashq_config.json`` only) and is served with ``--quantization dashq``.

Slow (about 10 minutes on 2 cores): quantization and two server start-ups. Skipped when the
SmolLM2 asset can be neither found nor fetched.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The three primary colors are"]
N_TOKENS = 32
SERVE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
             "TOKENIZERS_PARALLELISM": "false"}
QUANT_ARGS = ["--nsamples", "8", "--seqlen", "256", "--quiet"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        from dashq_vllm.quantize.assets import resolve_model

        return resolve_model("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - no asset, no network: nothing to test
        pytest.skip(f"SmolLM2-135M not available: {e}")


def quantize(src: Path, out: Path, bits: int, group: int) -> Path:
    from dashq_vllm import cli

    assert cli.main(["quantize", str(src), "--out", str(out), "--bits", str(bits), "--group-size", str(group),
                     *QUANT_ARGS]) == 0
    return out


def reference_tokens(ckpt: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and greedy continuations (EOS not special) from the transformers reference."""
    from dashq_vllm.quantize.model_io import load_model

    model, tok = load_model(ckpt, "cpu", torch.float32)
    prompts, outs = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out = model(ids, use_cache=True)
            toks = []
            for _ in range(N_TOKENS):
                nxt = out.logits[0, -1].argmax().view(1, 1)
                toks.append(int(nxt))
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            prompts.append(ids[0].tolist())
            outs.append(toks)
    return prompts, outs


def agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    agree = 0
    for r, g in zip(ref, got):
        for a, b in zip(r, g):
            if a != b:
                break
            agree += 1
    return agree / sum(len(r) for r in ref)


def check_server(srv, ckpt: Path, concurrent: int = 0) -> dict:
    from dashq_vllm.serve.chat import ChatSession, make_client

    client = make_client(srv.base_url, timeout=600)
    model = client.models.list().data[0].id
    assert model == ckpt.name
    # greedy tokens vs the reference
    prompts, ref = reference_tokens(ckpt)
    got = []
    for ids in prompts:
        r = client.completions.create(model=model, prompt=ids, max_tokens=N_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        got.append(list(r.choices[0].token_ids))
    stats = {"agreement": agreement(ref, got)}
    # plain completion
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens >= 1
    # two-turn chat, then the same streamed
    s = ChatSession(client, model, max_tokens=24)
    t1 = s.send("What is the capital of France?")
    t2 = s.send("And of Germany?")
    assert t1.reply.strip() and t2.reply.strip()
    assert t2.prompt_tokens > t1.prompt_tokens + t1.completion_tokens
    s2 = ChatSession(client, model, max_tokens=24)
    u1 = s2.send("What is the capital of France?", stream=True)
    u2 = s2.send("And of Germany?", stream=True)
    assert (u1.reply, u2.reply) == (t1.reply, t2.reply)
    stats["chat_tokens_per_s"] = round(t1.tokens_per_s, 1)
    stats["reply"] = t1.reply
    if concurrent:
        stats["concurrent"] = concurrent_streams(srv.base_url, model, concurrent)
    print(ckpt.name, json.dumps(stats))
    return stats


def concurrent_streams(base_url: str, model: str, n: int, max_tokens: int = 16) -> str:
    from dashq_vllm.serve.chat import make_client

    done: dict[int, int] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = make_client(base_url, timeout=600)
            usage = None
            for ch in c.chat.completions.create(model=model, stream=True, max_tokens=max_tokens, temperature=0,
                                                 messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}):
                usage = ch.usage or usage
            done[i] = usage.completion_tokens if usage else -1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors[:3]
    assert sorted(done) == list(range(n)) and set(done.values()) == {max_tokens}, done
    return f"{n}/{n} streams complete"


def test_smollm2_4bit(smollm2, tmp_path):
    from dashq_vllm.serve.server import ServerProcess

    ckpt = quantize(smollm2, tmp_path / "smollm2-135m-dashq-w4g128", 4, 128)
    # default vLLM compilation; float32 so the greedy comparison measures the method, not bf16
    with ServerProcess(ckpt, env=SERVE_ENV, ready_timeout=600,
                       vllm_args=["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "32"]) as srv:
        stats = check_server(srv, ckpt, concurrent=32)
    assert stats["agreement"] >= 0.9, stats


def test_smollm2_2bit_dashq_config_only(smollm2, tmp_path):
    from dashq_vllm.serve.server import ServerProcess

    ckpt = quantize(smollm2, tmp_path / "smollm2-135m-dashq-w2g32", 2, 32)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    with ServerProcess(ckpt, env=SERVE_ENV, ready_timeout=600,
                       vllm_args=["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]) as srv:
        stats = check_server(srv, ckpt)
    assert stats["agreement"] >= 0.9, stats
