"""dashq_vllm.kernels on the CPU: layout round-trips, the reference op against float64 dense math,
the torch.library registration (schema + fake kernel). The Triton kernels themselves are checked
under the interpreter in tests/test_kernels_interpret.py."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from dashq_vllm import format as F
from dashq_vllm import kernels as K

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def random_module(bits, group, n, k_in, seed, scale_dtype="float16"):
    """Checkpoint tensors of a random module (fresh codes, scales and float zeros)."""
    g = torch.Generator().manual_seed(seed)
    spec = F.ModuleSpec.create(k_in, n, bits, group, scale_zero_dtype=scale_dtype)
    codes = torch.randint(0, 1 << bits, (n, spec.quant_in_features), generator=g)
    scale = torch.rand(n, spec.groups_per_row, generator=g) * 0.05 + 0.005
    zero = torch.rand(n, spec.groups_per_row, generator=g) * ((1 << bits) - 1)
    return spec, F.encode_linear(codes, scale, zero, spec)


def dense_reference(x, t, spec, bias=None):
    w = F.dequantize(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float64)
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", BITS)
def test_kernel_code_packing_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    kp = 2 * K.k_tile(bits)
    codes = torch.randint(0, 1 << bits, (kp, 7), generator=g)
    codes[-1, -1] = (1 << bits) - 1
    qw = K.pack_kernel_codes(codes, bits)
    assert qw.dtype == torch.int32 and tuple(qw.shape) == (kp * bits // 32, 7)
    assert torch.equal(K.unpack_kernel_codes(qw, bits), codes)


def _decode_from_text(words, bits, k):
    """Codes of column 0, decoded from the layout's description (kernels/layout.py): R = 16 rows
    per block for every plane but 8 bits' 32; KB = R * 32 / width."""
    codes, row0, shift = [0] * k, 0, 0
    for width, rows in {2: [(2, 16)], 3: [(2, 16), (1, 16)], 4: [(4, 16)], 8: [(8, 32)]}[bits]:
        kb = rows * 32 // width
        for kk in range(k):
            blk, rem = divmod(kk, kb)
            j, r = divmod(rem, rows)
            word = words[row0 + rows * blk + r] & 0xFFFFFFFF
            codes[kk] |= ((word >> (j * width)) & ((1 << width) - 1)) << shift
        row0 += k * width // 32
        shift += width
    return codes


