"""The kernels' weight layout, and the repack between it and the checkpoint's flat stream.

Kernel layout of one (N = out_features, K = quant_in_features) linear at ``bits`` bits:

* ``qweight``: int32, shape ``(K * bits // 32, N)``. Codes are packed along K, one output
  column per int32 column, so a row of words is contiguous along N (coalesced loads).
  The codes are split into *planes* of power-of-two width: 2/4/8 bits are one plane of that
  width; 3 bits are a 2-bit plane (the low bits) followed by a 1-bit plane (the high bit),
  i.e. exactly 3 bits per weight. A plane of width ``b`` packs ``32 // b`` codes per word,
  least-significant first: code ``k`` of column ``n`` sits in plane row ``k // (32 // b)`` at
  bit ``(k % (32 // b)) * b``. Plane rows are stacked along dim 0 (2-bit rows 0 .. K/16, then
  1-bit rows K/16 .. K/16 + K/32 at 3 bits). K must be a multiple of 32.
* ``scales``: ``(K // group, N)``, the per-group scale ``s``.
* ``szeros``: ``(K // group, N)``, the folded zero ``-zero * s``, so that
  ``W[n, k] = q * s + szeros`` (one FMA) equals the checkpoint's ``(q - zero) * scale``.

Scales are stored as float16 when the checkpoint's are float16 and the folded zeros fit
(exact scales for either activation dtype); otherwise in the activation dtype. The kernels
convert them to float32 before use, so their dtype is free.
"""

from __future__ import annotations

import torch

from dashq_vllm.format import FormatError, ModuleSpec, pack_codes, unpack_codes

KERNEL_BITS = (2, 3, 4, 8)
K_ALIGN = 32  # every plane packs whole words along K


def plane_bits(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes that hold a ``bits``-bit code, low bits first."""
    if bits not in KERNEL_BITS:
        raise FormatError(f"kernels support bits in {KERNEL_BITS}, got {bits}")
    return (2, 1) if bits == 3 else (bits,)


def qweight_rows(bits: int, k: int) -> int:
    """Rows of the packed ``qweight`` for K = ``k``."""
    check_k(k)
    return k * bits // 32


def check_k(k: int) -> None:
    if k <= 0 or k % K_ALIGN:
        raise FormatError(f"K={k} must be a positive multiple of {K_ALIGN}")


def _pack_plane(codes_kn: torch.Tensor, width: int) -> torch.Tensor:
    """(K, N) codes of one plane (values < 2**width) -> (K // (32 // width), N) int32 words."""
    per = 32 // width
    k, n = codes_kn.shape
    c = codes_kn.to(torch.int64).view(k // per, per, n)
    shifts = (torch.arange(per, device=c.device, dtype=torch.int64) * width).view(1, per, 1)
    words = (c << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_pack_plane`: (rows, N) int32 -> (rows * 32 // width, N) int64."""
    per = 32 // width
    shifts = (torch.arange(per, device=words.device, dtype=torch.int64) * width).view(1, per, 1)
    vals = (words.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return vals.reshape(-1, words.shape[1])


def pack_kernel_codes(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) integer codes -> ``qweight`` (K * bits // 32, N) int32 in the kernel layout."""
    check_k(codes_kn.shape[0])
    c = codes_kn.to(torch.int64)
    planes, shift = [], 0
    for width in plane_bits(bits):
        planes.append(_pack_plane((c >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(planes, dim=0).contiguous()


def unpack_kernel_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` -> (K, N) int64 codes (inverse of :func:`pack_kernel_codes`)."""
    k = qweight.shape[0] * 32 // bits
    codes, row, shift = None, 0, 0
    for width in plane_bits(bits):
        rows = k * width // 32
        part = _unpack_plane(qweight[row:row + rows], width) << shift
        codes = part if codes is None else codes | part
        row += rows
        shift += width
    return codes


def _scale_dtype(scale: torch.Tensor, szeros: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if scale.dtype == torch.float16 and bool(torch.isfinite(szeros.to(torch.float16)).all()):
        return torch.float16
    return dtype


def repack_tensors(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: ModuleSpec,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> (qweight, scales, szeros) in the kernel layout (on packed's device)."""
    n, k, g = spec.out_features, spec.quant_in_features, spec.group_size
    check_k(k)
    codes = unpack_codes(packed, spec.nbits, spec.numel).view(n, k)
    qweight = pack_kernel_codes(codes.t(), spec.nbits)
    s = scale.reshape(n, k // g).t().to(torch.float32)
    sz = -zero.reshape(n, k // g).t().to(torch.float32) * s
    sdt = _scale_dtype(scale, sz, dtype)
    return qweight, s.to(sdt).contiguous(), sz.to(sdt).contiguous()


def unrepack_tensors(qweight: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor, spec: ModuleSpec,
                     scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel layout -> checkpoint tensors (packed, scale, zero). Codes and scales are exact;
    zero = -szeros / scales is exact up to the rounding of the folded ``szeros``."""
    codes = unpack_kernel_codes(qweight, spec.nbits)  # (K, N)
    packed = pack_codes(codes.t().contiguous(), spec.nbits)
    s = scales.to(torch.float32)
    zero = torch.where(s != 0, -szeros.to(torch.float32) / torch.where(s != 0, s, 1.0), 0.0)
    return (packed, s.t().reshape(-1, 1).to(scale_dtype).contiguous(),
            zero.t().reshape(-1, 1).to(scale_dtype).contiguous())
