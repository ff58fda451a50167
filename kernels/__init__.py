"""DASH-Q packed 2/3/4/8-bit linear kernels: the integration contract (``dashq_vllm.kernels``).

This package never imports vLLM. Triton is imported lazily, only for CUDA tensors.

Load time (once per linear)::

    kw = repack(packed, scale, zero, spec, dtype, device)   # -> KernelWeights

  ``packed``/``scale``/``zero`` are the checkpoint tensors of one module (``W_q_packed`` int32
  1-D, ``scale``/``zero`` (num_groups, 1)) and ``spec`` its ``dashq_vllm.format.ModuleSpec``;
  ``dtype`` is the activation dtype (float16 or bfloat16). The result holds three tensors on
  ``device`` (``qweight`` int32 (k*bits/32, n); ``scales`` and ``szeros`` (k/group, n)) and the
  static ints ``bits, group_size, n, k`` (n = out_features, any value; k = the kernels' K:
  quant_in_features padded up to a multiple of ``k_tile(bits)`` (256 at 2 bits, 512 at 3, else 128),
  ``padded_k``; the padding holds zero codes and zero scales). See ``kernels/layout.py`` for the
  layout. ``unrepack(kw, spec)`` is the inverse. Scales are kept in float16 when the checkpoint's
  are (exact), so one KernelWeights serves fp16 and bf16 activations alike.

Forward (every call)::

    y = dashq_linear(x, kw.qweight, kw.scales, kw.szeros, kw.bits, kw.group_size, kw.n, kw.k, bias)
    y = linear(x, kw, bias)                                   # the same, shorter

  * ``x``: (..., in_features) float16/bfloat16, any leading dims, last dim contiguous. Its
    last dim may be anything up to ``k`` (normally in_features): the missing columns are
    treated as zeros inside the op, so callers need no padding.
  * ``bias``: optional (n,), any float dtype (added in float32, before the final rounding).
  * returns a new (..., n) tensor of ``x.dtype``; accumulation in float32.
  * ``torch.ops.dashq.linear`` is a ``torch.library`` op (schema ``_SCHEMA``; CPU and CUDA
    kernels, a fake kernel), so it traces under torch.compile (fullgraph checked on an H100).
    CUDA, by M = prod(leading dims): M <= 16 -> split-K decode kernels (tensor-core: "scaled" at 4
    bits, "dot" dequantizing in x's dtype at 2/3 bits; the CUDA-core GEMV at 2/3-bit g32 and M = 1;
    at M = 1 with fp16 x on layers of >= 8192 outputs (2-bit g64, 3/4-bit g128), the CUDA-core GEMV in
    packed fp16),
    16 < M <= 128 (64 at 3 bits) -> the "swap" GEMM (y^T = W^T x^T: unpacked weights feed Hopper's
    wgmma from registers; split-K), larger M (and 8 bits) -> one Triton pass dequantizing to a dense
    temporary, then cuBLAS (the only path allocating besides the output, through PyTorch's caching
    allocator). No host syncs, no data-dependent Python branches; the decode and swap paths allocate
    only the output (``torch.zeros`` when split-K or stream-K adds partial sums with atomics), so the
    op can be captured in CUDA graphs. Configs depend only on (M bucket, n, k, bits, group, GPU): a
    tuned table (``kernels/tuned/<gpu>.json``, or ``$DASHQ_KERNEL_CONFIGS``) over heuristics
    (``kernels/configs.py``). The first call of a new config compiles (5-15 s), so warm up every
    batch size before graph capture (vLLM does).
    Other devices: the pure-torch reference (unpack -> dequantize -> F.linear, ``reference_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dashq_vllm.format import ModuleSpec, dtype_from_name

from .layout import (KERNEL_BITS, k_tile, pack_kernel_codes, padded_k, plane_bits, qweight_rows, repack_tensors,
                     unpack_kernel_codes, unrepack_tensors)
from .reference import dequantize_kernel_weight, pad_input, reference_linear

__all__ = [
    "KERNEL_BITS", "KernelWeights", "repack", "unrepack", "dashq_linear", "linear", "reference_linear",
    "dequantize_kernel_weight", "pad_input", "pack_kernel_codes", "unpack_kernel_codes", "plane_bits",
    "qweight_rows", "padded_k", "k_tile", "triton_available",
]


@dataclass(frozen=True)
class KernelWeights:
    """One linear in the kernel layout: tensors plus the static ints the op needs."""

    qweight: torch.Tensor  # int32 (k * bits // 32, n); k = padded_k(quant_in_features, bits)
    scales: torch.Tensor  # (k // group_size, n)
    szeros: torch.Tensor  # (k // group_size, n), = -zero * scale
    bits: int
    group_size: int
    n: int
    k: int
    in_features: int


def repack(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: ModuleSpec,
           dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> KernelWeights:
    """Checkpoint tensors of one module -> :class:`KernelWeights` on ``device`` (default: packed's).
    The repack runs on ``device`` (fast on a GPU; no host syncs besides the range check)."""
    spec.validate()
    dev = torch.device(device) if device is not None else packed.device
    qw, s, sz = repack_tensors(packed.to(dev), scale.to(dev), zero.to(dev), spec, dtype)
    return KernelWeights(qw, s, sz, spec.nbits, spec.group_size, spec.out_features, qw.shape[0] * 32 // spec.nbits,
                         spec.in_features)


def unrepack(kw: KernelWeights, spec: ModuleSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`repack`: (packed, scale, zero) in the checkpoint format."""
    if spec is None:
        spec = ModuleSpec.create(kw.in_features, kw.n, kw.bits, kw.group_size)
    sdt = dtype_from_name(spec.scale_zero_dtype, torch.float16)
    return unrepack_tensors(kw.qweight, kw.scales, kw.szeros, spec, sdt)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


_SCHEMA = ("linear(Tensor x, Tensor qweight, Tensor scales, Tensor szeros, int bits, int group_size, int n, "
           "int k, Tensor? bias=None) -> Tensor")


def _cuda_linear(x, qweight, scales, szeros, bits, group_size, n, k, bias=None):
    from .triton_kernels import triton_linear

    return triton_linear(x, qweight, scales, szeros, bits, group_size, n, k, bias)


def _fake_linear(x, qweight, scales, szeros, bits, group_size, n, k, bias=None):
    return x.new_empty((*x.shape[:-1], n))


def _define_op() -> None:
    """Register dashq::linear through torch.library's low-level API (define + impl per device +
    fake): the same op for torch.compile and CUDA graphs as ``torch.library.custom_op`` gives,
    without its Python wrapper layers (~20 us of host time per call)."""
    if hasattr(torch.ops.dashq, "linear"):  # imported twice under two module names
        return
    lib = torch.library.Library("dashq", "FRAGMENT")
    lib.define(_SCHEMA)
    lib.impl("linear", reference_linear, "CPU")
    lib.impl("linear", _cuda_linear, "CUDA")
    torch.library.register_fake("dashq::linear", _fake_linear, lib=lib)
    _LIBS.append(lib)  # a Library deregisters its ops when collected


_LIBS: list = []
_define_op()


def dashq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor, bits: int,
                 group_size: int, n: int, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) with W in the kernel layout; dispatches on x's device (see module doc)."""
    return torch.ops.dashq.linear(x, qweight, scales, szeros, bits, group_size, n, k, bias)


def linear(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dashq_linear` with the tensors and ints of ``kw``."""
    return dashq_linear(x, kw.qweight, kw.scales, kw.szeros, kw.bits, kw.group_size, kw.n, kw.k, bias)