@pytest.mark.parametrize("bits", BITS)
def test_kernel_layout_matches_its_description(bits):
    kp = K.k_tile(bits) * 2
    codes = torch.randint(0, 1 << bits, (kp, 1), generator=torch.Generator().manual_seed(9))
    assert K.k_tile(bits) == {2: 256, 3: 512, 4: 128, 8: 128}[bits]
    words = K.pack_kernel_codes(codes, bits)[:, 0].tolist()
    assert _decode_from_text(words, bits, kp) == codes[:, 0].tolist()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_repack_roundtrip(bits, group):
    spec, t = random_module(bits, group, n=24, k_in=group * 3 - 5, seed=bits * 7 + group)
    kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.bfloat16)
    k = K.padded_k(spec.quant_in_features, bits)
    assert (kw.n, kw.k, kw.bits, kw.group_size) == (24, k, bits, group) and k % K.k_tile(bits) == 0
    assert tuple(kw.qweight.shape) == (k * bits // 32, 24) and kw.qweight.dtype == torch.int32
    assert tuple(kw.scales.shape) == tuple(kw.szeros.shape) == (k // group, 24)
    packed, scale, zero = K.unrepack(kw, spec)
    assert torch.equal(packed, t["W_q_packed"])
    assert torch.equal(scale, t["scale"])
    # zero = -szeros / scale: exact up to the rounding of the folded fp16 value
    torch.testing.assert_close(zero.float(), t["zero"].float(), atol=4e-3 * (1 << bits), rtol=0)
    w_kernel = K.dequantize_kernel_weight(kw.qweight, kw.scales, kw.szeros, bits, group)[:, : spec.in_features]
    w_ckpt = F.dequantize(t["W_q_packed"], t["scale"], t["zero"], spec)
    torch.testing.assert_close(w_kernel, w_ckpt, atol=2e-3 * (1 << bits) * 0.055, rtol=1e-3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_op_vs_float64(bits, group, dtype):
    """The CPU path of torch.ops.dashq.linear, x unpadded (in_features < quant_in_features)."""
    n, k_in = 40, 2 * group + 19
    spec, t = random_module(bits, group, n, k_in, seed=bits * 1000 + group + (dtype == torch.bfloat16))
    kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, dtype)
    g = torch.Generator().manual_seed(group + bits)
    x = torch.randn(2, 3, k_in, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    for b in (None, bias):
        y = K.linear(x, kw, b)
        assert y.shape == (2, 3, n) and y.dtype == dtype and torch.isfinite(y).all()
        assert rel_err(y, dense_reference(x, t, spec, b)) <= 1e-2
    # a caller that pads x itself gets the same result
    torch.testing.assert_close(K.linear(K.pad_input(x, kw.k), kw), K.linear(x, kw), rtol=0, atol=0)


def test_bf16_checkpoint_scales_are_kept_in_activation_dtype():
    spec, t = random_module(4, 64, n=8, k_in=128, seed=3, scale_dtype="bfloat16")
    kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.bfloat16)
    assert kw.scales.dtype == torch.bfloat16
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert rel_err(K.linear(x, kw), dense_reference(x, t, spec)) <= 1e-2


def test_op_registration_and_fake_kernel():
    spec, t = random_module(3, 32, n=16, k_in=64, seed=11)
    kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float16)
    x = torch.randn(4, 64).to(torch.float16)
    args = (x, kw.qweight, kw.scales, kw.szeros, kw.bits, kw.group_size, kw.n, kw.k, None)
    torch.library.opcheck(torch.ops.dashq.linear.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = torch.ops.dashq.linear(*fake)
    assert y.shape == (4, 16) and y.dtype == torch.float16


def test_kernels_package_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, dashq_vllm.kernels; assert 'vllm' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)



def test_launch_key_separates_what_a_binary_is_built_for():
    """The compiled-kernel cache of the launch fast path: a bias-less call (which passes y as the
    bias pointer) must not reuse the binary built for a call with a bias, nor another kernel's,
    dtype's or config's (this mix-up made vLLM serve garbage for Qwen2, whose qkv has a bias)."""
    from dashq_vllm.kernels.configs import KernelConfig
    from dashq_vllm.kernels.triton_kernels import dashq_gemm_kernel, dashq_linear_kernel, launch_key

    x, y = torch.zeros(4, 64, dtype=torch.float16), torch.zeros(4, 32, dtype=torch.float16)
    args = (x, y, 4, 32, 64)
    meta = dict(BITS=4, HAS_BIAS=True)
    cfg = KernelConfig(16, 32, kind="scaled")
    base = launch_key(dashq_linear_kernel, meta, cfg, args)
    assert launch_key(dashq_linear_kernel, dict(meta), cfg, args) == base
    assert launch_key(dashq_linear_kernel, dict(meta, HAS_BIAS=False), cfg, args) != base
    assert launch_key(dashq_gemm_kernel, meta, cfg, args) != base
    assert launch_key(dashq_linear_kernel, meta, KernelConfig(16, 64, kind="scaled"), args) != base
    assert launch_key(dashq_linear_kernel, meta, cfg, (x.bfloat16(), y, 4, 32, 64)) != base
    assert launch_key(dashq_linear_kernel, meta, cfg, (x, y, 4, 33, 64)) != base  # 32 -> 33: not /16
    assert launch_key(dashq_linear_kernel, meta, cfg, (x, y, 7, 48, 64)) == base  # same classes


# --------------------------------------------------------------------------- the experimental PTX unpack


def _compile_sm90(bits, dtype, ptx, mode="scaled", even_k=True, swap=False, block_m=None, half_dq=False,
                  num_warps=4, num_stages=3, stream_k=False):
    """dashq_linear_kernel compiled for sm_90 on this machine (Triton's bundled ptxas; no GPU), with
    the divisibility a real launch specialises on."""
    from dashq_vllm.kernels.triton_kernels import MODES, dashq_linear_kernel

    consts = dict(BITS=bits, GROUP=64, BLOCK_M=block_m or (1 if mode == "gemv" else 16), BLOCK_N=128, GROUP_M=1,
                  MODE=MODES[mode], ATOMIC=True,
                  HAS_BIAS=False, DOT_F32=False, PTX=ptx, EVEN_K=even_k, SWAP=swap,
                  HALF_DQ=half_dq, KT=K.k_tile(bits), STREAM_K=stream_k)
    return _compile_fn_sm90(dashq_linear_kernel, dtype, consts, num_warps, num_stages)


def _compile_fn_sm90(fn, dtype, consts, num_warps=4, num_stages=3):
    """A kernel of the (x, qw, s, z, b, y, M, N, K, KX, stride_xm, stride_ym, SPLIT_K, constexprs...) signature
    compiled ahead of time for sm_90 (dashq_vllm.benchmarks.sass)."""
    pytest.importorskip("triton")
    from dashq_vllm.benchmarks.sass import compile_sm90

    try:
        return compile_sm90(fn, dtype, consts, num_warps, num_stages)
    except ImportError as e:  # pragma: no cover - triton layout dependent
        pytest.skip(f"this triton cannot compile ahead of time: {e!r}")
    except Exception as e:
        if "ptxas" in repr(e).lower() and "not found" in repr(e).lower():  # pragma: no cover
            pytest.skip(f"no ptxas for an ahead-of-time compile: {e!r}")
        raise


@pytest.mark.parametrize("bits,dtype", [(2, torch.float16), (4, torch.float16), (4, torch.bfloat16),
                                        (8, torch.float16), (3, torch.float16)])
def test_ptx_unpack_compiles_for_sm90(bits, dtype):
    """DASHQ_PTX_UNPACK's kernel (KERNELS.md v6) is valid PTX that ptxas accepts, and the flag really
    switches the scaled mode's unpacking: the pair-packing asm is in the PTX exactly when PTX is set
    (3 bits: the two-plane form, v8). Its numbers can only be checked on a GPU (bench_kernels.py check)."""
    with_ptx = _compile_sm90(bits, dtype, True)
    without = _compile_sm90(bits, dtype, False)
    assert with_ptx.asm["cubin"] and without.asm["cubin"]
    marker = "prmt.b32 t,"  # the pair-packing asm of _pair_operand (both forms)
    ptx = with_ptx.asm["ptx"]
    assert marker in ptx
    assert marker not in without.asm["ptx"]
    # the operands the asm is given: the mask(s) and the magic in both halves
    masks = (3 * 0x10001, 4 * 0x10001) if bits == 3 else (((1 << bits) - 1) * 0x10001,)
    magic2 = (0x6400 if dtype == torch.float16 else 0x4300) * 0x10001
    assert all(f", {m};" in ptx for m in masks) and f", {magic2};" in ptx, (masks, magic2)
    # the other modes ignore the flag
    assert marker not in _compile_sm90(bits, dtype, True, mode="dot").asm["ptx"]


@pytest.mark.parametrize("bits,mode", [(2, "scaled"), (3, "scaled"), (4, "scaled"), (4, "dot")])
def test_swap_feeds_weights_to_wgmma_from_registers(bits, mode):
    """The "swap" kind (KERNELS.md "Mid M") exists for one compiled property on Hopper: every wgmma
    takes its first operand, the unpacked weight tile (or the ones of the scaled mode's x sums), from
    registers, so the weights never take a shared-memory round trip; only x^T is a shared-memory
    descriptor. Unswapped at the same tile size, the weights are a shared-memory operand."""
    def dots(swap):
        ttgir = _compile_sm90(bits, torch.float16, True, mode=mode, swap=swap, block_m=64).asm["ttgir"]
        return [line for line in ttgir.split("\n") if "ttng.warp_group_dot " in line]

    swapped = dots(True)
    assert swapped, "no wgmma: the swap kind is not using Hopper's tensor-core path"
    for line in swapped:
        a, b = line.split("} : ", 1)[1].split(" -> ")[0].split(" * ")
        assert a.startswith("tensor<128x16x") and "opIdx = 0" in a, line
        assert b.startswith("!ttg.memdesc<16x64x"), line
    # unswapped, the weight tile (16 x BLOCK_N) is a shared-memory operand
    assert any(" * !ttg.memdesc<16x128x" in line for line in dots(False))


def test_stream_k_compiles_for_sm90():
    """The stream-K kernel compiles for sm_90 in both modes it is tuned for, as the split-K kernel
    plus one dynamic loop over the output tiles a program's range touches (around the K loop); its
    numbers are checked in the interpreter and on a GPU."""
    for bits, mode, half in ((4, "scaled", False), (2, "dot", True)):
        stream = _compile_sm90(bits, torch.float16, True, mode=mode, half_dq=half, stream_k=True)
        split = _compile_sm90(bits, torch.float16, True, mode=mode, half_dq=half)
        assert stream.asm["cubin"]
        assert stream.asm["ttir"].count("scf.for") == split.asm["ttir"].count("scf.for") + 1


@pytest.mark.parametrize("bits,group,tt", [(4, 128, 1), (4, 128, 2), (3, 128, 2), (2, 64, 4), (3, 32, 1)])
def test_hgemv_compiles_to_packed_half_fmas(bits, group, tt):
    """The "hgemv" kind (KERNELS.md v12) compiles for sm_90 with several K tiles per flush (TT; constexprs
    inside its static loops broke this once, which the interpreter does not see) and does its per-weight
    math as packed fp16x2 FMAs, no float32 FMA in the K loop; 3 bits joins the 1-bit plane with funnel
    shifts. The one-tile prefetch (PREFETCH) adds one K tile's 16-byte word loads (the prologue before the
    loop) to the TT tiles' the loop body has. Its numbers are checked in the interpreter and on a GPU."""
    import re

    from dashq_vllm.benchmarks.sass import hgemv_consts
    from dashq_vllm.kernels.triton_kernels import dashq_gemv_kernel

    word_loads = {}
    for prefetch in (False, True):
        ptx = _compile_fn_sm90(dashq_gemv_kernel, torch.float16, hgemv_consts(bits, group, tt, prefetch=prefetch)
                               ).asm["ptx"]
        # a thread of 4 warps owns 8 of the (16, 64) accumulator's packed pairs; each takes two packed FMAs
        # (v S - S, then x + acc) in each of a K tile's KT / 32 pair slots, TT tiles per flush (all unrolled)
        pairs = len(re.findall(r"fma\.rn\.f16x2", ptx))
        assert pairs >= 2 * (16 * 64 // 128) * tt * (K.k_tile(bits) // 32), pairs
        assert "fma.rn.f32" not in ptx
        assert ("shf.r.wrap" in ptx) == (bits == 3)
        word_loads[prefetch] = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx))
    assert word_loads[False] > 0 and word_loads[True] * tt == word_loads[False] * (tt + 1), word_loads


