"""Eval scoring: lm-eval-style loglikelihoods and perplexity against direct computations."""

import math

import pytest
import torch

from conftest import make_text
from dashq_vllm.quantize import evaluate
from dashq_vllm.quantize.model_io import load_model


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return load_model(tiny_model)


@torch.no_grad()
def _direct_loglik(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_split_moves_trailing_space_to_continuation(model_tok):
    _, tok = model_tok
    ctx, cont = evaluate.split_continuation(tok, "the river ", "city")
    whole = tok("the river city", add_special_tokens=False)["input_ids"]
    assert (ctx + cont)[-len(whole):] == whole and len(cont) >= 1


def test_batched_loglikelihoods_match_one_by_one(model_tok):
    model, tok = model_tok
    pairs = [("the river", " city music people"), ("water", " time"), ("the of and to in is", " north game light w3")]
    batched = evaluate.loglikelihoods(model, tok, pairs)
    for (c, x), got in zip(pairs, batched):
        ctx, cont = evaluate.split_continuation(tok, c, x)
        assert got == pytest.approx(_direct_loglik(model, ctx, cont), rel=1e-4, abs=1e-4)


def test_score_doc_acc_and_acc_norm(model_tok, monkeypatch):
    model, tok = model_tok
    doc = {"context": "the river", "choices": ["city", "music people water time"], "gold": 0}
    lls = [evaluate.loglikelihoods(model, tok, [(doc["context"], " " + c)])[0] for c in doc["choices"]]
    acc, acc_norm = evaluate.score_doc(model, tok, doc)
    assert acc == (lls[0] >= lls[1])
    norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
    assert acc_norm == (norm[0] >= norm[1])
    wino = {"contexts": ["the river", "the city"], "continuation": "is water", "gold": 1}
    a, an = evaluate.score_doc(model, tok, wino)
    assert a == an


@torch.no_grad()
def test_perplexity_matches_direct_cross_entropy(model_tok):
    model, tok = model_tok
    text = make_text(500, seed=9)
    res = evaluate.perplexity(model, tok, text, seqlen=32, max_windows=3, progress=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll = 0.0
    for i in range(3):
        x = torch.tensor([ids[i * 32:(i + 1) * 32]])
        logp = torch.log_softmax(model(x).logits.double(), -1)[0]
        nll -= sum(float(logp[j, x[0, j + 1]]) for j in range(31))
    assert res["ppl"] == pytest.approx(math.exp(nll / (3 * 31)), rel=1e-4)
    assert res["tokens"] == 93


def test_perplexity_text_too_short(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.perplexity(model, tok, "the river", seqlen=64, progress=False)


def test_zero_shot_uses_task_docs(model_tok, monkeypatch):
    import dashq_vllm.quantize.data as data

    model, tok = model_tok
    docs = [{"context": "the river", "choices": ["city", "music"], "gold": i % 2, "task": "piqa"} for i in range(4)]
    monkeypatch.setattr(data, "get_task_docs", lambda task: docs)
    res = evaluate.zero_shot(model, tok, ["piqa"], limit=3, progress=False)
    assert res["piqa"]["n"] == 3 and 0 <= res["piqa"]["acc"] <= 1


@pytest.mark.parametrize("tied", [True, False])
def test_model_from_config_skips_init_but_keeps_ties_and_buffers(tied):
    from transformers import LlamaConfig

    from dashq_vllm.quantize.model_io import model_from_config

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = model_from_config(cfg, torch.float32)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) == tied
    assert ("lm_head.weight" in model.state_dict()) or tied
    ref = model.model.rotary_emb.inv_freq  # computed in __init__, not by the skipped init
    assert torch.isfinite(ref).all() and ref[0] == 1.0
