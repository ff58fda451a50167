"""The Triton kernels of dashq_vllm.kernels under TRITON_INTERPRET=1 (CPU), both paths
(decode: BLOCK_M = 16 with split-K; GEMM: no split), every bits x group x dtype, against float64.

TRITON_INTERPRET must be set before triton is first imported, so when this file is collected in a
process without it, its single test re-runs this file in a subprocess with the variable set
(other test files in the same pytest process are untouched).

Interpreter caveats (the GPU check in benchmarks/bench_kernels.py covers the compiled path):
its ``tl.dot`` mishandles bf16 operands, so the kernel is given exact float32 copies there
(``DOT_F32``); its bf16 atomics are unsupported, so bf16 decode runs with split_k = 1; and its
float32 -> bf16 cast truncates, which roughly doubles the bf16 error (still <= 1e-2).
"""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_skip_reason():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - environment dependent
        return f"triton unusable: {e!r}"
    return None


if not INTERPRETED:

    def test_interpreted_kernels_in_subprocess():
        reason = _triton_skip_reason()
        if reason:
            pytest.skip(reason)
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        tail = (proc.stdout + proc.stderr)[-6000:]
        if proc.returncode == 5 or " skipped" in tail and " passed" not in tail:
            pytest.skip(f"interpreter tests skipped: {tail.strip().splitlines()[-1]}")
        assert proc.returncode == 0, tail