@pytest.mark.parametrize("bits,group,tt", [(4, 128, 2), (2, 64, 4), (3, 128, 1)])
def test_hgemv_sass_loop(bits, group, tt):
    """The hgemv K loop in sm_90 SASS (KERNELS.md v13): two HFMA2 per pair of weights (dequantize to q s + z, then
    multiply into the accumulator) plus a few per group (no per-slot x sums, no per-group zero term), no float32
    FMA, and nothing through shared memory (the packed group rows are transposed in registers)."""
    from dashq_vllm.benchmarks.sass import disassemble, hgemv_consts, loop_histogram
    from dashq_vllm.kernels.triton_kernels import dashq_gemv_kernel

    compiled = _compile_fn_sm90(dashq_gemv_kernel, torch.float16, hgemv_consts(bits, group, tt))
    try:
        hist = loop_histogram(disassemble(compiled.asm["cubin"]))
    except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover - triton layout dependent
        pytest.skip(f"no nvdisasm: {e!r}")
    pairs = (16 * 64 // 128) * tt * (K.k_tile(bits) // 32)  # per thread and iteration
    assert 2 * pairs <= hist["HFMA2"] + hist["HMUL2"] <= 2.5 * pairs, hist
    assert hist["FFMA"] == 0 and not {"STS", "LDS", "BAR"} & set(hist), hist


@pytest.mark.parametrize("bits,group,tt", [(4, 128, 4), (2, 64, 2)])
def test_hgemv_two_column_blocks_sass(bits, group, tt):
    """cols 2 (KERNELS.md v14): each x pair a thread loads serves both column blocks, so the K loop issues fewer
    global loads per weight (x's are most of them) and fewer instructions per weight than with one block, still
    two HFMA2 per pair of weights and nothing through shared memory."""
    from dashq_vllm.benchmarks.sass import disassemble, hgemv_consts, loop_histogram
    from dashq_vllm.kernels.triton_kernels import dashq_gemv_kernel

    per_weight = {}
    for cols in (1, 2):
        compiled = _compile_fn_sm90(dashq_gemv_kernel, torch.float16, hgemv_consts(bits, group, tt, cols=cols))
        try:
            hist = loop_histogram(disassemble(compiled.asm["cubin"]))
        except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover - triton layout dependent
            pytest.skip(f"no nvdisasm: {e!r}")
        pairs = cols * (16 * 64 // 128) * tt * (K.k_tile(bits) // 32)  # per thread and iteration
        assert 2 * pairs <= hist["HFMA2"] + hist["HMUL2"] <= 2.5 * pairs, (cols, hist)
        assert not {"STS", "LDS", "BAR", "STL", "LDL"} & set(hist), (cols, hist)
        per_weight[cols] = (hist["LDG"] / (2 * pairs), sum(hist.values()) / (2 * pairs))
    assert per_weight[2][0] < 0.75 * per_weight[1][0] and per_weight[2][1] < 0.95 * per_weight[1][1], per_weight


def test_hgemv_even_n_counts_the_program_columns():
    """EVEN_N (no masked loads) only where a program's columns (cols x block_n) divide N: N = 48 divides by one
    16-wide block but not by two, where the last program's second block lies past N; and only for fp16 group
    rows (read as packed pairs)."""
    from dashq_vllm.kernels.configs import KernelConfig
    from dashq_vllm.kernels.triton_kernels import hgemv_even_n

    one, two = KernelConfig(1, 16, kind="hgemv"), KernelConfig(1, 16, kind="hgemv", cols=2)
    f16, bf16 = torch.float16, torch.bfloat16
    assert hgemv_even_n(48, one, f16, f16) and not hgemv_even_n(48, two, f16, f16)
    assert hgemv_even_n(64, two, f16, f16) and not hgemv_even_n(64, two, bf16, bf16)
    assert not hgemv_even_n(64, two, f16, torch.float32)


def test_fit_config_column_blocks():
    """Two column blocks per program only on the packed-fp16 GEMV with one row of x: kept there, dropped for more
    rows, for other kinds and where bf16 x turns hgemv into the plain GEMV; no other count than 1 or 2."""
    from dashq_vllm.kernels.configs import KernelConfig, fit_config

    def fit(cfg, dtype=torch.float16):
        return fit_config(cfg, 4096, 128, 4, dtype).cols

    assert fit(KernelConfig(1, 64, kind="hgemv", block_k=512, cols=2)) == 2
    assert fit(KernelConfig(2, 64, kind="hgemv", block_k=512, cols=2)) == 1
    assert fit(KernelConfig(1, 64, kind="hgemv", block_k=512, cols=2), torch.bfloat16) == 1
    assert fit(KernelConfig(16, 64, kind="scaled", cols=2)) == 1
    assert fit(KernelConfig(1, 64, kind="hgemv", block_k=512, cols=4)) == 1


@pytest.mark.parametrize("dtype,half_fma", [(torch.float16, r"fma\.rn\.f16"), (torch.bfloat16, r"fma\.rn\.bf16")])
@pytest.mark.parametrize("swap", [True, False])
def test_half_dequant_compiles_to_half_fmas(dtype, half_fma, swap):
    """KernelConfig.half_dq (HALF_DQ): the dot mode (swapped at mid M, unswapped at decode) dequantizes
    with fused fp16/bf16 FMAs (one rounding of q s + z) from the PTX-unpacked operand, so no float32 FMA
    and no separate half multiply is left; without it, one float32 FMA per weight."""
    import re

    def fmas(half):
        ptx = _compile_sm90(4, dtype, True, mode="dot", swap=swap, block_m=64 if swap else 16, half_dq=half).asm["ptx"]
        return (len(re.findall(r"fma\.rn\.f32", ptx)), len(re.findall(half_fma, ptx)),
                len(re.findall(r"mul\.rn\.b?f16", ptx)))

    f32, f16, mul16 = fmas(True)
    assert f32 == 0 and f16 > 0 and mul16 == 0, (f32, f16, mul16)
    f32, f16, _ = fmas(False)
    assert f32 > 0 and f16 == 0, (f32, f16)


def test_ptx_unpack_default_switch_and_platforms(monkeypatch):
    """The flag is on by default and DASHQ_PTX_UNPACK=0 turns it off; launch() asks for PTX only on
    NVIDIA CUDA tensors: never on CPU tensors (the interpreter cannot run PTX) nor on ROCm."""
    import importlib

    import dashq_vllm.kernels.triton_kernels as TK

    monkeypatch.delenv("DASHQ_PTX_UNPACK", raising=False)
    assert importlib.reload(TK).PTX_UNPACK is True
    monkeypatch.setenv("DASHQ_PTX_UNPACK", "0")
    assert importlib.reload(TK).PTX_UNPACK is False
    monkeypatch.setenv("DASHQ_PTX_UNPACK", "1")
    assert importlib.reload(TK).PTX_UNPACK is True

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **meta):
                seen.update(meta)
            return run

    class FakeCuda(torch.Tensor):  # what launch() reads of a CUDA tensor, on CPU data
        @property
        def is_cuda(self):
            return True

    def launch(x):
        TK.launch(x, torch.zeros(16, 64, dtype=torch.int32), torch.ones(1, 64, dtype=torch.float16),
                  torch.zeros(1, 64, dtype=torch.float16), None, torch.zeros(1, 64, dtype=torch.float16),
                  4, 128, 64, 128, TK.KernelConfig(16, 64, split_k=1, kind="scaled"))
        return seen["PTX"]

    seen = {}
    monkeypatch.setattr(TK, "_COMPILED", {})
    monkeypatch.setattr(TK, "_INTERPRET", False)
    monkeypatch.setattr(TK, "dashq_linear_kernel", FakeKernel())
    x = torch.randn(1, 128, dtype=torch.float16)
    assert launch(x) is False and seen["MODE"] == TK.MODES["scaled"]  # CPU tensor
    cuda_x = x.as_subclass(FakeCuda)
    assert launch(cuda_x) is True
    monkeypatch.setattr(TK, "_PTX_PLATFORM", False)  # ROCm
    assert launch(cuda_x) is False
    monkeypatch.setattr(TK, "_PTX_PLATFORM", True)
    monkeypatch.setattr(TK, "PTX_UNPACK", False)  # DASHQ_PTX_UNPACK=0
    assert launch(cuda_x) is False
    monkeypatch.delenv("DASHQ_PTX_UNPACK")
    importlib.reload(TK)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "kernels" / "tuned").glob("*.json")),
                         ids=lambda p: p.stem)
