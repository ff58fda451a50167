"""Shared fixtures: tiny random models saved as HF checkpoints (no downloads)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be "
         "river city music people water time year government school market north game light").split()


def make_tokenizer(path: Path):
    """A small word-level tokenizer with a chat template, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(200):
        vocab.setdefault(f"w{i}", len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(path)
    return tok


def make_text(n_words: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


def make_tiny_model(path: Path, arch: str = "llama", hidden: int = 96, layers: int = 2, inter: int = 160,
                    seed: int = 0, dtype=torch.bfloat16, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
                    tie: bool = True, init_range: float | None = None) -> Path:
    """A tiny random HF causal LM with a local tokenizer, saved to ``path``."""
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    torch.manual_seed(seed)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
           "phi3": Phi3Config, "gemma3": Gemma3TextConfig}[arch]
    extra = {"initializer_range": init_range} if init_range is not None else {}
    if arch in ("qwen3", "gemma3"):  # their default head_dim (128/256) is not hidden/heads
        extra["head_dim"] = hidden // heads
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
              tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype, **extra)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(make_text(6000, seed=1))
    return p
