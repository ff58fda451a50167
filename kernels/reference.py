"""Pure-torch reference of ``dashq::linear`` on the kernel layout (the CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import unpack_kernel_codes


def dequantize_kernel_weight(qweight: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor, bits: int,
                             group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kernel layout -> dense (N, K) weight ``q * s + szeros`` (computed in float32)."""
    codes = unpack_kernel_codes(qweight, bits).to(torch.float32)  # (K, N)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    z = szeros.to(torch.float32).repeat_interleave(group_size, dim=0)
    return (codes * s + z).t().to(dtype).contiguous()


def pad_input(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad the last dim of ``x`` to ``k`` (quant_in_features); a no-op when it is ``k``."""
    kx = x.shape[-1]
    if kx == k:
        return x
    if kx > k:
        raise ValueError(f"input has {kx} features, more than the weight's K={k}")
    return F.pad(x, (0, k - kx))


def reference_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor,
                     bits: int, group_size: int, n: int, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """unpack -> dequantize -> F.linear, in float32 when x is half precision on the CPU."""
    w = dequantize_kernel_weight(qweight, scales, szeros, bits, group_size)
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    y = F.linear(pad_input(x, k).to(compute), w.to(compute), None if bias is None else bias.to(compute))
    return y.to(x.dtype)