def test_committed_tuned_tables_load(path, monkeypatch):
    """Every committed per-GPU table (looked up by the GPU's name) loads into KernelConfigs with
    well-formed keys and launchable values; decode buckets hold decode kinds."""
    from dashq_vllm.kernels import configs as C

    monkeypatch.delenv("DASHQ_KERNEL_CONFIGS", raising=False)
    C.clear_cache()
    table = C.load_table(path.stem)
    C.clear_cache()
    assert len(table) == len(json.loads(path.read_text())) > 0
    for key, cfg in table.items():
        bits, group, bucket, n, k = (int(v) for v in key.split("/"))
        assert bits in (2, 3, 4, 8) and group in (32, 64, 128) and bucket in C.M_BUCKETS, key
        assert n > 0 and k % 128 == 0, key
        # tables tuned on older layouts may split K finer than today's K tiles: launch() caps it
        fitted = C.fit_config(cfg, K.padded_k(k, bits), group, bits, torch.float16)
        assert 1 <= fitted.split_k <= K.padded_k(k, bits) // K.k_tile(bits), (key, cfg)
        assert cfg.kind in ("dot", "scaled", "gemv", "hgemv", "wide", "dequant", "swap"), (key, cfg)
        assert cfg.block_n in (32, 64, 128, 256) and cfg.split_k >= 1 and cfg.num_warps in (1, 2, 4, 8, 16)
        if bucket <= C.DECODE_MAX_M:
            assert cfg.kind in ("dot", "scaled", "gemv", "hgemv"), (key, cfg)
        if cfg.kind == "gemv":
            assert bucket == 1, (key, cfg)  # one row per program: M = 1 only
        if cfg.kind == "hgemv":  # 1, 2 or 4 rows per program, up to M = 4
            assert bucket <= 4 and cfg.block_m in C.HGEMV_ROWS, (key, cfg)
        if cfg.kind == "hgemv":  # whole K tiles per flush; 2-4 bits (packed fp16 math)
            assert bits in (2, 3, 4) and cfg.block_k % K.k_tile(bits) == 0 and fitted.block_k == cfg.block_k, key


