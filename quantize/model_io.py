"""Loading dense and DASH-Q checkpoints into transformers models (the eval/reference path).

DASH-Q linears become :class:`DashQLinear` modules that hold the checkpoint's packed tensors
and dequantize them with the format's torch reference once, on first use.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dashq_vllm.checkpoint import is_dashq_checkpoint, validate_checkpoint
from dashq_vllm.format import FormatError, ModuleSpec, dequantize


class DashQLinear(nn.Module):
    """A linear layer stored as dashq-packed-linear tensors (reference implementation)."""

    def __init__(self, spec: ModuleSpec, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        shapes = spec.expected_shapes()
        for name, (shape, dt) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dt))
        self.bias = nn.Parameter(torch.empty(spec.out_features, dtype=dtype), requires_grad=False) if bias else None
        self._weight: torch.Tensor | None = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._weight is None or self._weight.dtype != dtype or self._weight.device != self.W_q_packed.device:
            self._weight = dequantize(self.W_q_packed, self.scale, self.zero, self.spec, dtype)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={s.in_features}, out={s.out_features}, bits={s.nbits}, group={s.group_size}"


def model_from_config(config, dtype: torch.dtype):
    """An uninitialised model of ``config`` (every weight is loaded afterwards): transformers'
    random init of a 1.5B model in fp16 on the CPU alone takes ~40 s on two cores."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the init above; a no-op unless tie_word_embeddings
    return model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a dense HF checkpoint or a DASH-Q one; returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FormatError(f"{path}: config.json is missing; not a model directory")
    if not is_dashq_checkpoint(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(device).eval(), load_tokenizer(path)
    cfg, files = validate_checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = model_from_config(config, dtype)
    keys = files.keys()
    for name, spec in cfg.modules.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{path}: quantized module {name} does not exist in {config.architectures}") from None
        _set_module(model, name, DashQLinear(spec, f"{name}.bias" in keys, dtype))
    state = dict(files.load())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing:
        raise FormatError(f"{path}: checkpoint lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if result.unexpected_keys:
        raise FormatError(f"{path}: unexpected tensors: {', '.join(result.unexpected_keys[:5])}")
    if tied:
        model.tie_weights()
    return model.to(device).eval(), load_tokenizer(path)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
