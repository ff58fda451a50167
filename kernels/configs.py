"""Kernel launch configs: a per-GPU tuned table (optional) over shape heuristics.

A config depends only on static facts (M bucket, n, k, bits, group, GPU), never on tensor
values, so choosing one makes no host sync and is safe inside CUDA-graph capture.

Tuned tables are JSON files ``{"<bits>/<group>/<m_bucket>/<n>/<k>": {KernelConfig fields}}``,
looked up in ``$DASHQ_KERNEL_CONFIGS`` (a file) or ``kernels/tuned/<gpu name>.json``;
``benchmarks/bench_kernels.py --sections sweep`` writes one (``benchmarks/gpu_kernels.sh sweep``). Shapes not
in the table use :func:`heuristic_config`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .layout import k_tile

DECODE_MAX_M = 16
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TUNED_DIR = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int = 0  # register cap per thread (0: the compiler's choice); trades spills for occupancy
    kind: str = "dot"  # "dot": dequantize then tl.dot; "scaled": dot on raw codes, scale per group;
    # "gemv": CUDA-core FMAs, one x row per program (for M = 1); the K tile is k_tile(bits);
    # "hgemv": CUDA-core packed fp16 FMAs on pairs of codes, block_m (1, 2 or 4) x rows per program (fp16 x, 2/3/4
    # bits; M <= 4), flushed to float32 every block_k k (a multiple of k_tile(bits); 0: every K tile); num_stages 2:
    # each K tile's words are loaded one tile ahead (a register double buffer; other values: not);
    # "wide": one tl.dot per block_k-step on a gathered code tile (mid M);
    # "dequant": dense dequantization to a temporary, then cuBLAS (large M)
    # "swap": y^T = W^T x^T, the unpacked weight tile as the dot's first operand (wgmma's register A on
    # Hopper), raw codes scaled per group (or, with scaled=False, dequantized before the dot)
    block_k: int = 0  # "wide": k per step (0: min(64, group)); divides 128, at most the group size; "hgemv": above
    scaled: bool = True  # "wide", "swap": scale after the dot (raw codes as exact halves) or dequantize before
    half_dq: bool = False  # "dot", "swap" with scaled=False: dequantize as q * s + z in x's dtype (packed
    # HFMA2) from the PTX-unpacked codes instead of float32 FMAs (not 8 bits with bf16 x)
    stream_k: int = 0  # "dot"/"scaled"/"gemv"/"swap": this many programs share the (output tile, K tile)
    # iterations evenly, flushing atomically (no tail wave; split_k is then unused); 0: one K range per program.
    # A sweep candidate and check variant; no table entry or heuristic uses it yet (KERNELS.md v11)
    nk: bool = False  # "dequant": write the dense weight as (N, K), F.linear's layout, instead of (K, N) (cuBLAS
    # is 1.5-1.6x faster that way on gate_up shapes at M = 128 on an H200; results/cublas_layout_h200.json)
    cols: int = 1  # "hgemv" with block_m 1: adjacent column blocks of block_n per program (1 or 2; with 2 each x
    # pair is multiplied into both, halving x loads per weight; KERNELS.md v14)

    @property
    def atomic(self) -> bool:
        """Partial sums are atomically added into a zero-filled output (split-K or stream-K)."""
        return self.split_k > 1 or self.stream_k > 0


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the largest bucket for anything bigger)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def config_key(bits: int, group: int, m: int, n: int, k: int) -> str:
    return f"{bits}/{group}/{m_bucket(m)}/{n}/{k}"


@functools.lru_cache(maxsize=None)
def _device_facts(device_index: int) -> tuple[str, int]:
    """(name for the tuned table, SM count) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    return props.name.replace(" ", "_"), props.multi_processor_count