# (K, N) of Llama-3-8B's and -70B's layers -> the v11 H200 sweep at M = 1 (benchmarks/results/
# kernels_v11_sweep.json, CUDA graphs): (best of every swept config, {split_k: time of the "dot" kind with
# half_dq, 64 wide, 4 warps}) in us
M1_HALF_DQ_H200 = {
    2: {
        (4096, 6144): (11.2, {2: 13.0, 4: 11.2, 8: 12.0, 16: 15.2}),
        (4096, 4096): (8.9, {2: 10.2, 4: 8.9, 8: 9.3, 16: 11.5}),
        (4096, 28672): (31.2, {1: 33.4, 2: 31.2, 4: 33.7}),
        (14336, 4096): (18.5, {4: 19.0, 8: 18.5, 16: 19.8, 32: 23.5}),
        (8192, 10240): (24.5, {1: 36.5, 2: 28.2, 4: 24.5, 8: 26.0}),
        (8192, 8192): (20.8, {2: 21.5, 4: 20.8, 8: 22.0, 16: 25.7}),
        (8192, 57344): (101.8, {1: 101.8, 2: 102.8}),
        (28672, 8192): (55.4, {2: 62.2, 4: 56.7, 8: 55.4, 16: 57.1}),
    },
    3: {
        (4096, 6144): (13.6, {2: 15.1, 4: 13.6, 8: 16.1, 16: 16.1}),
        (4096, 4096): (10.3, {2: 10.6, 4: 10.3, 8: 13.4, 16: 13.5}),
        (4096, 28672): (39.8, {1: 41.0, 2: 39.8, 4: 44.4}),
        (14336, 4096): (22.1, {4: 22.1, 8: 25.7, 16: 26.2, 32: 32.1}),
        (8192, 10240): (30.9, {1: 40.0, 2: 32.9, 4: 30.9, 8: 33.3}),
        (8192, 8192): (24.4, {2: 24.4, 4: 25.7, 8: 28.3, 16: 37.2}),
        (8192, 57344): (124.9, {1: 124.9, 2: 127.8}),
        (28672, 8192): (68.3, {2: 68.3, 4: 69.0, 8: 68.9, 16: 74.1}),
    },
}


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (2, 32), (3, 32)])
def test_heuristic_m1_low_bit_picks(bits, group):
    """The heuristic's decode configs at 2/3 bits. Groups >= 64: the "dot" kind dequantizing in half
    precision, 64-wide tiles, >= HALF_DQ_MIN_TILES K tiles per program, the same at M = 1-16; its
    split is within 12% of the best config of the v11 H200 sweep on every 8B/70B layer. g32: the GEMV
    at M = 1 (>= LOW_BIT_MIN_K per program, 64-wide only when 128-wide tiles cannot fill the GPU) and
    the scaled kind at M = 16. An explicit block_n is kept; 4 bits keeps 128-wide scaled tiles."""
    from dashq_vllm.kernels import configs as C

    half = group >= 64
    for (k, n), (best, by_split) in M1_HALF_DQ_H200[bits].items():
        cfg = C.heuristic_config(1, n, k, bits, group, sms=132)
        if half:
            assert (cfg.kind, cfg.half_dq, cfg.block_m, cfg.block_n, cfg.num_warps) == ("dot", True, 16, 64, 4), cfg
            assert by_split[cfg.split_k] <= 1.12 * best, ((k, n), cfg.split_k, by_split)
            assert k // cfg.split_k >= C.HALF_DQ_MIN_TILES * K.k_tile(bits) or cfg.split_k == 1
        else:
            assert (cfg.kind, cfg.block_m) == ("gemv", 1), cfg
            assert k // cfg.split_k >= C.LOW_BIT_MIN_K or cfg.split_k == 1
        assert C.heuristic_config(1, n, k, bits, group, sms=132, block_n=128).block_n == 128
        m16 = C.heuristic_config(16, n, k, bits, group, sms=132)
        assert m16.kind == ("dot" if half else "scaled")
        if half:  # the same rule at M = 2-16
            assert m16 == cfg, ((k, n), m16)
    # a small layer (Qwen-1.5B's o_proj) still gets a legal config; 4 bits stays on the tensor cores
    small = C.heuristic_config(1, 1536, 1536, bits, group, sms=132)
    assert small.kind == ("dot" if half else "gemv") and small.split_k >= 1 and small.block_n in (64, 128)
    four = C.heuristic_config(1, 6144, 4096, 4, 128, sms=132)
    assert (four.kind, four.block_n, four.split_k, four.stream_k) == ("scaled", 128, 16, 0)


