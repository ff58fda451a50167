"""Triton kernels of ``dashq::linear`` (see ``kernels/__init__.py`` for the contract and
``kernels/layout.py`` for the weight layout).

One kernel, specialised by constexprs: it walks K in tiles of ``BLOCK_K``, unpacks the codes of
a (BLOCK_K, BLOCK_N) weight tile from its bit planes, dequantizes them in registers
(``q * s + szeros``, float32 FMA, then the activation dtype) and feeds ``tl.dot`` (tensor cores,
float32 accumulation). The decode path (M <= 16) is the same kernel with BLOCK_M = 16, narrow
N tiles and split-K over the grid's second axis (partial sums are atomically added into the
zero-initialised output); the GEMM path uses large M/N tiles, an L2-friendly grouped tile
order and no split.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .configs import KernelConfig, fit_config, pick_config

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# --------------------------------------------------------------------------- device helpers


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-row") order of output tiles so neighbouring programs share weight tiles in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _plane_codes(ptr, k0, offs_n, mask_n, N, WIDTH: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr):
    """Codes of one bit plane for k in [k0, k0 + NGT * GT): int32 (NGT, GT, BLOCK_N)."""
    PER: tl.constexpr = 32 // WIDTH
    WPG: tl.constexpr = GT // PER  # words per group-tile along K
    g = tl.arange(0, NGT)[:, None, None]
    kw = tl.arange(0, WPG)[None, :, None]
    rows = k0 // PER + g * WPG + kw
    words = tl.load(ptr + rows * N + offs_n[None, None, :], mask=mask_n[None, None, :], other=0)
    shifts = (tl.arange(0, PER) * WIDTH)[None, None, :, None]
    codes = (words[:, :, None, :] >> shifts) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (NGT, GT, codes.shape[3]))


@triton.jit
def _codes(qw_ptr, k0, offs_n, mask_n, N, K, BITS: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr):
    """Integer codes (NGT, GT, BLOCK_N) of the weight tile starting at row k0 (3 bits: 2+1 planes)."""
    if BITS == 3:
        lo = _plane_codes(qw_ptr, k0, offs_n, mask_n, N, 2, NGT, GT)
        hi = _plane_codes(qw_ptr + (K // 16) * N, k0, offs_n, mask_n, N, 1, NGT, GT)
        codes = lo | (hi << 2)
    else:
        codes = _plane_codes(qw_ptr, k0, offs_n, mask_n, N, BITS, NGT, GT)
    return codes


@triton.jit
def _exact_float(codes):
    """int32 codes in [0, 2**23) -> float32 without I2F: the bits of 2**23 + q, minus 2**23."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _group_rows(ptr, g0, offs_n, mask_n, N, NGT: tl.constexpr):
    """Rows g0 .. g0 + NGT of a (K / group, N) scale tensor as float32 (NGT, 1, BLOCK_N)."""
    g = (g0 + tl.arange(0, NGT))[:, None, None]
    return tl.load(ptr + g * N + offs_n[None, None, :], mask=mask_n[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def _dequant_tile(codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr, NGT: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(NGT, GT, BN) codes -> (BLOCK_K, BN) float32 weights q * s + szeros (one FMA each)."""
    s = _group_rows(s_ptr, k0 // GROUP, offs_n, mask_n, N, NGT)
    z = _group_rows(z_ptr, k0 // GROUP, offs_n, mask_n, N, NGT)
    w = _exact_float(codes) * s + z
    return tl.reshape(w, (BLOCK_K, w.shape[2]))


@triton.jit
def _magic_operand(codes, DTYPE: tl.constexpr):
    """codes -> DTYPE values MAGIC + q, exact and without I2F: OR the code into the mantissa of
    MAGIC = 1024 (fp16, codes < 1024) or 128 (bf16, codes < 128)."""
    if DTYPE == tl.float16:
        bits = codes | 0x6400
    else:
        bits = codes | 0x4300
    return bits.to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _dot(x, w, acc, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter's dot mishandles bf16 operands: give it exact float32 copies
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
    return tl.dot(x, w, acc)


@triton.jit
def _tile_dequant_dot(acc, x, codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr,
                      NGT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += x @ dequant(codes): weights dequantized in registers, then the tensor-core dot."""
    w = _dequant_tile(codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, NGT, BLOCK_K)
    return _dot(x, w.to(x.dtype, fp_downcast_rounding="rtne"), acc, DOT_F32)


@triton.jit
def _tile_scaled_dot(acc, x, codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += (x @ (MAGIC + q)) * s + sum(x) * (szeros - MAGIC * s), the tile inside one group:
    the dot sees raw codes, the scale is applied once per output instead of once per weight."""
    q = _magic_operand(tl.reshape(codes, (BLOCK_K, codes.shape[2])), x.dtype)
    part = _dot(x, q, tl.zeros(acc.shape, dtype=tl.float32), DOT_F32)
    magic = 1024.0 if x.dtype == tl.float16 else 128.0
    s = tl.reshape(_group_rows(s_ptr, k0 // GROUP, offs_n, mask_n, N, 1), (1, codes.shape[2]))
    z = tl.reshape(_group_rows(z_ptr, k0 // GROUP, offs_n, mask_n, N, 1), (1, codes.shape[2]))
    sum_x = tl.sum(x.to(tl.float32), axis=1)[:, None]
    return acc + part * s + sum_x * (z - magic * s)


@triton.jit
def _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS: tl.constexpr,
               ATOMIC: tl.constexpr):
    """Add the bias (first K split only), round to y's dtype, store or atomically accumulate."""
    mask_n = offs_n < N
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]
    out = acc.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, out, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, out, mask=mask)


# --------------------------------------------------------------------------- the kernel


@triton.jit
def dashq_linear_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym, SPLIT_K,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, GROUP_M: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SCALED_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """y[M, N] (+)= x[M, :KX] @ W[:K, N]; grid = (tiles of y, SPLIT_K). K % BLOCK_K == 0.
    ATOMIC (SPLIT_K > 1): partial sums are atomically added into the zero-filled y."""
    NGT: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups per K tile
    GT: tl.constexpr = BLOCK_K // NGT  # K rows per (group, tile)
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(per_split * (pid_k + 1), k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(per_split * pid_k, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < KX), other=0.0)
        codes = _codes(qw_ptr, k0, offs_n, mask_n, N, K, BITS, NGT, GT)
        if SCALED_DOT:
            acc = _tile_scaled_dot(acc, x, codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, BLOCK_K, DOT_F32)
        else:
            acc = _tile_dequant_dot(acc, x, codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, NGT, BLOCK_K,
                                    DOT_F32)
    _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def dashq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym, SPLIT_K,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """CUDA-core GEMV: one row of x per grid z index; float32 FMAs into a (BLOCK_K, BLOCK_N)
    accumulator that is reduced over K once at the end. grid = (N tiles, SPLIT_K, M)."""
    NGT: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    GT: tl.constexpr = BLOCK_K // NGT
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(per_split * (pid_k + 1), k_tiles)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t in range(per_split * pid_k, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < KX, other=0.0).to(tl.float32)
        codes = _codes(qw_ptr, k0, offs_n, mask_n, N, K, BITS, NGT, GT)
        acc += _dequant_tile(codes, s_ptr, z_ptr, k0, offs_n, mask_n, N, GROUP, NGT, BLOCK_K) * x[:, None]
    out = tl.sum(acc, axis=0)[None, :]
    _store_out(out, y_ptr, b_ptr, row + tl.arange(0, 1), offs_n, M, N, stride_ym, pid_k, HAS_BIAS, ATOMIC)


# --------------------------------------------------------------------------- host side


def launch(x2, qweight, scales, szeros, bias, y, bits: int, group_size: int, n: int, k: int,
           cfg: KernelConfig) -> None:
    """Launch on 2-D x2 (M, KX) into y (M, n): y must be zero-filled when cfg.split_k > 1."""
    m, kx = x2.shape
    cfg = fit_config(cfg, k, group_size, bits, x2.dtype)
    args = (x2, qweight, scales, szeros, bias if bias is not None else y, y, m, n, k, kx, x2.stride(0), y.stride(0),
            cfg.split_k)
    common = dict(BITS=bits, GROUP=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ATOMIC=cfg.split_k > 1,
                  HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kind == "gemv":
        dashq_gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k, m)](*args, **common)
        return
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    dashq_linear_kernel[grid](*args, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, SCALED_DOT=cfg.kind == "scaled",
                              DOT_F32=_INTERPRET, **common)


def triton_linear(x, qweight, scales, szeros, bits: int, group_size: int, n: int, k: int, bias=None,
                  cfg: KernelConfig | None = None):
    """The op's CUDA implementation (also runs on CPU tensors under TRITON_INTERPRET=1)."""
    import torch

    lead, kx = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, kx)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if cfg is None:
        cfg = pick_config(m, n, k, bits, group_size, x.device, x.dtype)
    y = (torch.zeros if cfg.split_k > 1 else torch.empty)((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        launch(x2, qweight, scales, szeros, bias, y, bits, group_size, n, k, cfg)
    return y.reshape(*lead, n)