def _split_k(n_tiles: int, k: int, tile: int, sms: int, min_k: int) -> int:
    """Split K until the grid has ~4 programs per SM, keeping >= min_k of K (whole K tiles of
    ``tile``) per program."""
    split = 1
    while n_tiles * split < 4 * sms and (k // tile) // (split * 2) * tile >= min_k:
        split *= 2
    return split


SCALED_MIN_K = 256  # k per tensor-core decode program at 4/8 bits
# k per 2/3-bit decode program (H200 sweeps, KERNELS.md v6-v8: 256-448 cost 1.5-2.1x for the GEMV at
# 2 bits; with 64-wide scaled tiles it is the best measured split or within 10% of it at M = 1-16)
LOW_BIT_MIN_K = 512
# K tiles per 2/3-bit decode program of the fp16-dequantizing "dot" kind (v11 H200 sweep, KERNELS.md v11: the
# measured-best split or within 12% of it on every 8B/70B layer at M = 1, 2% on average)
HALF_DQ_MIN_TILES = 4
# the packed-fp16 GEMV ("hgemv", fp16 x, M = 1; KERNELS.md v12, v13) on layers at least this wide, 64-wide tiles
# of 4 warps, HGEMV_TILES[bits] K tiles per flush (512 k at 2/4 bits, 2048 at 3), the words prefetched one K tile
# ahead at HGEMV_PREFETCH widths, split-K to ~4 programs per SM: faster than the tensor-core kinds on 8B gate_up
# and the 70B layers (H100); narrower layers (N <= 6144) need more split-K and lose; only at the swept group size
# of each width (HGEMV_GROUP). v13 H100 sweep: within 3.5% / 4.6% / 6.3% (geometric mean; at most 7 / 11 / 15%)
# of the best swept hgemv config at 4 / 3 / 2 bits on the eight 8B/70B layers (4.0 / 4.3 / 6.9% on the five of
# them with N >= HGEMV_MIN_N; v12's 2 / 1 / 4 tiles, no prefetch: up to 14 / 24 / 43% slower)
HGEMV_MIN_N = 8192
HGEMV_ROWS = (1, 2, 4)  # rows of x an "hgemv" program may take (block_m; v13: each weight pair dequantized once)
HGEMV_TILES = {2: 2, 3: 4, 4: 4}
HGEMV_PREFETCH = (3,)
HGEMV_GROUP = {2: 64, 3: 128, 4: 128}


# mid M (v9/v10 sweeps on an H200, KERNELS.md v9, v10): the swapped kind up to this M (then dequantize +
# cuBLAS), at 3/4 bits one M bucket further on layers of at least SWAP_LARGE_NK weights (8B gate_up/down,
# 70B); 32/64/128-token tiles (64 at 3 bits) of 128 weight rows, 8 warps, split-K as at decode,
# dequantized in x's dtype (half_dq) from 64 tokens
SWAP_BITS = (2, 3, 4)
SWAP_MAX_M = {2: 128, 3: 64, 4: 128}
SWAP_LARGE_NK = 50_000_000
SWAP_MAX_M_LARGE = {2: 128, 3: 128, 4: 256}


SWAP_X_SMEM = 160 * 1024  # bytes of x^T tiles a "swap" pipeline may buffer (an H100/H200 SM has 228 KB)


def swap_stages(bits: int, block_m: int) -> int:
    """Pipeline stages of a "swap" config: 3, or 2 at 3 bits and from 128-token tiles (registers,
    KERNELS.md v9), fewer while the stages' x^T tiles (k_tile(bits) x block_m halves each) would not
    fit SWAP_X_SMEM: 3 bits' 512-k tile from 128 tokens and 2 bits' 256-k tile at 256 tokens get one (a
    single stage buffers no x^T tile: 8 KB of shared memory on sm_90, KERNELS.md v10)."""
    stages = 2 if bits == 3 or block_m >= 128 else 3
    while stages > 1 and stages * k_tile(bits) * block_m * 2 > SWAP_X_SMEM:
        stages -= 1
    return stages


def hgemv_enabled() -> bool:
    """DASHQ_HGEMV=0 keeps the packed-fp16 GEMV out of every pick (heuristic and tables): an escape hatch while a
    GPU has not checked its latest form (KERNELS.md v13). Read when a shape is first picked (picks are memoised)."""
    return os.environ.get("DASHQ_HGEMV", "1") != "0"


def hgemv_tiles(k: int, bits: int, want: int) -> int:
    """K tiles per flush of an "hgemv" config: the largest divisor of K's tile count up to ``want`` (at least 1)."""
    tt = max(1, want)
    while (k // k_tile(bits)) % tt:
        tt -= 1
    return tt


def heuristic_config(m: int, n: int, k: int, bits: int, group: int, sms: int = 132,
                     block_n: int | None = None, dtype: torch.dtype | None = None) -> KernelConfig:
    """Defaults for shapes the tuned table lacks (from the H100/H200 sweeps in benchmarks/KERNELS.md).
    M = 1 with fp16 x on layers of >= HGEMV_MIN_N outputs, at 2-bit g64 and 3/4-bit g128 (the swept ones): the
    packed-fp16 GEMV ("hgemv", KERNELS.md v12).
    Otherwise at M <= 16: the tensor-core "scaled" kind. At 2/3 bits with groups >= 64 the "dot" kind dequantizing in
    half precision (half_dq) instead, in 64-wide tiles of 4 warps keeping >= HALF_DQ_MIN_TILES K tiles per
    program (1.1-1.3x faster than "scaled" at 2 bits on the H200, KERNELS.md v11; the inline-PTX unpack on
    the v7/v8 layouts made both win over the GEMV). At 2/3-bit g32 and M = 1 the CUDA-core GEMV, >=
    LOW_BIT_MIN_K per program, narrowed to 64 columns (unless block_n is given) when 128-wide tiles cannot
    fill the GPU. No heuristic pick uses stream-K yet (KERNELS.md v11: faster on 4-bit gate_up-shaped
    layers, but not yet checked on a GPU with ranges that cross output tiles).
    Mid M at 2-4 bits (up to SWAP_MAX_M; SWAP_MAX_M_LARGE, one bucket more at 3/4 bits, on layers of
    >= SWAP_LARGE_NK weights): the "swap" kind (weights as the dot's first operand), scaled after the
    dot on 32-token tiles, dequantized before it (in x's dtype) on 64/128-token tiles; otherwise
    (and at 8 bits) dequantize to a dense temporary + cuBLAS. Split-K fills the GPU (~4 programs per SM)."""
    if m <= DECODE_MAX_M:
        tile = k_tile(bits)
        if m == 1 and dtype == torch.float16 and HGEMV_GROUP.get(bits) == group and n >= HGEMV_MIN_N \
                and block_n is None and hgemv_enabled():
            tiles = hgemv_tiles(k, bits, HGEMV_TILES[bits])
            split = _split_k(-(-n // 64), k, tile * tiles, sms, tile * tiles)
            return KernelConfig(1, 64, split_k=split, group_m=1, num_warps=4,
                                num_stages=2 if bits in HGEMV_PREFETCH else 3, kind="hgemv", block_k=tiles * tile)
        if bits in (2, 3) and group >= 64:
            bn = block_n or 64
            split = _split_k(-(-n // bn), k, tile, sms, HALF_DQ_MIN_TILES * tile)
            return KernelConfig(16, bn, split_k=split, group_m=1, num_warps=4, num_stages=3, kind="dot", half_dq=True)
        if bits in (2, 3) and m == 1:
            bn = block_n or 128
            split = _split_k(-(-n // bn), k, tile, sms, LOW_BIT_MIN_K)
            if block_n is None and -(-n // bn) * split < 4 * sms:
                bn = 64
                split = _split_k(-(-n // bn), k, tile, sms, LOW_BIT_MIN_K)
            return KernelConfig(1, bn, split_k=split, group_m=1, num_warps=4, num_stages=3, kind="gemv")
        bn = block_n or 128
        split = _split_k(-(-n // bn), k, tile, sms, SCALED_MIN_K)
        return KernelConfig(16, bn, split_k=split, group_m=1, num_warps=4, num_stages=3, kind="scaled")
    if bits in SWAP_BITS and m <= (SWAP_MAX_M_LARGE if n * k >= SWAP_LARGE_NK else SWAP_MAX_M)[bits]:
        if bits == 3 and m <= 32 and n >= 3 * k:  # 3-bit gate_up at M <= 32: unswapped 32-row tiles
            return KernelConfig(32, 128, num_warps=4, num_stages=3, kind="scaled")
        bm = 32 if m <= 32 else (64 if m <= 64 or bits == 3 else 128)
        split = _split_k(-(-m // bm) * -(-n // 128), k, k_tile(bits), sms, LOW_BIT_MIN_K)
        scaled = bm == 32  # larger token tiles dequantize before the dot, in x's dtype
        return KernelConfig(bm, 128, split_k=split, group_m=8, num_warps=8, num_stages=swap_stages(bits, bm),
                            kind="swap", scaled=scaled, half_dq=not scaled)
    return KernelConfig(128, 128, kind="dequant")


@functools.lru_cache(maxsize=None)
def load_table(gpu_name: str) -> dict[str, KernelConfig]:
    path = os.environ.get("DASHQ_KERNEL_CONFIGS") or str(TUNED_DIR / f"{gpu_name}.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {key: KernelConfig(**val) for key, val in raw.items()}  # fields missing in old tables default


def save_table(table: dict[str, KernelConfig], path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({k: asdict(v) for k, v in sorted(table.items())}, indent=1))


def fit_config(cfg: KernelConfig, k: int, group: int, bits: int, dtype: torch.dtype) -> KernelConfig:
    """Make a config legal: "scaled" and half_dq need codes that fit their magic constant (bf16: < 128,
    so not 8 bits); "gemv" has one row per program, "hgemv" 1, 2 or 4 (the next of those up); tl.dot needs
    BLOCK_M >= 16; no more K splits than K tiles (a table tuned on 128-k tiles may ask for more at 2 bits, whose
    tiles are 256 k); stream-K only on dashq_linear_kernel's kinds, with split_k 1; two column blocks (cols 2) only
    on "hgemv" with one row per program."""
    if cfg.kind == "scaled" and bits == 8 and dtype == torch.bfloat16:
        cfg = replace(cfg, kind="dot")
    if cfg.kind == "swap" and cfg.scaled and bits == 8 and dtype == torch.bfloat16:
        cfg = replace(cfg, scaled=False)
    if cfg.half_dq and bits == 8 and dtype == torch.bfloat16:  # half_dq starts from the same magic operand
        cfg = replace(cfg, half_dq=False)
    if cfg.kind == "hgemv" and (bits == 8 or dtype != torch.float16):  # packed fp16 math on 2/3/4-bit codes
        cfg = replace(cfg, kind="gemv", block_k=0)
    if cfg.kind == "hgemv":
        tt = hgemv_tiles(k, bits, cfg.block_k // k_tile(bits))
        cfg = replace(cfg, block_k=tt * k_tile(bits), split_k=max(1, min(cfg.split_k, k // k_tile(bits) // tt)))
    if cfg.kind == "gemv" and cfg.block_m != 1:
        cfg = replace(cfg, block_m=1)
    if cfg.kind == "hgemv" and cfg.block_m not in HGEMV_ROWS:  # rows of x per program: 1, 2 or 4
        cfg = replace(cfg, block_m=next((r for r in HGEMV_ROWS if r >= cfg.block_m), HGEMV_ROWS[-1]))
    if cfg.cols != 1 and (cfg.kind != "hgemv" or cfg.block_m != 1 or cfg.cols != 2):  # 2 column blocks: 1 row only
        cfg = replace(cfg, cols=1)
    if cfg.kind not in ("gemv", "hgemv", "dequant") and cfg.block_m < 16:
        cfg = replace(cfg, block_m=16)
    if cfg.stream_k and cfg.kind in ("wide", "dequant", "hgemv"):  # stream-K is dashq_linear_kernel's schedule
        cfg = replace(cfg, stream_k=0)
    if cfg.stream_k and cfg.split_k != 1:  # the programs share all of K: no separate split
        cfg = replace(cfg, split_k=1)
    if cfg.split_k > max(1, k // k_tile(bits)):
        cfg = replace(cfg, split_k=max(1, k // k_tile(bits)))
    if cfg.kind == "wide":
        bk = min(cfg.block_k or 64, group, 128)
        # raw codes as exact halves: fp16 holds codes < 1024, bf16 < 128 (not 8 bits)
        scaled = cfg.scaled and not (bits == 8 and dtype == torch.bfloat16)
        cfg = replace(cfg, block_k=max(16, bk), split_k=1, scaled=scaled)
    return cfg


_PICKED: dict[tuple, KernelConfig] = {}


def pick_config(m: int, n: int, k: int, bits: int, group: int, device: torch.device,
                dtype: torch.dtype = torch.float16) -> KernelConfig:
    """Tuned config if the table has the shape, else the heuristic; legal for the shape (memoised)."""
    key = (m, n, k, bits, group, device.type, device.index, dtype)
    cfg = _PICKED.get(key)
    if cfg is None:
        cfg = _PICKED[key] = fit_config(_pick(m, n, k, bits, group, device, dtype), k, group, bits, dtype)
    return cfg


def clear_cache() -> None:
    """Forget memoised picks and loaded tables (after changing $DASHQ_KERNEL_CONFIGS)."""
    _PICKED.clear()
    load_table.cache_clear()


def _pick(m: int, n: int, k: int, bits: int, group: int, device: torch.device, dtype: torch.dtype) -> KernelConfig:
    if device.type == "cuda":
        name, sms = _device_facts(device.index if device.index is not None else torch.cuda.current_device())
    else:
        name, sms = "cpu", 132
    tuned = load_table(name).get(config_key(bits, group, m, n, k))
    if tuned is not None and tuned.kind == "hgemv" and (dtype != torch.float16 or not hgemv_enabled()):
        tuned = None  # tables are swept with fp16 x
    return tuned if tuned is not None else heuristic_config(m, n, k, bits, group, sms, dtype=dtype)