# the packed-fp16 GEMV at M = 1 on the H100 (v13 sweep, benchmarks/results/kernels_v13_sweep.json; the 70B gate_up
# shard, K x N = 8192 x 28672, from the v14 sweeps kernels_v14_sweep.json / kernels_v14b_sweep.json): (bits, K, N) ->
# (best hgemv config's us, {split_k: us} of the heuristic's tile: 64 wide, 4 warps, HGEMV_TILES K tiles per flush,
# prefetched at HGEMV_PREFETCH widths)
M1_HGEMV_H100 = {
    (4, 4096, 28672): (28.1, {1: 37.9, 2: 29.4}), (4, 8192, 10240): (24.1, {2: 37.2, 4: 25.3, 8: 26.9}),
    (4, 8192, 8192): (21.1, {2: 33.8, 4: 22.7, 8: 21.1}), (4, 8192, 57344): (92.0, {1: 98.3}),
    (4, 28672, 8192): (48.4, {2: 105.6, 4: 64.1, 8: 50.2}), (3, 4096, 28672): (33.5, {1: 38.1, 2: 35.3}),
    (3, 8192, 10240): (26.0, {2: 27.3, 4: 26.6}), (3, 8192, 8192): (21.5, {2: 22.3, 4: 23.9}),
    (3, 8192, 57344): (109.7, {1: 112.9}), (3, 28672, 8192): (55.7, {2: 63.4, 4: 67.5, 8: 55.7}),
    (2, 4096, 28672): (24.9, {1: 37.1, 2: 25.6}), (2, 8192, 10240): (21.8, {2: 38.7, 4: 24.2, 8: 25.0}),
    (2, 8192, 8192): (18.5, {2: 36.4, 4: 23.0, 8: 21.3}), (2, 8192, 57344): (81.1, {1: 82.9}),
    (2, 28672, 8192): (42.8, {2: 115.4, 4: 63.4, 8: 44.4}),
    (4, 8192, 28672): (50.0, {1: 72.4, 2: 52.7}), (3, 8192, 28672): (61.8, {1: 71.5, 2: 62.6}),
    (2, 8192, 28672): (44.7, {1: 71.3, 2: 45.6}),
}


@pytest.mark.parametrize("case", sorted(M1_HGEMV_H100))
def test_heuristic_m1_hgemv(case):
    """M = 1 with fp16 x on layers of >= HGEMV_MIN_N outputs: the packed-fp16 GEMV, 64 wide, 4 warps,
    HGEMV_TILES[bits] K tiles per flush, prefetched at HGEMV_PREFETCH widths, its split within 16% of the best swept
    hgemv config on the H100 (12% at 3/4 bits; 2 bits' worst is 70B o_proj, best 128 wide). Not
    for bf16 x (nor without a dtype, as the sweeps ask for other kinds' splits), at M = 2, on narrower layers
    (8B qkv/o/down, where the tensor-core kinds won), or at group sizes not swept for that width."""
    from dashq_vllm.kernels import configs as C

    bits, k, n = case
    group = 64 if bits == 2 else 128
    best, by_split = M1_HGEMV_H100[case]
    cfg = C.heuristic_config(1, n, k, bits, group, sms=132, dtype=torch.float16)
    assert (cfg.kind, cfg.block_m, cfg.block_n, cfg.num_warps) == ("hgemv", 1, 64, 4), cfg
    assert cfg.block_k == C.HGEMV_TILES[bits] * K.k_tile(bits)
    assert (cfg.num_stages == 2) == (bits in C.HGEMV_PREFETCH)  # num_stages 2: the words one K tile ahead
    assert by_split[cfg.split_k] <= (1.16 if bits == 2 else 1.12) * best, (case, cfg.split_k, by_split)
    for other in (C.heuristic_config(1, n, k, bits, group, sms=132, dtype=torch.bfloat16),
                  C.heuristic_config(1, n, k, bits, group, sms=132),
                  C.heuristic_config(2, n, k, bits, group, sms=132, dtype=torch.float16),
                  C.heuristic_config(1, 6144, k, bits, group, sms=132, dtype=torch.float16),
                  C.heuristic_config(1, n, k, bits, 32, sms=132, dtype=torch.float16),
                  C.heuristic_config(1, n, k, bits, 192 - group, sms=132, dtype=torch.float16)):
        assert other.kind != "hgemv", other
    # a K whose tile count HGEMV_TILES does not divide gets fewer tiles per flush
    odd = C.heuristic_config(1, n, 3 * K.k_tile(bits), bits, group, sms=132, dtype=torch.float16)
    assert odd.kind == "hgemv" and 3 * K.k_tile(bits) % odd.block_k == 0


