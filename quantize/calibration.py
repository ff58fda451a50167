"""Calibration: token windows, capture of the first decoder block's inputs, and per-linear
activation statistics (diagonal of X^T X for DASH-Q, the full Gram matrix for GPTQ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class QuantizeError(RuntimeError):
    """A user-facing quantization failure; the CLI prints its message on one line."""


def token_windows(token_ids: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (like GPTQ's calibration sampling).

    Text shorter than one window is repeated so short calibration files still work."""
    if nsamples <= 0 or seqlen <= 0:
        raise QuantizeError("--nsamples and --seqlen must be positive")
    if not token_ids:
        raise QuantizeError("calibration text is empty (no tokens)")
    ids = torch.tensor(token_ids, dtype=torch.long)
    if ids.numel() <= seqlen:
        ids = ids.repeat(seqlen // ids.numel() + 2)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a supported causal LM (Llama, Qwen2/3, Mistral, Gemma-3 text...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise QuantizeError(f"unsupported architecture {arch}: expected a decoder-only model with model.layers")
    return layers


def is_moe(config: Any) -> bool:
    return any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering the current block, one entry per calibration sample, and the
    keyword arguments (masks, rotary embeddings) the model passes to every block."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device) -> BlockInputs:
    """Run the embedding part of the model and capture what reaches block 0."""
    layers = decoder_layers(model)
    captured = BlockInputs(hidden=[])

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hs.detach())
        if not captured.kwargs:
            captured.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in samples:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for hs in inputs.hidden:
            out = block(hs, **inputs.kwargs)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


class ActivationStats:
    """Accumulates sum_n x_n^2 (and optionally sum_n x_n x_n^T) of a linear's inputs in fp32."""

    def __init__(self, in_features: int, device: torch.device, full: bool):
        self.diag = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if full else None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.diag += (x * x).sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
        self.rows += x.shape[0]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def collect_stats(block: nn.Module, inputs: BlockInputs, full_gram: bool) -> dict[str, ActivationStats]:
    """One forward pass of the block over all samples with hooks on every linear.

    Linears fed the very same input tensor as the linear called just before them (q/k/v,
    gate/up) share one accumulator instead of recomputing identical statistics."""
    linears = block_linears(block)
    stats: dict[str, ActivationStats] = {}
    owner: dict[str, str] = {}  # linear -> the linear whose accumulator it shares
    last: dict = {"x": None, "name": None}  # holding x keeps its memory from being reused

    def hook(name: str, lin: nn.Linear):
        def record(_m, args, _o):
            x = args[0]
            if name not in owner:
                owner[name] = last["name"] if x is last["x"] else name
            last["x"], last["name"] = x, name
            if owner[name] == name:
                if name not in stats:
                    stats[name] = ActivationStats(lin.in_features, lin.weight.device, full_gram)
                stats[name].add(x)
        return record

    handles = [lin.register_forward_hook(hook(n, lin)) for n, lin in linears.items()]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in linears if n not in owner]
    if missing:
        raise QuantizeError(f"linear layers never called during calibration: {', '.join(missing)}")
    return {n: stats[_root(owner, n)] for n in linears}


def _root(owner: dict[str, str], name: str) -> str:
    while owner[name] != name:
        name = owner[name]
    return name