else:
    reason = _triton_skip_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)

    from dashq_vllm import kernels as K
    from dashq_vllm.kernels.configs import KernelConfig
    from dashq_vllm.kernels.triton_kernels import dashq_gemv_kernel, launch, triton_linear

    from test_kernels import dense_reference, random_module, rel_err

    def _split(dtype):
        return 2 if dtype == torch.float16 else 1

    # (M, config): decode = BLOCK_M = 16 with split-K; gemv = CUDA-core kernel; gemm = larger tiles,
    # grouped order, no split. "dot" dequantizes before tl.dot, "scaled" scales after it; "swap" puts the
    # weights first in the dot (either way).
    PATHS = {
        "decode-dot": (3, lambda dt: KernelConfig(16, 32, split_k=_split(dt), group_m=1)),
        "decode-scaled": (5, lambda dt: KernelConfig(16, 32, split_k=_split(dt), group_m=1, kind="scaled")),
        "gemv": (2, lambda dt: KernelConfig(1, 32, split_k=_split(dt), kind="gemv")),
        "gemm-dot": (37, lambda dt: KernelConfig(32, 32, split_k=1, group_m=2)),
        "gemm-scaled": (37, lambda dt: KernelConfig(32, 32, split_k=1, group_m=2, kind="scaled")),
        "dequant": (20, lambda dt: KernelConfig(16, 32, kind="dequant")),
        "dequant-nk": (20, lambda dt: KernelConfig(16, 32, kind="dequant", nk=True)),
        "wide-scaled": (37, lambda dt: KernelConfig(32, 32, group_m=2, kind="wide")),
        "wide-dot": (19, lambda dt: KernelConfig(16, 32, block_k=32, kind="wide", scaled=False)),
        # swapped operands (y^T = W^T x^T): split-K decode and an unsplit GEMM with 2 token tiles
        "swap-scaled": (5, lambda dt: KernelConfig(16, 32, split_k=_split(dt), group_m=1, kind="swap")),
        "swap-dot": (37, lambda dt: KernelConfig(32, 32, split_k=1, group_m=2, kind="swap", scaled=False)),
        # dequantization in x's dtype from the magic operand (8 bits with bf16 x: in float32, fit_config)
        "swap-dot-half": (37, lambda dt: KernelConfig(32, 32, split_k=1, group_m=2, kind="swap", scaled=False,
                                                      half_dq=True)),
        "decode-dot-half": (3, lambda dt: KernelConfig(16, 32, split_k=_split(dt), group_m=1, half_dq=True)),
        # stream-K over N = 40 and two K tiles: 3 output tiles x 2 shared by 4 programs (one range ends half
        # way into a tile and goes on into the next: [1, 3)), 2 x 2 by 7 (some get no iteration) or by 1 (one
        # program walks both tiles)
        "stream-k-scaled": (5, lambda dt: KernelConfig(16, 16, group_m=1, kind="scaled", stream_k=4)),
        "stream-k-dot-half": (3, lambda dt: KernelConfig(16, 32, group_m=1, half_dq=True, stream_k=7)),
        "stream-k-gemv": (1, lambda dt: KernelConfig(1, 32, kind="gemv", stream_k=1)),
        # the packed-fp16 GEMV (bf16 x: fit_config falls back to "gemv"): two rows split over the two K tiles,
        # and one row flushing once for both tiles
        "hgemv": (2, lambda dt: KernelConfig(1, 32, split_k=_split(dt), kind="hgemv")),
        "hgemv-tt2": (1, lambda dt: KernelConfig(1, 32, kind="hgemv", block_k=1024)),
        "hgemv-prefetch": (2, lambda dt: KernelConfig(1, 32, split_k=_split(dt), kind="hgemv", num_stages=2)),
        "hgemv-prefetch-tt2": (1, lambda dt: KernelConfig(1, 32, kind="hgemv", block_k=1024, num_stages=2)),
        # several rows of x per program (each weight pair dequantized once): two rows in one program, and
        # five rows in two programs of four (the second reads row 4 for its three rows past M, stores none)
        "hgemv-rows2": (2, lambda dt: KernelConfig(2, 32, split_k=_split(dt), kind="hgemv")),
        "hgemv-rows4": (5, lambda dt: KernelConfig(4, 32, split_k=_split(dt), kind="hgemv", block_k=1024,
                                                   num_stages=2)),
        # two column blocks of 16 per program (each x pair multiplied into both): N = 40 in two programs, the
        # second's first block partly past N and its second block wholly; with the prefetch, one K range
        "hgemv-cols2": (2, lambda dt: KernelConfig(1, 16, split_k=_split(dt), kind="hgemv", cols=2)),
        "hgemv-cols2-prefetch": (1, lambda dt: KernelConfig(1, 16, kind="hgemv", block_k=1024, num_stages=2,
                                                            cols=2)),
    }

    def _check_path(bits, group, dtype, path, k_in, seed, with_bias):
        m, make_cfg = PATHS[path]
        return _check_config(bits, group, dtype, m, make_cfg(dtype), k_in, seed, with_bias)

    def _check_config(bits, group, dtype, m, cfg, k_in, seed, with_bias, n=40):
        """One kernel config on fresh random data against float64; N = 40 is not a multiple of
        BLOCK_N. y has 8 poisoned spare columns that must stay untouched; its body is NaN-poisoned
        too, except under split-K or stream-K, which accumulate into a zero-filled output by contract."""
        spec, t = random_module(bits, group, n, k_in, seed)
        kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, dtype)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k_in, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
        y_full = torch.full((m, n + 8), float("nan"), dtype=dtype)
        y = y_full[:, :n]
        if cfg.atomic:
            y.zero_()
        launch(x, kw.qweight, kw.scales, kw.szeros, bias, y, bits, group, n, kw.k, cfg)
        assert torch.isnan(y_full[:, n:]).all(), "wrote outside the output"
        assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
        assert rel_err(y, dense_reference(x, t, spec, bias)) <= 1e-2
        return kw

    @pytest.mark.parametrize("path", sorted(PATHS))
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("group", [32, 64, 128])
    @pytest.mark.parametrize("bits", [2, 3, 4, 8])
    def test_triton_kernel_vs_float64(bits, group, dtype, path):
        if PATHS[path][1](dtype).stream_k and dtype == torch.bfloat16:
            pytest.skip("stream-K accumulates atomically, and the interpreter has no bf16 atomics (GPU check only)")
        # x unpadded (k_in < K); two K tiles (split-K: one each)
        _check_path(bits, group, dtype, path, 2 * K.k_tile(bits) - 5,
                    zlib.crc32(f"{bits}{group}{dtype}{path}".encode()), (bits + group) % 2 == 0)

    @pytest.mark.parametrize("path", ["decode-dot", "decode-scaled", "gemv", "swap-scaled", "hgemv"])
    @pytest.mark.parametrize("bits", [2, 3, 4])
    def test_triton_kernel_even_k(bits, path):
        """x exactly K wide (EVEN_K: loaded without a k mask), fp16, two K tiles."""
        k_in = 2 * K.k_tile(bits)
        kw = _check_path(bits, 64, torch.float16, path, k_in, zlib.crc32(f"even{bits}{path}".encode()), False)
        assert kw.k == k_in

    @pytest.mark.parametrize("prefetch", [False, True])
    @pytest.mark.parametrize("bits", [2, 3, 4])
    def test_hgemv_uneven_split_ranges(bits, prefetch):
        """The packed-fp16 GEMV over five K tiles: split 4 (ranges of 1, 1, 1 and 2 tiles), split 3 with two
        rows, and one program walking all five (with the prefetch: across every tile boundary, and past the
        last tile masked); a flush every 2 tiles does not divide 5, so fit_config makes it 1."""
        from dashq_vllm.kernels.configs import fit_config

        stages = 2 if prefetch else 3
        k_in = 5 * K.k_tile(bits) - 3
        for i, (m, cfg) in enumerate([(1, KernelConfig(1, 32, split_k=4, kind="hgemv", num_stages=stages)),
                                      (2, KernelConfig(1, 32, split_k=3, kind="hgemv", num_stages=stages)),
                                      (1, KernelConfig(1, 32, kind="hgemv", num_stages=stages))]):
            kw = _check_config(bits, 64, torch.float16, m, cfg, k_in, zlib.crc32(f"uneven{bits}{prefetch}{i}".encode()),
                               i == 0)
            assert kw.k == 5 * K.k_tile(bits)
        assert fit_config(KernelConfig(1, 32, kind="hgemv", block_k=2 * K.k_tile(bits)), 5 * K.k_tile(bits), 64,
                          bits, torch.float16).block_k == K.k_tile(bits)

    @pytest.mark.parametrize("cols", [1, 2])
    @pytest.mark.parametrize("prefetch", [False, True])
    @pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128), (4, 32)])
    def test_hgemv_even_n(bits, group, prefetch, cols):
        """N = 64, a multiple of the program's columns (BLOCK_N = 32, or two blocks of 16): the packed-fp16 GEMV
        loads words and group rows without a mask (EVEN_N; the prefetch still masks the tile past a program's
        range), two rows, split 2, with a bias."""
        cfg = KernelConfig(1, 32 // cols, split_k=2, kind="hgemv", num_stages=2 if prefetch else 3, cols=cols)
        _check_config(bits, group, torch.float16, 2, cfg, 2 * K.k_tile(bits),
                      zlib.crc32(f"evenn{bits}{group}{prefetch}{cols}".encode()), True, n=64)

    def test_hgemv_two_column_blocks_need_one_row():
        """The kernel refuses two column blocks with several rows of x (rows 1-3 of the second block would not be
        stored); fit_config never asks for it."""
        spec, t = random_module(4, 128, 32, 128, 7)
        kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float16)
        x = torch.randn(2, 128).to(torch.float16)
        y = torch.zeros(2, 32, dtype=torch.float16)
        meta = dict(BITS=4, GROUP=128, BLOCK_N=16, TT=1, ATOMIC=False, HAS_BIAS=False, PTX=False, EVEN_K=True,
                    KT=K.k_tile(4), PREFETCH=False, EVEN_N=True, ROWS=2, COLS=2)
        with pytest.raises(Exception, match="one row"):
            dashq_gemv_kernel[(1, 1, 1)](x, kw.qweight, kw.scales, kw.szeros, y, y, 2, 32, kw.k, 128, x.stride(0),
                                         y.stride(0), 1, **meta)

    @pytest.mark.parametrize("m", [1, 16, 17, 70])
    def test_triton_linear_entry_point(m):
        """The op's CUDA function (default configs, output allocation, leading dims) on CPU tensors:
        decode (1, 16), the swapped GEMM scaled on 32-token tiles (17) and dequantizing on 128-token
        tiles (70)."""
        spec, t = random_module(4, 128, 48, 256, seed=m)
        kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float16)
        x = torch.randn(1, m, 256).to(torch.float16)
        y = triton_linear(x, kw.qweight, kw.scales, kw.szeros, 4, 128, 48, 256)
        assert y.shape == (1, m, 48) and torch.isfinite(y).all()
        assert rel_err(y, dense_reference(x, t, spec)) <= 1e-2