def test_hgemv_table_entries_serve_fp16_only(monkeypatch):
    """A tuned table's hgemv entry (swept with fp16 x) is used for fp16 x; bf16 x gets the heuristic's config
    for bf16 instead (not the packed-fp16 kernel, and not the plain GEMV fallback of fit_config)."""
    from dashq_vllm.kernels import configs as C

    k, n, bits, group = 4096, 28672, 4, 128
    entry = C.KernelConfig(1, 128, split_k=4, group_m=1, kind="hgemv", block_k=512)
    monkeypatch.setattr(C, "load_table", lambda name: {C.config_key(bits, group, 1, n, k): entry})
    C._PICKED.clear()
    try:
        cpu = torch.device("cpu")
        assert C.pick_config(1, n, k, bits, group, cpu, torch.float16) == entry
        bf = C.pick_config(1, n, k, bits, group, cpu, torch.bfloat16)
        assert bf == C.fit_config(C.heuristic_config(1, n, k, bits, group, 132, dtype=torch.bfloat16), k, group,
                                  bits, torch.bfloat16)
        assert bf.kind == "scaled", bf
        monkeypatch.setenv("DASHQ_HGEMV", "0")  # the escape hatch: neither the table's entry nor the heuristic's
        C._PICKED.clear()
        off = C.pick_config(1, n, k, bits, group, cpu, torch.float16)
        assert off.kind != "hgemv" and off.kind == C.heuristic_config(1, n, k, bits, group, 132).kind, off
    finally:
        C._PICKED.clear()


def test_stream_k_configs_are_normalised_and_not_picked_yet():
    """KernelConfig.stream_k: fit_config keeps it only on dashq_linear_kernel's kinds, always with
    split_k 1 (the programs share all of K), and it makes a config atomic (zero-filled output). No
    heuristic pick or committed table entry uses it until a GPU check covers ranges that cross output
    tiles (KERNELS.md v11)."""
    import json

    from dashq_vllm.kernels import configs as C

    cfg = C.fit_config(C.KernelConfig(16, 128, split_k=4, kind="scaled", stream_k=96), 4096, 128, 4, torch.float16)
    assert (cfg.split_k, cfg.stream_k, cfg.atomic) == (1, 96, True)
    assert C.fit_config(C.KernelConfig(128, 128, kind="dequant", stream_k=96), 4096, 128, 4,
                        torch.float16).stream_k == 0
    assert not C.KernelConfig(16, 128).atomic and C.KernelConfig(16, 128, split_k=2).atomic
    for m in (1, 16, 64, 1024):
        for k, n in ((4096, 28672), (8192, 57344), (14336, 4096)):
            for bits, group in ((4, 128), (3, 128), (2, 64), (2, 32)):
                assert C.heuristic_config(m, n, k, bits, group, sms=132).stream_k == 0
    for path in sorted(C.TUNED_DIR.glob("*.json")):
        assert not any(v.get("stream_k") for v in json.loads(path.read_text()).values()), path


# the heuristic at mid M: the v9/v10 H200 sweeps' rule (benchmarks/results/kernels_v10_sweep.json; each
# within 12% of that shape's best swept config)
MID_M_H200 = {  # (bits, M, K, N) -> (kind, block_m, scaled, half_dq, split_k); KERNELS.md v9, v10
    (4, 64, 4096, 28672): ("swap", 64, False, True, 4), (4, 32, 14336, 4096): ("swap", 32, True, False, 16),
    (4, 128, 4096, 4096): ("swap", 128, False, True, 8), (2, 64, 4096, 28672): ("swap", 64, False, True, 4),
    (2, 128, 4096, 6144): ("swap", 128, False, True, 8), (3, 64, 14336, 4096): ("swap", 64, False, True, 16),
    (3, 32, 4096, 28672): ("scaled", 32, True, False, 1), (3, 32, 8192, 28672): ("scaled", 32, True, False, 1),
    (3, 128, 4096, 28672): ("swap", 64, False, True, 2), (3, 128, 4096, 4096): ("dequant", 128, True, False, 1),
    (4, 256, 4096, 28672): ("swap", 128, False, True, 2), (4, 256, 4096, 6144): ("dequant", 128, True, False, 1),
    (3, 256, 4096, 28672): ("dequant", 128, True, False, 1), (4, 512, 4096, 28672): ("dequant", 128, True, False, 1),
    (8, 64, 4096, 4096): ("dequant", 128, True, False, 1), (2, 256, 4096, 28672): ("dequant", 128, True, False, 1),
    (4, 256, 14336, 4096): ("swap", 128, False, True, 16),
}


