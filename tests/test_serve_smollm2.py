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
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

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


def check(srv, ckpt: Path, concurrent: int = 0) -> dict:
    from dashq_vllm.serve.check import check_server

    stats = check_server(srv.base_url, ckpt, concurrent=concurrent)
    assert stats["model"] == ckpt.name
    print(ckpt.name, json.dumps(stats))
    return stats


def test_smollm2_4bit(smollm2, tmp_path):
    from dashq_vllm.serve.server import ServerProcess

    ckpt = quantize(smollm2, tmp_path / "smollm2-135m-dashq-w4g128", 4, 128)
    # default vLLM compilation; float32 so the greedy comparison measures the method, not bf16
    with ServerProcess(ckpt, env=SERVE_ENV, ready_timeout=600,
                       vllm_args=["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "32"]) as srv:
        stats = check(srv, ckpt, concurrent=32)
    assert stats["agreement"] >= 0.9 and stats["teacher_forced_agreement"] >= 0.95, stats


def test_smollm2_2bit_dashq_config_only(smollm2, tmp_path):
    from dashq_vllm.serve.server import ServerProcess

    ckpt = quantize(smollm2, tmp_path / "smollm2-135m-dashq-w2g32", 2, 32)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    with ServerProcess(ckpt, env=SERVE_ENV, ready_timeout=600,
                       vllm_args=["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]) as srv:
        stats = check(srv, ckpt)
    # teacher-forced: this degraded 2-bit g32 model has near-ties in greedy decoding (one flipped at
    # token 8 of one prompt on 2026-12-02, prefix agreement 0.85, teacher-forced 0.994)
    assert stats["teacher_forced_agreement"] >= 0.95, stats
