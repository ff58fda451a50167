"""The kernels' weight layout, and the repack between it and the checkpoint's flat stream.

Kernel layout of one linear with N = out_features outputs and K = quant_in_features inputs,
at ``bits`` bits, K padded up to ``Kp = padded_k(K)``, a multiple of ``k_tile(bits)`` (padded
codes and scales are zero, so they add nothing):

* ``qweight``: int32 ``(Kp * bits // 32, N)``, one output column per int32 column, so a row
  of words is contiguous along N (coalesced, 16-byte loads).
  The codes are split into *planes* of power-of-two width: 2/4/8 bits are one plane of that
  width; 3 bits are a 2-bit plane (the low bits) followed by a 1-bit plane (the high bit), so
  exactly 3 bits per weight. A plane of width ``b`` holds ``P = 32 // b`` codes per word in
  blocks of ``R`` word rows holding ``KB = R P`` consecutive k: code ``k = KB B + R j + r``
  (``0 <= j < P``, ``0 <= r < R``) sits in word row ``R B + r`` at bits ``j b .. j b + b - 1``.
  So shifting R consecutive word rows right by ``j b`` gives the codes of R consecutive k.
  ``R`` (:func:`plane_rows`) is 16 for every plane (KB = 256 / 128 at 2 / 4 bits; 256 and 512 for the 3-bit
  planes) except 8 bits' 32 (KB = 128). So the kernels unpack 16 consecutive k (one tensor-core K
  step) of any plane with one immediate shift for the whole step. Planes are stacked along dim 0
  (at 3 bits: the 2-bit plane's Kp/16 rows, then the 1-bit plane's Kp/32 rows). K is padded to
  :func:`k_tile`, one block of every plane (256 at 2 bits, 512 at 3, else 128).
* ``scales``: ``(Kp // group, N)``, the per-group scale ``s``.
* ``szeros``: ``(Kp // group, N)``, the folded zero ``-zero * s``, so that
  ``W[n, k] = q * s + szeros`` (one FMA) equals the checkpoint's ``(q - zero) * scale``.

Scales are stored as float16 when the checkpoint's are float16 and the folded zeros fit
(exact scales for either activation dtype); otherwise in the activation dtype. The kernels
convert them to float32 before use, so their dtype is free.
"""

from __future__ import annotations

import functools

import torch

from dashq_vllm.format import FormatError, ModuleSpec, pack_codes, unpack_codes

KERNEL_BITS = (2, 3, 4, 8)


def plane_bits(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes that hold a ``bits``-bit code, low bits first."""
    if bits not in KERNEL_BITS:
        raise FormatError(f"kernels support bits in {KERNEL_BITS}, got {bits}")
    return (2, 1) if bits == 3 else (bits,)


def plane_rows(bits: int, width: int) -> int:
    """Word rows R per block of the ``width``-bit plane of ``bits``-bit codes: 32 at 8 bits (128 k),
    else 16 (32 * 16 / width k), so a 16-k step is one immediate shift."""
    return 32 if width == 8 else 16


@functools.lru_cache(maxsize=None)  # every launch asks (fit_config, the kernels' KT)
def k_tile(bits: int) -> int:
    """The padding unit of K and the kernels' K tile: one block of every plane (256 k at 2 bits,
    512 at 3, else 128), a whole number of groups."""
    return max(plane_rows(bits, w) * 32 // w for w in plane_bits(bits))


def padded_k(k: int, bits: int) -> int:
    return -(-k // k_tile(bits)) * k_tile(bits)


def qweight_rows(bits: int, k: int) -> int:
    """Rows of the packed ``qweight`` for a padded K = ``k``."""
    if k % k_tile(bits):
        raise FormatError(f"K={k} must be a multiple of {k_tile(bits)} at {bits} bits (use padded_k)")
    return k * bits // 32


def _pack_plane(codes_kn: torch.Tensor, width: int, rows: int) -> torch.Tensor:
    """(K, N) codes of one plane (values < 2**width) -> (K * width // 32, N) int32 words, in
    blocks of ``rows`` word rows."""
    per = 32 // width
    k, n = codes_kn.shape
    c = codes_kn.to(torch.int64).view(k // (rows * per), per, rows, n)  # k = KB B + R j + r
    shifts = (torch.arange(per, device=c.device, dtype=torch.int64) * width).view(1, per, 1, 1)
    words = (c << shifts).sum(dim=1).reshape(-1, n)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_plane(words: torch.Tensor, width: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`_pack_plane`: (rows, N) int32 -> (rows * 32 // width, N) int64."""
    per = 32 // width
    n = words.shape[1]
    shifts = (torch.arange(per, device=words.device, dtype=torch.int64) * width).view(1, per, 1, 1)
    w = words.to(torch.int64).view(-1, 1, rows, n)
    return ((w >> shifts) & ((1 << width) - 1)).reshape(-1, n)


def pack_kernel_codes(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """(Kp, N) integer codes, Kp a multiple of k_tile(bits) -> ``qweight`` (Kp * bits // 32, N)."""
    qweight_rows(bits, codes_kn.shape[0])
    c = codes_kn.to(torch.int64)
    planes, shift = [], 0
    for width in plane_bits(bits):
        planes.append(_pack_plane((c >> shift) & ((1 << width) - 1), width, plane_rows(bits, width)))
        shift += width
    return torch.cat(planes, dim=0).contiguous()


def unpack_kernel_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` -> (Kp, N) int64 codes (inverse of :func:`pack_kernel_codes`)."""
    k = qweight.shape[0] * 32 // bits
    codes, row, shift = None, 0, 0
    for width in plane_bits(bits):
        rows = k * width // 32
        part = _unpack_plane(qweight[row:row + rows], width, plane_rows(bits, width)) << shift
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
    kp = padded_k(k, spec.nbits)
    codes = torch.zeros(kp, n, dtype=torch.int64, device=packed.device)
    codes[:k] = unpack_codes(packed, spec.nbits, spec.numel).view(n, k).t()
    qweight = pack_kernel_codes(codes, spec.nbits)
    s = torch.zeros(kp // g, n, dtype=torch.float32, device=packed.device)
    sz = torch.zeros_like(s)
    s[: k // g] = scale.reshape(n, k // g).t().to(torch.float32)
    sz[: k // g] = -zero.reshape(n, k // g).t().to(torch.float32) * s[: k // g]
    sdt = _scale_dtype(scale, sz, dtype)
    return qweight, s.to(sdt).contiguous(), sz.to(sdt).contiguous()


def unrepack_tensors(qweight: torch.Tensor, scales: torch.Tensor, szeros: torch.Tensor, spec: ModuleSpec,
                     scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel layout -> checkpoint tensors (packed, scale, zero). Codes and scales are exact;
    zero = -szeros / scales is exact up to the rounding of the folded ``szeros``."""
    k, g = spec.quant_in_features, spec.group_size
    codes = unpack_kernel_codes(qweight, spec.nbits)[:k]  # (K, N)
    packed = pack_codes(codes.t().contiguous(), spec.nbits)
    s = scales[: k // g].to(torch.float32)
    zero = torch.where(s != 0, -szeros[: k // g].to(torch.float32) / torch.where(s != 0, s, 1.0), 0.0)
    return (packed, s.t().reshape(-1, 1).to(scale_dtype).contiguous(),
            zero.t().reshape(-1, 1).to(scale_dtype).contiguous())