@pytest.mark.parametrize("case", sorted(MID_M_H200))
def test_heuristic_mid_m(case):
    """Mid M: the swapped kind (32/64/128-token tiles, 64 at most at 3 bits; scaled only on 32-token
    ones, dequantized in fp16 on the others; split-K as at decode) up to M = 128 at 2/4 bits and 64 at
    3 bits, one M bucket further at 3/4 bits on layers of >= 50M weights; except 3-bit gate_up at
    M <= 32; then (and at 8 bits) dequantize + cuBLAS."""
    from dashq_vllm.kernels import configs as C

    bits, m, k, n = case
    cfg = C.heuristic_config(m, n, k, bits, 128 if bits != 2 else 64, sms=132)
    assert (cfg.kind, cfg.block_m, cfg.scaled, cfg.half_dq, cfg.split_k) == MID_M_H200[case], cfg
    if cfg.kind == "swap":
        assert cfg.block_n == 128 and cfg.num_warps == 8 and k // cfg.split_k >= C.LOW_BIT_MIN_K


@pytest.mark.parametrize("bits,block_m,stages", [(3, 128, 1), (2, 256, 1), (4, 256, 2), (3, 64, 2), (2, 128, 2)])
def test_swap_stages_fit_shared_memory(bits, block_m, stages):
    """configs.swap_stages keeps a swapped tile's pipelined x^T buffers inside an sm_90 SM's shared
    memory (232,448 bytes per block): at 2 stages 3 bits' 128-token tile needs 288 KB and 2 bits'
    256-token tile 271 KB (the v9 sweep lost 3 bits' 128-token candidates to OutOfResources)."""
    from dashq_vllm.kernels.configs import swap_stages

    assert swap_stages(bits, block_m) == stages
    k = _compile_sm90(bits, torch.float16, True, mode="dot", swap=True, block_m=block_m, num_warps=8,
                      num_stages=stages)
    assert k.metadata.shared <= 232448, (stages, k.metadata.shared)
    if stages > 1:  # the pipeline is kept where it fits (1 stage buffers no x^T tile)
        assert k.metadata.shared > 16 * 1024


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (sel >> 4 i) & 7 of {b, a}."""
    pool = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    return sum(((pool >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pair_unpack_asm_emulated(bits):
    """The arithmetic of _pair_operand's asm (prmt, shr, lop3 0xEA), emulated bit by bit for every
    chunk shift the scaled mode uses at this width on the committed layout (16 * c // R * bits):
    each 16-bit half of the result is MAGIC | ((word >> shift) & mask) of its own word, for any
    two words paired. (Triton's pairing and the PTX itself are checked on a GPU: bench_kernels.py
    check; the sm_90 compile test checks ptxas accepts it.)"""
    from dashq_vllm.kernels.layout import k_tile, plane_rows

    rows = plane_rows(bits, bits)
    assert rows >= 16  # one shift per 16-k chunk: what the one-shift asm form requires
    mask, g = (1 << bits) - 1, torch.Generator().manual_seed(bits)
    for magic in (0x6400, 0x4300):  # fp16 1024, bf16 128
        for c in range(k_tile(bits) // 16):
            shift = 16 * c // rows * bits
            assert shift % 16 + bits <= 16  # a code never straddles a 16-bit half
            sel = 0x5410 if shift < 16 else 0x7632
            for a, b in torch.randint(-2**31, 2**31, (64, 2), generator=g).tolist():
                t = _prmt(a, b, sel) >> (shift % 16)  # shr.b32: logical
                out = (t & (mask * 0x10001)) | (magic * 0x10001)  # lop3 0xEA: (t & mask2) | magic2
                want_lo = magic | (((a & 0xFFFFFFFF) >> shift) & mask)
                want_hi = magic | (((b & 0xFFFFFFFF) >> shift) & mask)
                assert (out & 0xFFFF, out >> 16) == (want_lo, want_hi), (c, shift, hex(a), hex(b))


def test_pair3_unpack_asm_emulated():
    """The 3-bit asm of _pair3_operand, emulated bit by bit for every chunk of the 512-k tile:
    prmt + shr of the 2-bit plane's pair, prmt + one shift (right by s - 2, or left by 2 - s) of the
    1-bit plane's pair, (u & 4) | magic, (t & 3) | u: each 16-bit half comes out as MAGIC | its own
    3-bit code, for any two words paired."""
    from dashq_vllm.kernels.layout import k_tile, plane_rows

    assert plane_rows(3, 2) == plane_rows(3, 1) == 16 and k_tile(3) == 512
    g = torch.Generator().manual_seed(3)
    for magic in (0x6400, 0x4300):
        for c in range(k_tile(3) // 16):
            s_lo, s_hi = 2 * (c % 16), c  # slot of chunk c in its 2-bit block / in the 1-bit block
            for la, lb, ha, hb in torch.randint(-2**31, 2**31, (32, 4), generator=g).tolist():
                t = _prmt(la, lb, 0x5410 if s_lo < 16 else 0x7632) >> (s_lo % 16)
                u = _prmt(ha, hb, 0x5410 if s_hi < 16 else 0x7632)
                sh = s_hi % 16
                u = (u >> (sh - 2)) if sh >= 2 else (u << (2 - sh)) & 0xFFFFFFFF
                u = (u & 0x00040004) | (magic * 0x10001)
                out = (t & 0x00030003) | u
                for half, lo_w, hi_w in ((0, la, ha), (1, lb, hb)):
                    code = (((lo_w & 0xFFFFFFFF) >> s_lo) & 3) | ((((hi_w & 0xFFFFFFFF) >> s_hi) & 1) << 2)
                    assert (out >> 16 * half) & 0xFFFF == magic | code, (c, half)
