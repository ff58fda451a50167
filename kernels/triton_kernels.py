"""Triton kernels of ``dashq::linear`` (see ``kernels/__init__.py`` for the contract and
``kernels/layout.py`` for the weight layout).

One kernel, specialised by constexprs. It walks K in tiles of one block of every bit plane
(``layout.k_tile``: 256 k at 2 bits, 512 at 3, else 128). For each chunk of 16 consecutive k (one
tensor-core K step) it takes (16, BLOCK_N) tiles of words (16-row blocks; 8 bits' 32-row blocks
as two halves; 3 bits' two 2-bit blocks per tile likewise) and shifts them by the chunk's slot:
one immediate shift per plane for the whole chunk, one mask per code, no reshuffling of
registers. Each chunk is consumed by one of three MODEs:

* ``MODE_DOT``: dequantize in registers (``q * s + szeros``: a float32 FMA, or with HALF_DQ a packed
  fp16/bf16 FMA from the scaled mode's operand) then ``tl.dot``;
* ``MODE_SCALED``: ``tl.dot`` on the raw codes (made exact half floats ``MAGIC + q`` with one OR,
  no int->float conversion), and per group ``acc += part * s + sum(x) * (szeros - MAGIC * s)``:
  the scale costs one FMA per output per group instead of one per weight;
* ``MODE_GEMV``: CUDA cores, one row of x per program (M = 1 decode): float32 FMAs into a
  (16, BLOCK_N) accumulator, scaled per group, reduced over its rows once at the end.

Config kind "swap" (mid M) runs the same kernel with the operands swapped (SWAP): y^T = W^T x^T,
so the unpacked (BLOCK_N, 16) weight tile is the dot's first operand (on Hopper wgmma's register A
operand: no shared-memory round trip) and x^T its second; scaled after the dot (x's group sums also
on the tensor cores, as ones @ x^T) or dequantized before it. Config kind "wide" (an older mid-M
GEMM) runs ``dashq_gemm_kernel`` instead: each K step gathers a whole (BLOCK_K, BLOCK_N) code
tile at once (every word read once per code it holds; the repeats hit L1) so one ``tl.dot`` covers
BLOCK_K <= group k, scaled afterwards as in MODE_SCALED (or dequantized before the dot as in
MODE_DOT). Config kind "dequant" (large M) instead writes the
dense weight once (``dashq_dequant_kernel``) and hands it to cuBLAS.

The decode path (M <= 16) uses BLOCK_M = 16 (or GEMV), narrow N tiles and split-K over the grid's
second axis (partial sums are atomically added into the zero-filled output), or with STREAM_K a
fixed number of programs sharing every (output tile, K tile) iteration; the GEMM path uses large
tiles, an L2-friendly grouped tile order and no split.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, fit_config, pick_config
from .layout import k_tile, plane_rows

# the layout's own rule, evaluated at compile time inside the kernels (one owner: layout.py; Triton 3.6
# accepts only functions that call no others, so the K tile, layout.k_tile, comes from the host as KT)
_plane_rows = triton.constexpr_function(plane_rows)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# KERNELS.md v6: the scaled mode extracts codes two at a time with inline PTX (checked on an H200
# against float64; 4-bit decode GEMMs 7-15% faster). On by default on NVIDIA GPUs; DASHQ_PTX_UNPACK=0
# turns it off. Never on ROCm, CPU tensors or the interpreter. 2 bits uses the same one-shift form
# as 4 bits since v7, 3 bits a two-plane form since v8 (16-row blocks everywhere); both were checked
# on an H200 against float64 (KERNELS.md v7, v8).
PTX_UNPACK = os.environ.get("DASHQ_PTX_UNPACK", "1") != "0"
_PTX_PLATFORM = torch.version.hip is None  # inline PTX is NVIDIA only
MODES = {"dot": 0, "scaled": 1, "gemv": 2}  # and "wide" (dashq_gemm_kernel), "dequant" (+ cuBLAS)
# q * s + z as one fused multiply-add (FFMA, or HFMA2 under half_dq): Triton 3.9 warns that its default
# turns fusion off in 3.10, which would add an instruction per weight to every dequantizing path
FP_FUSION = dict(enable_fp_fusion=True)
MODE_DOT: tl.constexpr = tl.constexpr(0)
MODE_SCALED: tl.constexpr = tl.constexpr(1)
MODE_GEMV: tl.constexpr = tl.constexpr(2)

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
def _plane_words(ptr, t, h: tl.constexpr, R: tl.constexpr, offs_n, mask_n, N, SWAP: tl.constexpr):
    """(16, BLOCK_N) words of block t of a plane with R-row blocks: rows R t + 16 h + [0, 16)
    (R = 32 has two halves h); SWAP: the same words as (BLOCK_N, 16)."""
    rows = t * R + 16 * h + tl.arange(0, 16)
    if SWAP:
        words = tl.load(ptr + rows[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0)
    else:
        words = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    return words


@triton.jit
def _plane_codes(words, c: tl.constexpr, WIDTH: tl.constexpr, R: tl.constexpr):
    """Codes (16, BLOCK_N) of chunk c (k = 16 c + [0, 16) in the block) of a plane with R >= 16 row
    blocks: word row (16 c) % R + r, slot 16 c // R, so one immediate shift for the chunk."""
    return (words >> (16 * c // R * WIDTH)) & ((1 << WIDTH) - 1)


@triton.jit
def _tile_words(qw_ptr, t, BITS: tl.constexpr, K, offs_n, mask_n, N, SWAP: tl.constexpr):
    """Every plane word K tile t needs, loaded once: the main plane's (two halves at 8 bits) and,
    at 3 bits, the 1-bit plane stored after the 2-bit plane's K / 16 rows (SWAP: transposed)."""
    if BITS == 3:  # 512-k tile: two blocks of the 2-bit plane, one of the 1-bit plane
        R2: tl.constexpr = _plane_rows(BITS, 2)
        main_a = _plane_words(qw_ptr, 2 * t, 0, R2, offs_n, mask_n, N, SWAP)
        main_b = _plane_words(qw_ptr, 2 * t + 1, 0, R2, offs_n, mask_n, N, SWAP)
        hi = _plane_words(qw_ptr + (K // 16) * N, t, 0, _plane_rows(BITS, 1), offs_n, mask_n, N, SWAP)
    else:
        R: tl.constexpr = _plane_rows(BITS, BITS)
        main_a = _plane_words(qw_ptr, t, 0, R, offs_n, mask_n, N, SWAP)
        main_b = main_a
        if BITS == 8:  # 32 rows per block: a second half
            main_b = _plane_words(qw_ptr, t, 1, R, offs_n, mask_n, N, SWAP)
        hi = main_a
    return main_a, main_b, hi


@triton.jit
def _chunk_main(main_a, main_b, c: tl.constexpr, BITS: tl.constexpr):
    """The main-plane words chunk c lives in (8 bits: the two 16-row halves alternate; 3 bits: the
    tile's second 2-bit block holds the chunks from C2 on)."""
    C2: tl.constexpr = 32 * _plane_rows(BITS, 2) // 2 // 16  # 16-k chunks per block of the 2-bit plane
    main = main_a
    if (BITS == 8 and c % 2 == 1) or (BITS == 3 and c >= C2):
        main = main_b
    return main


@triton.jit
def _chunk_codes(main_a, main_b, hi, c: tl.constexpr, BITS: tl.constexpr):
    """Codes (16, BLOCK_N) of chunk c of the tile from :func:`_tile_words`' words."""
    main = _chunk_main(main_a, main_b, c, BITS)
    if BITS == 3:
        R2: tl.constexpr = _plane_rows(BITS, 2)
        C2: tl.constexpr = 32 * R2 // 2 // 16  # 16-k chunks per block of the 2-bit plane
        q = _plane_codes(main, c % C2, 2, R2) | (_plane_codes(hi, c, 1, _plane_rows(BITS, 1)) << 2)
    else:
        q = _plane_codes(main, c, BITS, _plane_rows(BITS, BITS))
    return q


@triton.jit
def _exact_float(codes):
    """int32 codes in [0, 2**23) -> float32 without I2F: the bits of 2**23 + q, minus 2**23."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


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
def _pair_operand(words, SHIFT, mask2, magic2, DTYPE: tl.constexpr):
    """Inline PTX (CUDA only): DTYPE values MAGIC + ((words >> SHIFT) & mask), as
    :func:`_magic_operand` of :func:`_plane_codes`, two elements per asm block.

    SHIFT is one constant for every element (the code never straddles a 16-bit half): the halves
    holding it are packed into one register first (prmt), shifted once, then ``& mask | magic`` on
    both halves at once (lop3, LUT 0xEA = (a & b) | c). Element-wise whichever two elements Triton
    packs together; mask2 / magic2 hold the mask / the magic's bits in both 16-bit halves;
    constant operands fold into immediates."""
    asm: tl.constexpr = "{ .reg .b32 t; prmt.b32 t, $1, $2, $3; shr.b32 t, t, $5; lop3.b32 $0, t, $7, $9, 0xea; }"
    sel = tl.full(words.shape, 0x5410 if SHIFT < 16 else 0x7632, tl.int32)
    args = [words, sel, tl.full(words.shape, SHIFT % 16, tl.int32), mask2, magic2]
    cons: tl.constexpr = "=r,r,r,r,r,r,r,r,r,r,r"
    if DTYPE == tl.float16:
        out = tl.inline_asm_elementwise(asm, cons, args, dtype=tl.float16, is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(asm, cons, args, dtype=tl.bfloat16, is_pure=True, pack=2)
    return out


@triton.jit
def _pair3_operand(lo, hi, SHIFT_LO, SHIFT_HI, magic2, DTYPE: tl.constexpr):
    """Inline PTX (CUDA only), 3 bits: DTYPE values MAGIC + (((lo >> SHIFT_LO) & 3) |
    (((hi >> SHIFT_HI) & 1) << 2)), two elements per asm block, as :func:`_pair_operand` per plane:
    prmt + shr on the 2-bit plane's words, prmt + one shift that puts the high bit at bit 2 of each
    half on the 1-bit plane's, then ``(u & 4) | magic`` and ``(t & 3) | u`` (lop3 0xEA twice)."""
    sh: tl.constexpr = SHIFT_HI % 16
    if sh >= 2:  # the high bit moves down to bit 2 of each half
        asm: tl.constexpr = ("{ .reg .b32 t, u; prmt.b32 t, $1, $2, $5; shr.b32 t, t, $7; prmt.b32 u, $3, $4, $9; "
                             "shr.b32 u, u, $11; lop3.b32 u, u, $15, $17, 0xea; lop3.b32 $0, t, $13, u, 0xea; }")
    else:  # or up
        asm: tl.constexpr = ("{ .reg .b32 t, u; prmt.b32 t, $1, $2, $5; shr.b32 t, t, $7; prmt.b32 u, $3, $4, $9; "
                             "shl.b32 u, u, $11; lop3.b32 u, u, $15, $17, 0xea; lop3.b32 $0, t, $13, u, 0xea; }")
    args = [lo, hi,
            tl.full(lo.shape, 0x5410 if SHIFT_LO < 16 else 0x7632, tl.int32), tl.full(lo.shape, SHIFT_LO % 16, tl.int32),
            tl.full(lo.shape, 0x5410 if SHIFT_HI < 16 else 0x7632, tl.int32),
            tl.full(lo.shape, sh - 2 if sh >= 2 else 2 - sh, tl.int32),
            tl.full(lo.shape, 3 * 65537, tl.int32), tl.full(lo.shape, 4 * 65537, tl.int32), magic2]
    cons: tl.constexpr = "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r"  # out, then 9 packed pairs
    if DTYPE == tl.float16:
        out = tl.inline_asm_elementwise(asm, cons, args, dtype=tl.float16, is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(asm, cons, args, dtype=tl.bfloat16, is_pure=True, pack=2)
    return out


@triton.jit
def _chunk_operand(main_a, main_b, hi, c: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr,
                   PTX: tl.constexpr):
    """The scaled mode's dot operand MAGIC + q of chunk c: with PTX (CUDA) extracted two codes at a
    time by :func:`_pair_operand` (:func:`_pair3_operand` at 3 bits; every plane's blocks have >= 16
    rows, so one shift per chunk and plane), else :func:`_magic_operand` of :func:`_chunk_codes`."""
    main = _chunk_main(main_a, main_b, c, BITS)
    if PTX:
        magic2 = tl.full(main.shape, (0x6400 if DTYPE == tl.float16 else 0x4300) * 65537, tl.int32)
        if BITS == 3:
            R2: tl.constexpr = _plane_rows(BITS, 2)
            C2: tl.constexpr = 32 * R2 // 2 // 16  # 16-k chunks per block of the 2-bit plane
            out = _pair3_operand(main, hi, 16 * (c % C2) // R2 * 2, 16 * c // _plane_rows(BITS, 1), magic2, DTYPE)
        else:
            R: tl.constexpr = _plane_rows(BITS, BITS)
            mask2 = tl.full(main.shape, ((1 << BITS) - 1) * 65537, tl.int32)
            out = _pair_operand(main, 16 * c // R * BITS, mask2, magic2, DTYPE)
    else:
        out = _magic_operand(_chunk_codes(main_a, main_b, hi, c, BITS), DTYPE)
    return out


@triton.jit
def _group_row(ptr, k, GROUP: tl.constexpr, offs_n, mask_n, N, SWAP: tl.constexpr):
    """Row of group k // GROUP of a (K / group, N) scale tensor, float32 (1, BLOCK_N); SWAP: as a
    (BLOCK_N, 1) column."""
    v = tl.load(ptr + (k // GROUP) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SWAP:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _dot(x, w, acc, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter's dot mishandles bf16 operands: give it exact float32 copies
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
    return tl.dot(x, w, acc)


@triton.jit
def _half_dequant(v, s, z, MAGIC: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """half_dq's weights (v - MAGIC) s + z from the magic operand v, in DTYPE: one fused, packed FMA
    (HFMA2) per two weights on a GPU, with s and z first rounded to DTYPE (with bf16 x and fp16
    scales that costs precision: KERNELS.md v11). The interpreter cannot do bf16 arithmetic (nor its
    dot, :func:`_dot`): with DOT_F32 the same FMA runs in float32 (the product of two halves is exact)
    and is then rounded to DTYPE."""
    if DOT_F32:
        q = v.to(tl.float32) - MAGIC
        w = (q * s.to(DTYPE).to(tl.float32) + z.to(DTYPE).to(tl.float32)).to(DTYPE)
    else:
        w = (v - MAGIC) * s.to(DTYPE) + z.to(DTYPE)
    return w


@triton.jit
def _x_tile(x_ptr, offs_m, offs_k, mask_m, stride_xm, KX, EVEN_K: tl.constexpr, SWAP: tl.constexpr):
    """x's (BLOCK_M, 16) tile of rows offs_m and columns offs_k (SWAP: x^T, (16, BLOCK_M)); rows past
    M are zero, and so are columns past KX unless EVEN_K says there are none."""
    if SWAP:
        mask = mask_m[None, :]
        if not EVEN_K:
            mask = mask & (offs_k[:, None] < KX)
        xo = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask, other=0.0)
    else:
        mask = mask_m[:, None]
        if not EVEN_K:
            mask = mask & (offs_k[None, :] < KX)
        xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    return xo


@triton.jit
def _mma(xo, w, acc, SWAP: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + x @ w, or with SWAP acc + w @ x^T (xo and w as :func:`_x_tile` and the word tiles are laid
    out): the weights are the dot's first operand."""
    if SWAP:
        out = _dot(w, xo, acc, DOT_F32)
    else:
        out = _dot(xo, w, acc, DOT_F32)
    return out


@triton.jit
def _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, k_start, HAS_BIAS: tl.constexpr,
               ATOMIC: tl.constexpr):
    """Add the bias (only the part of K starting at 0 does), round to y's dtype, store or atomically
    accumulate."""
    mask_n = offs_n < N
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(k_start == 0, b, 0.0)[None, :]
    out = acc.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, out, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, out, mask=mask)


# --------------------------------------------------------------------------- the kernel


@triton.jit
def _tile_pass(tile, t_start, t_end, x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym,
               BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               GROUP_M: tl.constexpr, MODE: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
               DOT_F32: tl.constexpr, PTX: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr,
               HALF_DQ: tl.constexpr, KT: tl.constexpr):
    """Output tile ``tile`` over K tiles [t_start, t_end): accumulate, then store (or atomically add)
    it; the bias goes with the pass that starts at K tile 0."""
    CPG: tl.constexpr = GROUP // 16  # chunks per group
    ROWS: tl.constexpr = 16 if MODE == MODE_GEMV else BLOCK_M  # accumulator rows
    # accumulator (A0, A1): (rows of x, BLOCK_N), or (BLOCK_N, BLOCK_M) when swapped
    A0: tl.constexpr = BLOCK_N if SWAP else ROWS
    A1: tl.constexpr = BLOCK_M if SWAP else BLOCK_N
    S0: tl.constexpr = BLOCK_N if SWAP else 1  # scale rows and columns (S0, S1)
    S1: tl.constexpr = 1 if SWAP else BLOCK_N
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    MAGIC: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0

    pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    r16 = tl.arange(0, 16)
    acc = tl.zeros((A0, A1), dtype=tl.float32)
    acc_z = tl.zeros((1, BLOCK_N), dtype=tl.float32)  # GEMV: sum(x) * szeros
    for t in range(t_start, t_end):
        k0 = t * KT
        main_a, main_b, hi = _tile_words(qw_ptr, t, BITS, K, offs_n, mask_n, N, SWAP)
        # per-group state, (re)set at each group's first chunk (defined here: static-if scoping)
        s = tl.zeros((S0, S1), dtype=tl.float32)
        z = tl.zeros((S0, S1), dtype=tl.float32)
        part = tl.zeros((A0, A1), dtype=tl.float32)
        sum_x = tl.zeros((BLOCK_M, 1), dtype=tl.float32)  # GEMV: sum of the group's x
        sum_xz = tl.zeros((A0, A1), dtype=tl.float32)  # SCALED: x @ ones (SWAP: ones @ x^T), on the tensor cores
        for c in tl.static_range(KT // 16):
            offs_k = k0 + c * 16 + r16
            q = _chunk_codes(main_a, main_b, hi, c, BITS)  # (unused by the scaled mode's PTX path: eliminated)
            if c % CPG == 0:  # first chunk of a group
                s = _group_row(s_ptr, k0 + c * 16, GROUP, offs_n, mask_n, N, SWAP)
                z = _group_row(z_ptr, k0 + c * 16, GROUP, offs_n, mask_n, N, SWAP)
                part = tl.zeros((A0, A1), dtype=tl.float32)
                sum_x = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
                sum_xz = tl.zeros((A0, A1), dtype=tl.float32)
            if MODE == MODE_GEMV:
                if EVEN_K:
                    xv = tl.load(x_ptr + pid_m * stride_xm + offs_k)  # pid_m < M
                else:
                    xv = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=offs_k < KX, other=0.0)
                xv = xv.to(tl.float32)
                part += _exact_float(q) * xv[:, None]
                sum_x += tl.sum(xv, axis=0)
            else:
                xo = _x_tile(x_ptr, offs_m, offs_k, mask_m, stride_xm, KX, EVEN_K, SWAP)
                if MODE == MODE_DOT:
                    if HALF_DQ:  # the scaled mode's operand MAGIC + q, minus MAGIC (exact), then q s + z in DTYPE
                        w = _half_dequant(_chunk_operand(main_a, main_b, hi, c, BITS, DTYPE, PTX), s, z, MAGIC, DTYPE,
                                          DOT_F32)
                    else:
                        w = (_exact_float(q) * s + z).to(DTYPE, fp_downcast_rounding="rtne")
                    acc = _mma(xo, w, acc, SWAP, DOT_F32)
                else:
                    part = _mma(xo, _chunk_operand(main_a, main_b, hi, c, BITS, DTYPE, PTX), part, SWAP, DOT_F32)
                    sum_xz = _mma(xo, tl.full(main_a.shape, 1.0, DTYPE), sum_xz, SWAP, DOT_F32)
            if (c + 1) % CPG == 0:  # last chunk of a group: apply its scale
                if MODE == MODE_SCALED:
                    acc += part * s + sum_xz * (z - MAGIC * s)
                if MODE == MODE_GEMV:
                    acc += part * s
                    acc_z += sum_x * z
    if MODE == MODE_GEMV:
        out = tl.sum(acc, axis=0)[None, :] + acc_z
    elif SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    _store_out(out, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, t_start, HAS_BIAS, ATOMIC)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])  # one binary for every M of a config
def dashq_linear_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym, SPLIT_K,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        GROUP_M: tl.constexpr, MODE: tl.constexpr, ATOMIC: tl.constexpr,
                        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PTX: tl.constexpr,
                        EVEN_K: tl.constexpr, SWAP: tl.constexpr, HALF_DQ: tl.constexpr, KT: tl.constexpr,
                        STREAM_K: tl.constexpr):
    """y[M, N] (+)= x[M, :KX] @ W[:K, N]; grid = (tiles of y, SPLIT_K); KT = layout.k_tile(BITS) divides K.
    ATOMIC (SPLIT_K > 1 or STREAM_K): partial sums are atomically added into the zero-filled y.
    PTX: the scaled mode unpacks with inline PTX (:func:`_chunk_operand`).
    EVEN_K (KX == K, no padded tail): x is loaded without a k mask (fewer instructions per chunk).
    SWAP (MODE_DOT / MODE_SCALED): y^T = W^T x^T, the weight tile is the dot's first operand
    (BLOCK_N, 16), the activations the second (16, BLOCK_M), so on Hopper the unpacked weights feed
    wgmma from registers and only x goes through shared memory (KERNELS.md "Mid M").
    STREAM_K: SPLIT_K programs share the (output tile, K tile) iterations evenly, each a contiguous
    range, flushed (atomically) at every output tile it leaves: no tail wave whatever the grid
    (grid = (SPLIT_K,); KERNELS.md v11). Otherwise grid = (tiles, SPLIT_K), one K range per program.
    HALF_DQ (MODE_DOT): dequantize in packed half precision (x's dtype) from the scaled mode's (PTX)
    operand instead of float32 FMAs (sm_90: 22-40% fewer loop instructions; KERNELS.md v9, v11)."""
    k_tiles = K // KT
    if STREAM_K:
        total = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) * k_tiles
        it0 = (tl.program_id(0).to(tl.int64) * total // SPLIT_K).to(tl.int32)
        it1 = ((tl.program_id(0).to(tl.int64) + 1) * total // SPLIT_K).to(tl.int32)
        for tile in range(it0 // k_tiles, tl.cdiv(it1, k_tiles)):
            first = tile * k_tiles
            _tile_pass(tile, tl.maximum(it0, first) - first, tl.minimum(it1, first + k_tiles) - first,
                       x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym,
                       BITS, GROUP, BLOCK_M, BLOCK_N, GROUP_M, MODE, ATOMIC, HAS_BIAS, DOT_F32, PTX, EVEN_K, SWAP,
                       HALF_DQ, KT)
    else:
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        pid_k = tl.program_id(1)
        _tile_pass(tl.program_id(0), per_split * pid_k, tl.minimum(per_split * (pid_k + 1), k_tiles),
                   x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym,
                   BITS, GROUP, BLOCK_M, BLOCK_N, GROUP_M, MODE, ATOMIC, HAS_BIAS, DOT_F32, PTX, EVEN_K, SWAP,
                   HALF_DQ, KT)


# --------------------------------------------------------------------------- the half-pair GEMV ("hgemv")
#
# Decode on the CUDA cores in packed fp16 (fp16 x). A word of the 2/4-bit plane holds slots j and j + P/2 (P codes
# per word) in its two 16-bit halves, so one shift and one LOP3, ``(word << d or >> -d) & MASK2 | ONE2``, turn a
# pair of codes into a pair of exact halves v = 1 + q / 2^b (the code in the top b bits of the mantissa) for
# k = 16 j + r and 16 j + KT/2 + r of word row r. One HFMA2 dequantizes the pair to w = q s + z = v S + (z - S)
# (S = 2^b s exact; z - S rounded once per group and column; w rounded once), one more multiplies it into a packed
# fp16 accumulator with the matching pair of x. At 3 bits slot j
# of the tile's two 2-bit blocks pair up (k = 16 j + r and 256 + 16 j + r; their low halves are joined first),
# and the 1-bit plane, whose slots j and j + 16 are the same two k, is rotated so they land at bit 9 of each
# half. The fp16 accumulator is flushed into float32 once per super tile (TT K tiles), and the float32
# (16, BLOCK_N) accumulator is reduced over its rows at the end.

_ONE2: tl.constexpr = tl.constexpr(0x3C003C00)  # fp16 1.0 in both halves


@triton.jit
def _h2_pack(lo, hi):
    """Two fp16 tensors -> int32 tensor of packed pairs (lo in bits 0-15, hi in 16-31)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _h2_half(v, HI: tl.constexpr):
    """One half of packed fp16 pairs, as float32."""
    bits = (v >> 16) if HI else v
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _h2_fma(a, b, c, PTX: tl.constexpr):
    """Packed fp16 a * b + c with one rounding (fma.rn.f16x2); without PTX emulated in float64 (the product of
    two halves is exact, and so is the sum unless the two differ by more than 2^31 in magnitude), then rounded
    to fp16."""
    if PTX:
        out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        lo = (_h2_half(a, False).to(tl.float64) * _h2_half(b, False) + _h2_half(c, False)).to(tl.float16)
        hi = (_h2_half(a, True).to(tl.float64) * _h2_half(b, True) + _h2_half(c, True)).to(tl.float16)
        out = _h2_pack(lo, hi)
    return out


@triton.jit
def _h2_pair_w(src, h, SRC_BIT: tl.constexpr, J: tl.constexpr, s2, zs2, BITS: tl.constexpr, PTX: tl.constexpr):
    """w = v S + (z - S) = q s + z for the pair of codes at bit SRC_BIT of both halves of src (at 3 bits their low
    two bits, the high bit being bit J of both halves of the 1-bit plane word h), all packed fp16 (int32 tensors)."""
    W: tl.constexpr = 2 if BITS == 3 else BITS  # code bits in src
    TO: tl.constexpr = 10 - BITS  # the code's lowest bit in each half of v = 1 + q / 2^BITS
    D: tl.constexpr = TO - SRC_BIT  # shift left by D (right by -D)
    M2: tl.constexpr = ((1 << W) - 1) * 65537 << TO
    ROT: tl.constexpr = (J - 9) % 32  # 3 bits: rotate right so that bit J (and J + 16) lands at bit 9 (25)
    if PTX:
        SHIFT: tl.constexpr = "shl.b32" if D > 0 else "shr.b32"
        DA: tl.constexpr = D if D > 0 else -D
        if BITS == 3:
            asm: tl.constexpr = ("{ .reg .b32 t, u; shf.r.wrap.b32 u, $2, $2, $4; lop3.b32 u, u, $6, $7, 0xea; "
                                 + SHIFT + " t, $1, $3; lop3.b32 t, t, $5, u, 0xea; fma.rn.f16x2 $0, t, $8, $9; }")
            out = tl.inline_asm_elementwise(
                asm, "=r,r,r,r,r,r,r,r,r,r",
                [src, h, tl.full(src.shape, DA, tl.int32), tl.full(src.shape, ROT, tl.int32),
                 tl.full(src.shape, M2, tl.int32), tl.full(src.shape, 0x02000200, tl.int32),
                 tl.full(src.shape, _ONE2, tl.int32), s2, zs2], dtype=tl.int32, is_pure=True, pack=1)
        else:
            asm: tl.constexpr = ("{ .reg .b32 t; " + SHIFT + " t, $1, $2; lop3.b32 t, t, $3, $4, 0xea; "
                                 "fma.rn.f16x2 $0, t, $5, $6; }")
            out = tl.inline_asm_elementwise(
                asm, "=r,r,r,r,r,r,r",
                [src, tl.full(src.shape, DA, tl.int32), tl.full(src.shape, M2, tl.int32),
                 tl.full(src.shape, _ONE2, tl.int32), s2, zs2], dtype=tl.int32, is_pure=True, pack=1)
    else:
        if D > 0:
            v = src << D
        else:
            v = src >> -D  # arithmetic: the sign copies stay above the masked bits (-D <= 7)
        v = (v & M2) | _ONE2
        if BITS == 3:
            if ROT == 0:
                rr = h
            else:  # rotate right by ROT (a logical shift right, then the wrapped low bits)
                rr = ((h >> ROT) & ((1 << (32 - ROT)) - 1)) | (h << (32 - ROT))
            v = v | (rr & 0x02000200)
        out = _h2_fma(v, s2, zs2, PTX)
    return out


@triton.jit
def _hg_load(ptr, mask, MASKED: tl.constexpr):
    """Words or group rows at ptr; masked (other 0) unless every lane is in range."""
    if MASKED:
        out = tl.load(ptr, mask=mask, other=0)
    else:
        out = tl.load(ptr)
    return out


@triton.jit
def _hg_words(qw_ptr, t, K, N, offs_n, mask_w, r16, BITS: tl.constexpr, R2: tl.constexpr, R1: tl.constexpr,
              RB: tl.constexpr, MASKED: tl.constexpr):
    """K tile t's words as (ab_lo, ab_hi, h): 2/4 bits the block's words three times; 3 bits the slots 0-7 and
    8-15 of both 2-bit blocks joined (block a's in the low halves) and the 1-bit block's words."""
    if BITS == 3:
        a = _hg_load(qw_ptr + (2 * t * R2 + r16) * N + offs_n[None, :], mask_w, MASKED)
        b = _hg_load(qw_ptr + ((2 * t + 1) * R2 + r16) * N + offs_n[None, :], mask_w, MASKED)
        h = _hg_load(qw_ptr + (K // 16) * N + (t * R1 + r16) * N + offs_n[None, :], mask_w, MASKED)
        ab_lo = (a & 0xFFFF) | (b << 16)  # slots 0-7 of both blocks, block a's low
        ab_hi = ((a >> 16) & 0xFFFF) | (b & -65536)  # slots 8-15
    else:
        ab_lo = _hg_load(qw_ptr + (t * RB + r16) * N + offs_n[None, :], mask_w, MASKED)
        ab_hi = ab_lo
        h = ab_lo
    return ab_lo, ab_hi, h


@triton.jit
def _h2_transpose(lo, hi, PTX: tl.constexpr):
    """Packed pairs lo = (a0, a1), hi = (b0, b1) -> (a0, b0) and (a1, b1): one PRMT each."""
    if PTX:
        even = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
        odd = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        even = (lo & 0xFFFF) | (hi << 16)
        odd = ((lo >> 16) & 0xFFFF) | (hi & -65536)
    return even, odd


@triton.jit
def _hg_group_pairs(s_ptr, z_ptr, g_lo, g_hi, N, n0, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
                    SAME: tl.constexpr, PTX: tl.constexpr):
    """(S, z - S) of the groups g_lo (low halves) and g_hi (high; SAME: g_hi is g_lo) packed per column, (BLOCK_N,)
    int32 each, for the columns n0 + [0, BLOCK_N) (all in range, N even): each group row is read as packed column
    pairs, scaled (S = 2^BITS s, exact) and subtracted (z - S, one rounding) two columns at a time in packed fp16,
    then transposed into (low group, high group) pairs."""
    c2 = n0 // 2 + tl.arange(0, BLOCK_N // 2)
    sp = s_ptr.to(tl.pointer_type(tl.int32))
    zp = z_ptr.to(tl.pointer_type(tl.int32))
    scale2 = tl.full((BLOCK_N // 2,), ((15 + BITS) << 10) * 65537, tl.int32)  # fp16 2^BITS in both halves
    neg1 = tl.full((BLOCK_N // 2,), -1140802560, tl.int32)  # 0xBC00BC00: fp16 -1.0 in both halves
    zero = tl.zeros((BLOCK_N // 2,), tl.int32)
    s_lo = _h2_fma(tl.load(sp + g_lo * (N // 2) + c2), scale2, zero, PTX)
    zs_lo = _h2_fma(s_lo, neg1, tl.load(zp + g_lo * (N // 2) + c2), PTX)
    if SAME:
        s_hi = s_lo
        zs_hi = zs_lo
    else:
        s_hi = _h2_fma(tl.load(sp + g_hi * (N // 2) + c2), scale2, zero, PTX)
        zs_hi = _h2_fma(s_hi, neg1, tl.load(zp + g_hi * (N // 2) + c2), PTX)
    s_e, s_o = _h2_transpose(s_lo, s_hi, PTX)
    z_e, z_o = _h2_transpose(zs_lo, zs_hi, PTX)
    return tl.join(s_e, s_o).reshape(BLOCK_N), tl.join(z_e, z_o).reshape(BLOCK_N)


@triton.jit
def _hg_groups(s_ptr, z_ptr, k_lo, HALF: tl.constexpr, N, n0, offs_n, mask_n, GROUP: tl.constexpr, KT: tl.constexpr,
               BLOCK_N: tl.constexpr, BITS: tl.constexpr, EVEN_N: tl.constexpr, PTX: tl.constexpr):
    """(S, z - S) of the groups of k_lo (low halves) and k_lo + HALF (high) for the columns offs_n = n0 + [0,
    BLOCK_N), packed fp16 pairs (1, BLOCK_N): EVEN_N from packed column pairs (_hg_group_pairs), else converted."""
    if EVEN_N:
        s2, zs2 = _hg_group_pairs(s_ptr, z_ptr, k_lo // GROUP, (k_lo + HALF) // GROUP, N, n0, BLOCK_N, BITS,
                                  GROUP >= KT, PTX)
    else:
        SCALE: tl.constexpr = 1 << BITS
        g_lo = k_lo // GROUP
        s_lo = _hg_load(s_ptr + g_lo * N + offs_n, mask_n, True).to(tl.float16) * SCALE
        z_lo = _hg_load(z_ptr + g_lo * N + offs_n, mask_n, True).to(tl.float16)
        if GROUP >= KT:  # both halves in one group (4 bits, g128)
            s_hi = s_lo
            z_hi = z_lo
        else:
            g_hi = (k_lo + HALF) // GROUP
            s_hi = _hg_load(s_ptr + g_hi * N + offs_n, mask_n, True).to(tl.float16) * SCALE
            z_hi = _hg_load(z_ptr + g_hi * N + offs_n, mask_n, True).to(tl.float16)
        s2 = _h2_pack(s_lo, s_hi)  # S = 2^BITS s, exact
        zs2 = _h2_pack(z_lo - s_lo, z_hi - s_hi)  # z - S, one rounding
    return s2[None, :], zs2[None, :]


@triton.jit
def _h2_flush(acc, accf):
    """accf + both halves of the packed fp16 accumulator, in float32."""
    return accf + _h2_half(acc, False) + _h2_half(acc, True)


@triton.jit
def _hg_x2(xrow, offs_lo, HALF: tl.constexpr, KX, EVEN_K: tl.constexpr):
    """x at k = offs_lo (low halves) and offs_lo + HALF (high) of one row, packed fp16 pairs (16, 1) (past KX: 0)."""
    if EVEN_K:
        x_lo = tl.load(xrow + offs_lo)
        x_hi = tl.load(xrow + offs_lo + HALF)
    else:
        x_lo = tl.load(xrow + offs_lo, mask=offs_lo < KX, other=0.0)
        x_hi = tl.load(xrow + offs_lo + HALF, mask=offs_lo + HALF < KX, other=0.0)
    return _h2_pack(x_lo, x_hi)


@triton.jit
def _hg_store(accf, y_ptr, b_ptr, row, offs_n, M, N, stride_ym, split, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """One row's float32 (16, BLOCK_N) accumulator reduced over its rows and stored (rows past M: not)."""
    _store_out(tl.sum(accf, axis=0)[None, :], y_ptr, b_ptr, tl.zeros((1,), tl.int32) + row, offs_n, M, N, stride_ym,
               split, HAS_BIAS, ATOMIC)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def dashq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym, SPLIT_K,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, TT: tl.constexpr,
                      ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, PTX: tl.constexpr, EVEN_K: tl.constexpr,
                      KT: tl.constexpr, PREFETCH: tl.constexpr, EVEN_N: tl.constexpr, ROWS: tl.constexpr,
                      COLS: tl.constexpr):
    """y[M, N] (+)= x[M, :KX] @ W[:K, N], fp16 x, on the CUDA cores in packed fp16 (see the section comment).
    PREFETCH: each K tile's words are loaded one tile ahead (in registers), so a program keeps a load in flight
    while it computes.
    grid = (cdiv(M, ROWS) * cdiv(N, COLS * BLOCK_N), SPLIT_K): ROWS rows of x (1, 2 or 4; each weight pair is
    dequantized once and multiplied into every row's accumulator) and COLS * BLOCK_N outputs per program (row
    blocks of one tile adjacent, so they share its words in L2; COLS = 2 with ROWS = 1 only: two adjacent column
    blocks, each pair of x multiplied into both, so a thread loads each x pair for twice as many weights), SPLIT_K
    balanced ranges of super tiles of TT K tiles (TT divides K / KT); ATOMIC: partial sums are atomically added
    into the zero-filled y. 2/3/4 bits; PTX: inline PTX (CUDA), else emulated in float32/float64. EVEN_N: COLS *
    BLOCK_N divides N and the group rows are fp16 (launch() sets it only then, hgemv_even_n), so the word and
    group loads need no mask (the prefetch's still do: it masks the tile past a program's range) and the group
    rows are read as packed column pairs (_hg_group_pairs)."""
    tl.static_assert(COLS == 1 or (COLS == 2 and ROWS == 1), "two column blocks per program only with one row")
    NP: tl.constexpr = KT // 32  # pairs per word row and K tile: slots j and j + NP (3 bits: of both 2-bit blocks)
    HALF: tl.constexpr = KT // 2  # k between the two halves of a pair
    CPG: tl.constexpr = GROUP // 16  # slots per group
    R2: tl.constexpr = _plane_rows(BITS, 2)  # 3 bits: word rows of a 2-bit block (constexprs outside the loops:
    R1: tl.constexpr = _plane_rows(BITS, 1)  # a static_range body may not redefine one) and of a 1-bit block
    RB: tl.constexpr = _plane_rows(BITS, BITS)  # 2/4 bits: word rows of a block
    row_blocks = tl.cdiv(M, ROWS)
    row0 = (tl.program_id(0) % row_blocks) * ROWS
    n0 = (tl.program_id(0) // row_blocks) * (BLOCK_N * COLS)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if COLS == 2:  # the second column block
        offs_nb = offs_n + BLOCK_N
        mask_nb = offs_nb < N
    r16 = tl.arange(0, 16)[:, None]
    x0 = x_ptr + row0.to(tl.int64) * stride_xm
    if ROWS >= 2:  # rows past M read row M - 1 (no mask) and are not stored
        x1 = x_ptr + tl.minimum(row0 + 1, M - 1).to(tl.int64) * stride_xm
    if ROWS >= 4:
        x2p = x_ptr + tl.minimum(row0 + 2, M - 1).to(tl.int64) * stride_xm
        x3 = x_ptr + tl.minimum(row0 + 3, M - 1).to(tl.int64) * stride_xm
    supers = K // (KT * TT)  # the host makes TT divide K's tiles
    split = tl.program_id(1)
    st0 = supers * split // SPLIT_K  # balanced ranges: their lengths differ by at most one super tile
    st1 = supers * (split + 1) // SPLIT_K
    accf0 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    if COLS == 2:
        accf0b = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    if ROWS >= 2:
        accf1 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    if ROWS >= 4:
        accf2 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        accf3 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    mask_w = mask_n[None, :]
    if COLS == 2:
        mask_wb = mask_nb[None, :]
    t_end = st1 * TT
    if PREFETCH:  # K tile t + 1's words are loaded before tile t is computed
        n_lo, n_hi, n_h = _hg_words(qw_ptr, st0 * TT, K, N, offs_n, tl.where(st0 < st1, mask_w, False), r16, BITS,
                                    R2, R1, RB, True)
        if COLS == 2:
            nb_lo, nb_hi, nb_h = _hg_words(qw_ptr, st0 * TT, K, N, offs_nb, tl.where(st0 < st1, mask_wb, False), r16,
                                           BITS, R2, R1, RB, True)
    for st in range(st0, st1):
        acc0 = tl.zeros((16, BLOCK_N), dtype=tl.int32)  # packed fp16 pairs (+0.0, +0.0), one per row
        if COLS == 2:
            acc0b = tl.zeros((16, BLOCK_N), dtype=tl.int32)
        if ROWS >= 2:
            acc1 = tl.zeros((16, BLOCK_N), dtype=tl.int32)
        if ROWS >= 4:
            acc2 = tl.zeros((16, BLOCK_N), dtype=tl.int32)
            acc3 = tl.zeros((16, BLOCK_N), dtype=tl.int32)
        for tt in tl.static_range(TT):
            t = st * TT + tt
            if PREFETCH:
                ab_lo, ab_hi, h = n_lo, n_hi, n_h
                live = tl.where(t + 1 < t_end, mask_w, False)  # nothing past the program's range
                n_lo, n_hi, n_h = _hg_words(qw_ptr, t + 1, K, N, offs_n, live, r16, BITS, R2, R1, RB, True)
                if COLS == 2:
                    bb_lo, bb_hi, hb = nb_lo, nb_hi, nb_h
                    nb_lo, nb_hi, nb_h = _hg_words(qw_ptr, t + 1, K, N, offs_nb, tl.where(t + 1 < t_end, mask_wb,
                                                   False), r16, BITS, R2, R1, RB, True)
            else:
                ab_lo, ab_hi, h = _hg_words(qw_ptr, t, K, N, offs_n, mask_w, r16, BITS, R2, R1, RB, not EVEN_N)
                if COLS == 2:
                    bb_lo, bb_hi, hb = _hg_words(qw_ptr, t, K, N, offs_nb, mask_wb, r16, BITS, R2, R1, RB,
                                                 not EVEN_N)
            k0 = t * KT
            for j in tl.static_range(NP):
                if j % CPG == 0:  # a new pair of groups: slot j's (low halves) and slot j + NP's (high)
                    s2, zs2 = _hg_groups(s_ptr, z_ptr, k0 + 16 * j, HALF, N, n0, offs_n, mask_n, GROUP, KT, BLOCK_N,
                                         BITS, EVEN_N, PTX)
                    if COLS == 2:
                        s2b, zs2b = _hg_groups(s_ptr, z_ptr, k0 + 16 * j, HALF, N, n0 + BLOCK_N, offs_nb, mask_nb,
                                               GROUP, KT, BLOCK_N, BITS, EVEN_N, PTX)
                offs_lo = k0 + 16 * j + r16
                xa = _hg_x2(x0, offs_lo, HALF, KX, EVEN_K)
                if ROWS >= 2:
                    xb = _hg_x2(x1, offs_lo, HALF, KX, EVEN_K)
                if ROWS >= 4:
                    xc = _hg_x2(x2p, offs_lo, HALF, KX, EVEN_K)
                    xd = _hg_x2(x3, offs_lo, HALF, KX, EVEN_K)
                if BITS == 3:
                    w = _h2_pair_w(ab_lo if j < 8 else ab_hi, h, 2 * (j % 8), j, s2, zs2, BITS, PTX)
                    if COLS == 2:
                        wb = _h2_pair_w(bb_lo if j < 8 else bb_hi, hb, 2 * (j % 8), j, s2b, zs2b, BITS, PTX)
                else:
                    w = _h2_pair_w(ab_lo, h, BITS * j, j, s2, zs2, BITS, PTX)
                    if COLS == 2:
                        wb = _h2_pair_w(bb_lo, hb, BITS * j, j, s2b, zs2b, BITS, PTX)
                acc0 = _h2_fma(w, xa, acc0, PTX)
                if COLS == 2:
                    acc0b = _h2_fma(wb, xa, acc0b, PTX)
                if ROWS >= 2:
                    acc1 = _h2_fma(w, xb, acc1, PTX)
                if ROWS >= 4:
                    acc2 = _h2_fma(w, xc, acc2, PTX)
                    acc3 = _h2_fma(w, xd, acc3, PTX)
        accf0 = _h2_flush(acc0, accf0)
        if COLS == 2:
            accf0b = _h2_flush(acc0b, accf0b)
        if ROWS >= 2:
            accf1 = _h2_flush(acc1, accf1)
        if ROWS >= 4:
            accf2 = _h2_flush(acc2, accf2)
            accf3 = _h2_flush(acc3, accf3)
    # the bias: split 0 only, even where its range is empty
    _hg_store(accf0, y_ptr, b_ptr, row0, offs_n, M, N, stride_ym, split, HAS_BIAS, ATOMIC)
    if COLS == 2:
        _hg_store(accf0b, y_ptr, b_ptr, row0, offs_nb, M, N, stride_ym, split, HAS_BIAS, ATOMIC)
    if ROWS >= 2:
        _hg_store(accf1, y_ptr, b_ptr, row0 + 1, offs_n, M, N, stride_ym, split, HAS_BIAS, ATOMIC)
    if ROWS >= 4:
        _hg_store(accf2, y_ptr, b_ptr, row0 + 2, offs_n, M, N, stride_ym, split, HAS_BIAS, ATOMIC)
        _hg_store(accf3, y_ptr, b_ptr, row0 + 3, offs_n, M, N, stride_ym, split, HAS_BIAS, ATOMIC)


@triton.jit
def _gather_codes(qw_ptr, k0, KB: tl.constexpr, BITS: tl.constexpr, K, offs_n, mask_n, N):
    """(KB, BLOCK_N) int32 codes of k = k0 + [0, KB) (KB divides 128, k0 a multiple of KB)."""
    WIDTH: tl.constexpr = 2 if BITS == 3 else BITS  # main plane
    q = _gather_plane(qw_ptr, k0, KB, WIDTH, _plane_rows(BITS, WIDTH), offs_n, mask_n, N)
    if BITS == 3:  # the 1-bit plane after the 2-bit plane's K / 16 rows
        q = q | (_gather_plane(qw_ptr + (K // 16) * N, k0, KB, 1, _plane_rows(BITS, 1), offs_n, mask_n, N) << 2)
    return q


@triton.jit
def _gather_plane(ptr, k0, KB: tl.constexpr, WIDTH: tl.constexpr, R: tl.constexpr, offs_n, mask_n, N):
    """(KB, BLOCK_N) codes of k = k0 + [0, KB) of a WIDTH-bit plane with R-row blocks of KBLK = 32 R /
    WIDTH k: code k is in word row R (k // KBLK) + k % R at slot (k % KBLK) // R."""
    KBLK: tl.constexpr = 32 * R // WIDTH
    kk = k0 % KBLK + tl.arange(0, KB)
    rows = (k0 // KBLK) * R + kk % R
    words = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    return (words >> ((kk // R) * WIDTH)[:, None]) & ((1 << WIDTH) - 1)


@triton.jit(do_not_specialize=["M"])
def dashq_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SCALED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
    """y[M, N] = x[M, :KX] @ W[:K, N] with one tl.dot per BLOCK_K (<= GROUP, divides 128) step.
    SCALED: the dot takes the raw codes as exact halves MAGIC + q and the step's group scale is
    applied to its (BLOCK_M, BLOCK_N) partial: acc += part * s + sum(x) * (szeros - MAGIC * s)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    MAGIC: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < KX), other=0.0)
        q = _gather_codes(qw_ptr, k0, BLOCK_K, BITS, K, offs_n, mask_n, N)
        s = _group_row(s_ptr, k0, GROUP, offs_n, mask_n, N, False)
        z = _group_row(z_ptr, k0, GROUP, offs_n, mask_n, N, False)
        if SCALED:
            part = _dot(x, _magic_operand(q, DTYPE), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_F32)
            sum_x = tl.sum(x.to(tl.float32), axis=1)[:, None]
            acc += part * s + sum_x * (z - MAGIC * s)
        else:
            w = (_exact_float(q) * s + z).to(DTYPE, fp_downcast_rounding="rtne")
            acc = _dot(x, w, acc, DOT_F32)
    _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, 0, HAS_BIAS, False)


@triton.jit
def dashq_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, NK: tl.constexpr, KT: tl.constexpr):
    """Dense W[K, N] = q * s + szeros in w's dtype (the large-M path feeds it to cuBLAS); NK: stored
    transposed, as W^T[N, K]. grid = (K / KT, N tiles), KT = layout.k_tile(BITS)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    main_a, main_b, hi = _tile_words(qw_ptr, t, BITS, K, offs_n, mask_n, N, False)
    for c in tl.static_range(KT // 16):
        q = _chunk_codes(main_a, main_b, hi, c, BITS)
        k = t * KT + c * 16
        s = _group_row(s_ptr, k, GROUP, offs_n, mask_n, N, False)
        z = _group_row(z_ptr, k, GROUP, offs_n, mask_n, N, False)
        w = (_exact_float(q) * s + z).to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        rows = k + tl.arange(0, 16)
        if NK:
            tl.store(w_ptr + offs_n[None, :] * K + rows[:, None], w, mask=mask_n[None, :])
        else:
            tl.store(w_ptr + rows[:, None] * N + offs_n[None, :], w, mask=mask_n[None, :])


# --------------------------------------------------------------------------- host side


def dequantize_dense(qweight, scales, szeros, bits: int, group_size: int, n: int, k: int, dtype, block_n=128,
                     nk: bool = False):
    """Dense (k, n) weight in ``dtype`` from the kernel layout (one Triton pass); nk: (n, k) instead."""
    w = torch.empty((n, k) if nk else (k, n), dtype=dtype, device=qweight.device)
    grid = (k // k_tile(bits), triton.cdiv(n, block_n))
    dashq_dequant_kernel[grid](qweight, scales, szeros, w, n, k, BITS=bits, GROUP=group_size, BLOCK_N=block_n,
                               NK=nk, KT=k_tile(bits), num_warps=4, **FP_FUSION)
    return w


def _dequant_matmul(x2, qweight, scales, szeros, bias, y, bits, group_size, n, k, cfg):
    """Large M: dequantize to a temporary dense weight, then cuBLAS (the one path that allocates
    besides the output: k * n * 2 bytes, through PyTorch's caching allocator, so graph-safe)."""
    kx = x2.shape[1]
    w = dequantize_dense(qweight, scales, szeros, bits, group_size, n, k, x2.dtype, cfg.block_n, cfg.nk)
    w = w[:, :kx].t() if cfg.nk else w[:kx]  # (kx, n) either way; nk: cuBLAS sees F.linear's layout
    if bias is None:
        torch.mm(x2, w, out=y)
    else:
        torch.addmm(bias.to(x2.dtype), x2, w, out=y)


_COMPILED: dict = {}  # launch key -> CompiledKernel (host fast path)


def _spec(v: int) -> int:
    """What Triton specialises an int argument on: == 1, divisible by 16, or neither."""
    return 1 if v == 1 else (16 if v % 16 == 0 else 0)


def launch_key(kernel, meta: dict, cfg: KernelConfig, args: tuple) -> tuple:
    """What a compiled binary is specific to: the kernel, every constexpr (HAS_BIAS above all: a
    bias-less call passes y as the bias pointer, so nothing else tells the two apart), the config,
    and, for each argument, its dtype and device (tensors; plus 16-byte alignment) or what Triton
    specialises an int on (== 1, divisible by 16). A cached binary must never serve a call it was
    not built for (before this key held the constexprs, a bias-less layer launched after a layer
    with a bias reused its binary and added garbage: KERNELS.md, v5)."""
    def spec(a):
        if isinstance(a, torch.Tensor):
            return (a.dtype, a.device, a.data_ptr() % 16 == 0)
        return _spec(a)

    return (kernel, tuple(meta.items()), cfg, tuple(spec(a) for a in args))


def _mode(cfg: KernelConfig) -> int:
    """dashq_linear_kernel's MODE of a config: its kind, or for "swap" (the swapped operands,
    SWAP) the scaled mode or, with ``scaled=False``, dequantize-then-dot."""
    if cfg.kind == "swap":
        return MODES["scaled" if cfg.scaled else "dot"]
    return MODES[cfg.kind]


def hgemv_even_n(n: int, cfg: KernelConfig, scales_dtype: torch.dtype, szeros_dtype: torch.dtype) -> bool:
    """The hgemv kernel's EVEN_N: its programs' columns (cols blocks of block_n) divide N, so no load is masked,
    and the group rows are fp16, so they can be read as packed column pairs (other dtypes are converted)."""
    return n % (cfg.block_n * cfg.cols) == 0 and scales_dtype == szeros_dtype == torch.float16


def launch(x2, qweight, scales, szeros, bias, y, bits: int, group_size: int, n: int, k: int,
           cfg: KernelConfig) -> None:
    """Launch on 2-D x2 (M, KX) into y (M, n): y must be zero-filled when cfg.atomic.

    The first launch of a (config, dtypes, specialisation) goes through Triton's JIT; later ones
    call the cached compiled kernel directly, which skips the JIT's argument binding and cache
    key (tens of us of host time per call)."""
    m, kx = x2.shape
    cfg = fit_config(cfg, k, group_size, bits, x2.dtype)
    if cfg.kind == "dequant":
        _dequant_matmul(x2, qweight, scales, szeros, bias, y, bits, group_size, n, k, cfg)
        return
    if cfg.stream_k:  # the programs share every (tile, K tile) iteration: SPLIT_K carries their count
        grid, splits = (cfg.stream_k, 1, 1), cfg.stream_k
    else:
        grid, splits = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k, 1), cfg.split_k
    b = bias if bias is not None else y
    if cfg.kind == "hgemv":
        kernel = dashq_gemv_kernel
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n * cfg.cols), cfg.split_k, 1)
        args = (x2, qweight, scales, szeros, b, y, m, n, k, kx, x2.stride(0), y.stride(0), cfg.split_k)
        meta = dict(BITS=bits, GROUP=group_size, BLOCK_N=cfg.block_n, TT=max(1, cfg.block_k // k_tile(bits)),
                    ATOMIC=cfg.atomic, HAS_BIAS=bias is not None,
                    PTX=_PTX_PLATFORM and not _INTERPRET and x2.is_cuda, EVEN_K=kx == k, KT=k_tile(bits),
                    PREFETCH=cfg.num_stages == 2, ROWS=cfg.block_m, COLS=cfg.cols,
                    EVEN_N=hgemv_even_n(n, cfg, scales.dtype, szeros.dtype))
    elif cfg.kind == "wide":
        kernel = dashq_gemm_kernel
        args = (x2, qweight, scales, szeros, b, y, m, n, k, kx, x2.stride(0), y.stride(0))
        meta = dict(BITS=bits, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    GROUP_M=cfg.group_m, SCALED=cfg.scaled, HAS_BIAS=bias is not None, DOT_F32=_INTERPRET)
    else:
        kernel = dashq_linear_kernel
        args = (x2, qweight, scales, szeros, b, y, m, n, k, kx, x2.stride(0), y.stride(0), splits)
        meta = dict(BITS=bits, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                    MODE=_mode(cfg), ATOMIC=cfg.atomic, HAS_BIAS=bias is not None, DOT_F32=_INTERPRET,
                    PTX=PTX_UNPACK and _PTX_PLATFORM and not _INTERPRET and x2.is_cuda,
                    EVEN_K=kx == k, SWAP=cfg.kind == "swap", HALF_DQ=cfg.half_dq,
                    KT=k_tile(bits), STREAM_K=cfg.stream_k > 0)
    key = launch_key(kernel, meta, cfg, args)
    compiled = None if _INTERPRET else _COMPILED.get(key)
    if compiled is not None:
        compiled[grid](*args, *meta.values())
        return
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION)
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    compiled = kernel[grid](*args, **meta, **opts)
    if not _INTERPRET and compiled is not None and hasattr(compiled, "__getitem__"):
        _COMPILED[key] = compiled


def triton_linear(x, qweight, scales, szeros, bits: int, group_size: int, n: int, k: int, bias=None,
                  cfg: KernelConfig | None = None):
    """The op's CUDA implementation (also runs on CPU tensors under TRITON_INTERPRET=1).
    Activations other than fp16/bf16 take the reference path."""
    lead, kx = x.shape[:-1], x.shape[-1]
    if kx > k:
        raise ValueError(f"input has {kx} features, more than the weight's K={k}")
    if x.dtype not in (torch.float16, torch.bfloat16):  # the kernels take half-precision activations
        from .reference import reference_linear

        return reference_linear(x, qweight, scales, szeros, bits, group_size, n, k, bias)
    x2 = x.reshape(-1, kx)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if cfg is None:
        cfg = pick_config(m, n, k, bits, group_size, x.device, x.dtype)
    y = (torch.zeros if cfg.atomic else torch.empty)((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        launch(x2, qweight, scales, szeros, bias, y, bits, group_size, n, k, cfg)
    return y.reshape(*lead, n)
