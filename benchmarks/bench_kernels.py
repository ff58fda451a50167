"""GPU check and benchmark of dashq_vllm.kernels (issue 2). Run on the GPU machine:

    python benchmarks/bench_kernels.py --out $OUT [--sections info,check,bench,graph,sweep] [--quick]

Sections: ``info`` (device, measured copy bandwidth and matmul rate: the two ceilings);
``check`` (GPU correctness vs float64 for every bits x group x dtype x path, NaN-poisoned outputs,
CUDA-graph capture and torch.compile of the op); ``bench`` (the issue's shapes x M list: us, GB/s,
% of the memory floor, speedup over torch fp16 F.linear and, at 4 bits where vLLM is installed, over its
Machete kernel); ``graph`` (the same for the small
shapes at M <= 16 inside CUDA-graph replays); ``sweep`` (kernel variants/configs per shape and M
bucket; writes the tuned table ``tuned.json``). Results: ``$OUT/kernels.json`` (+ a log).
Timing: triton.testing.do_bench medians, inputs rotated over sets larger than 2x L2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 6144, "qkv"), (4096, 4096, "o"), (4096, 28672, "gate_up"), (14336, 4096, "down"),
          (8192, 28672, "70b_gate_up_shard")]
# Swept (``--sweep-shapes``) but not benchmarked: Llama-3-70B's whole layers, as in throughput.py's
# llama3-70b-20l stack, and Qwen2.5-(Coder-)1.5B's (K x N of qkv, o, gate_up, down)
SWEEP_EXTRA = [(8192, 10240, "70b_qkv"), (8192, 8192, "70b_o"), (8192, 57344, "70b_gate_up"),
               (28672, 8192, "70b_down"), (1536, 2048, "q15_qkv"), (1536, 1536, "q15_o"),
               (1536, 17920, "q15_gate_up"), (8960, 1536, "q15_down")]
LARGE = {"gate_up", "down", "70b_gate_up_shard"}
SMALL = {"qkv", "o"}
M_LIST = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
BIT_CONFIGS = [(4, 128), (3, 128), (2, 64)]
GRAPH_MAX_M = 256  # the "graph" section times M up to this inside CUDA-graph replays too (vLLM's decode graphs)


def parse_bit_configs(text: str) -> list[tuple[int, int]]:
    """"4:128,2:32" -> [(4, 128), (2, 32)]; empty -> BIT_CONFIGS."""
    if not text:
        return list(BIT_CONFIGS)
    out = []
    for item in text.split(","):
        bits, sep, group = item.partition(":")
        if not (sep and bits.isdigit() and group.isdigit()) or int(bits) not in (2, 3, 4, 8) \
                or int(group) not in (32, 64, 128):
            raise ValueError(f"--sweep-bits: {item!r} is not BITS:GROUP with BITS in 2/3/4/8 and GROUP in 32/64/128")
        out.append((int(bits), int(group)))
    return out


# vLLM's merged layers in the Llama / Qwen / Mistral families (packed_modules_mapping), and the
# row-parallel ones (K split under tensor parallelism)
MERGED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
ROW_PARALLEL = {"o_proj", "down_proj"}


def shapes_from_checkpoint(model_dir, tp: int = 1) -> list[tuple[int, int, str, int, int]]:
    """The distinct (K, N, name, bits, group) the kernels see when vLLM serves a DASH-Q checkpoint
    on ``tp`` GPUs: q/k/v and gate/up merged (the widest bits, the smallest group of the parts),
    column-parallel N and row-parallel K divided by ``tp``, K padded as the loader does."""
    from dashq_vllm.format import load_dashq_config

    cfg = load_dashq_config(model_dir)
    layers: dict[tuple[str, str], list] = {}
    for name, spec in cfg.modules.items():
        parent, _, leaf = name.rpartition(".")
        layers.setdefault((parent, MERGED.get(leaf, leaf)), []).append(spec)
    out = set()
    for (_, layer), specs in layers.items():
        bits, group = max(sp.nbits for sp in specs), min(sp.group_size for sp in specs)
        k_in, n = specs[0].in_features, sum(sp.out_features for sp in specs)
        k_real = -(-k_in // group) * group  # unsplit K: whole groups, as the loader pads it
        if layer in ROW_PARALLEL and tp > 1:
            if k_in % (tp * group):
                raise ValueError(f"{layer}: {k_in} input features cannot be split into {tp} whole groups of {group}")
            k_real = k_in // tp
        elif layer not in ROW_PARALLEL:
            if n % tp:
                raise ValueError(f"{layer}: {n} outputs cannot be split over {tp} GPUs")
            n //= tp
        out.add((K.padded_k(k_real, bits), n, layer, bits, group))
    return sorted(out, key=lambda t: (t[3], t[4], t[2], t[0], t[1]))


def import_kernels():
    """dashq_vllm.kernels as installed (on the GPU machine: whichever site is first on PYTHONPATH,
    so kernels-ab's old site really is the old code), else this checkout's own kernels/. The checkout
    must not be put in front: its dashq_vllm/ lacks the mapped subpackages, so the import would fall
    through to the checkout's kernels/ whatever is installed (kernels-ab timed the new code twice on
    2026-12-02 because of that)."""
    try:
        import dashq_vllm.kernels as K

        return K
    except ImportError:
        sys.path.insert(0, str(ROOT))
        spec = importlib.util.spec_from_file_location("dashq_vllm.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["dashq_vllm.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


K = import_kernels()
from dashq_vllm.kernels.configs import KernelConfig, config_key, heuristic_config, save_table  # noqa: E402
from dashq_vllm.kernels.triton_kernels import triton_linear  # noqa: E402

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

LOG_PATH = None
REFINE = False  # --refine: decode sweeps try register caps around the committed picks
WIDE_ONLY = False  # --wide: GEMM sweeps time the "wide" kernel against dequant + cuBLAS
SWEEP_KINDS = frozenset()  # --sweep-kinds: decode sweeps time only these kinds (and the committed pick)
HGEMV_COLS = os.environ.get("DECODE_HGEMV_COLS", "1") != "0"  # hgemv sweeps try two column blocks per program


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    if LOG_PATH is not None:
        with open(LOG_PATH, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _no_flush(*args, **kwargs):
    return None


def bench_ms(fn, rep=40):
    """do_bench median. Its L2 flush (a 256 MB memset before each call) is disabled: it leaves
    L2 full of dirty lines whose write-back the next kernel pays (up to ~17 us at 3 TB/s); the
    inputs rotate over sets larger than 2x L2 instead."""
    from triton import runtime

    drv = runtime.driver.active
    saved = drv.clear_cache
    drv.clear_cache = _no_flush
    try:
        return do_bench(fn, warmup=10, rep=rep, return_mode="median")
    finally:
        drv.clear_cache = saved


# --------------------------------------------------------------------------- ceilings


def measure_info(dev):
    p = torch.cuda.get_device_properties(dev)
    info = {"gpu": p.name, "sms": p.multi_processor_count, "l2_bytes": getattr(p, "L2_cache_size", 50 << 20),
            "torch": torch.__version__, "triton": triton.__version__, "ptx_unpack": K.triton_kernels.PTX_UNPACK,
            "kernel_configs": os.environ.get("DASHQ_KERNEL_CONFIGS")}
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    a.random_()
    t = bench_ms(lambda: b.copy_(a), rep=100)
    info["copy_bw_GBps"] = 2 * n / (t * 1e-3) / 1e9
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(8192, 8192, dtype=dt, device=dev)
        w = torch.randn(8192, 8192, dtype=dt, device=dev)
        t = bench_ms(lambda: F.linear(x, w), rep=100)
        info[f"matmul_{str(dt)[6:]}_TFLOPs"] = 2 * 8192**3 / (t * 1e-3) / 1e12
    log("info", json.dumps(info))
    return info


# --------------------------------------------------------------------------- parallel compile


def _compile_one(job):
    """Worker: launch a config once on small tensors, so Triton's disk cache holds its binary
    (the int arguments keep the divisibility-by-16 of the real shapes, so the key matches)."""
    bits, group, dtype_name, cfg_dict, has_bias, n, k, kx = job
    import_kernels()
    from dashq_vllm.kernels.triton_kernels import launch as _launch

    dt = getattr(torch, dtype_name)
    qw = torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), dtype=torch.int32, device="cuda")
    s = torch.full((k // group, n), 0.01, dtype=torch.float16, device="cuda")
    x = torch.randn(16, kx, device="cuda").to(dt)
    y = torch.zeros(16, n, device="cuda", dtype=dt)
    b = torch.zeros(n, device="cuda", dtype=dt) if has_bias else None
    cfg = KernelConfig(**cfg_dict)
    t = time.time()
    try:
        _launch(x, qw, s, -s, b, y, bits, group, n, k, cfg)
        torch.cuda.synchronize()
    except Exception:  # reported when the main process meets the config
        return -1.0
    return time.time() - t


def _spec_class(v):
    """What Triton specialises an int argument on: == 1, divisible by 16, or neither."""
    return 1 if v == 1 else (16 if v % 16 == 0 else 17)


def precompile(jobs, workers=12):
    """Compile (bits, group, dtype, KernelConfig, has_bias, n, k, kx) jobs in parallel processes,
    one per distinct binary (ints reduced to their specialisation class)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    uniq = {}
    for b, g, d, c, hb, n, k, kx in jobs:
        key = (b, g, str(d).replace("torch.", ""), tuple(sorted(c.__dict__.items())), hb,
               _spec_class(n), _spec_class(kx))
        uniq.setdefault(key, (n, k, kx))
    jobs = [(b, g, d, dict(c), hb, *uniq[(b, g, d, c, hb, sn, skx)]) for b, g, d, c, hb, sn, skx in uniq]
    t = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        times = list(ex.map(_compile_one, jobs))
    log(f"precompiled {len(jobs)} kernels in {time.time() - t:.0f}s (max {max(times):.0f}s each)")


# --------------------------------------------------------------------------- correctness


def random_checkpoint(bits, group, n, k_in, dev, seed):
    from dashq_vllm import format as Fm

    g = torch.Generator(device="cpu").manual_seed(seed)
    spec = Fm.ModuleSpec.create(k_in, n, bits, group)
    codes = torch.randint(0, 1 << bits, (n, spec.quant_in_features), generator=g)
    scale = torch.rand(n, spec.groups_per_row, generator=g) * 0.05 + 0.005
    zero = torch.rand(n, spec.groups_per_row, generator=g) * ((1 << bits) - 1)
    t = {k: v.to(dev) for k, v in Fm.encode_linear(codes, scale, zero, spec).items()}
    w64 = Fm.dequantize(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float64)
    return spec, t, w64


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def check_case(kw, w64, x, bias, cfg):
    """Run one config with the output NaN-poisoned (zero-filled under split-K, whose contract that
    is) plus NaN guard columns; return (rel err, ok)."""
    from dashq_vllm.kernels.configs import fit_config
    from dashq_vllm.kernels.triton_kernels import launch

    m = x.shape[0]
    y_full = torch.full((m, kw.n + 8), float("nan"), dtype=x.dtype, device=x.device)
    y = y_full[:, : kw.n]
    cfg = fit_config(cfg, kw.k, kw.group_size, kw.bits, x.dtype) if cfg is not None else None
    if cfg is None:
        y.copy_(K.linear(x, kw, bias))
    else:
        if cfg.atomic:
            y.zero_()
        launch(x, kw.qweight, kw.scales, kw.szeros, bias, y, kw.bits, kw.group_size, kw.n, kw.k, cfg)
    ref = x.double() @ w64.t() + (0 if bias is None else bias.double())
    err = rel_err(y, ref)
    ok = bool(torch.isnan(y_full[:, kw.n:]).all()) and bool(torch.isfinite(y).all()) and err <= 1e-2
    return err, ok


VARIANTS = {  # every kernel kind, each on the M it is meant for
    "decode-dot-split4": (16, KernelConfig(16, 64, split_k=4, group_m=1)),
    "decode-scaled": (5, KernelConfig(16, 128, split_k=4, group_m=1, kind="scaled")),
    "gemv": (2, KernelConfig(1, 64, split_k=4, kind="gemv")),
    "gemm-scaled": (33, KernelConfig(64, 128, num_warps=4, num_stages=3, kind="scaled")),
    "gemm-dot-128": (300, KernelConfig(128, 128, num_warps=8, num_stages=3)),
    "wide-128": (300, KernelConfig(128, 128, num_warps=8, num_stages=3, kind="wide")),
    "wide-dot-64": (33, KernelConfig(64, 128, num_warps=4, num_stages=3, kind="wide", scaled=False)),
    "swap-decode": (5, KernelConfig(16, 64, split_k=4, group_m=1, kind="swap")),
    "swap-64": (70, KernelConfig(64, 128, split_k=2, num_warps=4, num_stages=2, kind="swap")),
    "swap-dot-128": (200, KernelConfig(128, 64, num_warps=4, num_stages=2, kind="swap", scaled=False)),
    "swap-dot-256": (300, KernelConfig(256, 128, num_warps=8, num_stages=1, kind="swap", scaled=False)),
    "swap-dot-half-128": (200, KernelConfig(128, 64, num_warps=4, num_stages=2, kind="swap", scaled=False,
                                            half_dq=True)),
    "decode-dot-half": (5, KernelConfig(16, 64, split_k=4, group_m=1, kind="dot", half_dq=True)),
    # 12 programs share CHECK_N's 8 (128 wide) or 16 (64 wide) output tiles x CHECK_K's 4 (3 bits) to 16 (4 bits)
    # K tiles, 2.7-21 iterations each: 4-12 of the ranges cross an output tile at every width (the v11 check
    # ran 96 programs, where ranges crossed only at 4 bits and in 2-bit dot-half)
    "stream-k-scaled": (5, KernelConfig(16, 128, group_m=1, kind="scaled", stream_k=12)),
    "stream-k-dot-half": (16, KernelConfig(16, 64, group_m=1, kind="dot", half_dq=True, stream_k=12)),
    # the packed-fp16 GEMV (fp16 x; bf16 falls back): 4 / 2 / 1 K tiles per flush at 4 / 2 / 3 bits on CHECK_K, one
    # row and three rows (one program per row and tile)
    "hgemv": (1, KernelConfig(1, 128, split_k=4, kind="hgemv", block_k=512)),
    "hgemv-m3": (3, KernelConfig(1, 64, split_k=2, kind="hgemv", block_k=1024)),
    "hgemv-prefetch": (1, KernelConfig(1, 64, split_k=2, kind="hgemv", block_k=512, num_stages=2)),
    # v13, on CHECK_EVEN (the tile divides N, x exactly K wide: no masks, group rows read as packed column pairs):
    # one row, the prefetch, 2 rows per program, and 3 rows in a program of 4 (one row past M)
    "hgemv-even": (1, KernelConfig(1, 64, split_k=4, kind="hgemv", block_k=512)),
    "hgemv-prefetch-even": (1, KernelConfig(1, 64, split_k=2, kind="hgemv", block_k=1024, num_stages=2)),
    "hgemv-rows2-even": (2, KernelConfig(2, 64, split_k=4, kind="hgemv", block_k=512)),
    "hgemv-rows4-m3-even": (3, KernelConfig(4, 128, split_k=2, kind="hgemv", block_k=512, num_stages=2)),
    # v14: two column blocks per program (cols 2), on CHECK_N (the last program's second block past N) and even
    "hgemv-cols2": (2, KernelConfig(1, 64, split_k=2, kind="hgemv", block_k=512, cols=2)),
    "hgemv-cols2-even": (1, KernelConfig(1, 64, split_k=4, kind="hgemv", block_k=512, cols=2)),
    "hgemv-cols2-prefetch-even": (1, KernelConfig(1, 64, split_k=2, kind="hgemv", block_k=1024, num_stages=2,
                                                  cols=2)),
}


CHECK_N, CHECK_K, CHECK_KX = 1000, 2048, 2041  # N, x's width not multiples of 16; K padded
CHECK_EVEN = (1024, 2048)  # (N, x's width) of the "-even" variants: multiples of every tile


def check_plan(quick=False, bits_list=(2, 3, 4, 8)):
    """(bits, group, dtype, has_bias, [(name, m, cfg)]): the default decode (M=1, 16) and GEMM
    (M=300) paths for every bits (of bits_list) x group x dtype; every variant for bits 2-4 x group
    64/128. quick: groups 32 and 128, variants at 4 bits g128 only."""
    n, k = CHECK_N, CHECK_K
    for bits in bits_list:
        for group in ((32, 128) if quick else (32, 64, 128)):
            for dt in (torch.float16, torch.bfloat16):
                has_bias = (bits % 2 == 0) == (dt == torch.float16)
                cases = [(f"default-m{m}", m, None) for m in (1, 16, 300)]
                if (bits, group) == (4, 128) or (not quick and bits != 8 and group != 32):
                    cases += [(name, m, cfg) for name, (m, cfg) in VARIANTS.items()]
                cases = [(name, m, cfg if cfg is not None else
                          K.configs.pick_config(m, n, k, bits, group, torch.device("cuda"), dt))
                         for name, m, cfg in cases]
                if bits == 4 and group == 128:
                    cases.append(("dequant-cublas", 300, KernelConfig(128, 128, kind="dequant")))
                    cases.append(("dequant-nk-cublas", 300, KernelConfig(128, 128, kind="dequant", nk=True)))
                yield bits, group, dt, has_bias, [(name, m, cfg, *check_shape(name)) for name, m, cfg in cases]


def check_shape(name):
    """(N, x's width) a check case runs on."""
    return CHECK_EVEN if name.endswith("-even") else (CHECK_N, CHECK_KX)


def run_checks(dev, quick=False, bits_list=(2, 3, 4, 8), paths=frozenset()):
    """check_plan() (only the named paths, if any) on fresh random data against float64; outputs
    NaN-poisoned."""
    from dashq_vllm.kernels.configs import fit_config

    plan = [(b, g, dt, hb, [c for c in cases if not paths or c[0] in paths])
            for b, g, dt, hb, cases in check_plan(quick, bits_list)]
    plan = [p for p in plan if p[4]]
    if not plan:
        raise ValueError(f"--check-paths {sorted(paths)}: no such path in the check plan")
    precompile([(b, g, dt, fit_config(cfg, CHECK_K, g, b, dt), hb, n, CHECK_K, kx)
                for b, g, dt, hb, cases in plan for _, _, cfg, n, kx in cases])
    results, n_bad = [], 0
    for bits, group, dt, has_bias, cases in plan:
        layers = {}
        for name, m, cfg, n, kx in cases:
            if (n, kx) not in layers:
                spec, t, w64 = random_checkpoint(bits, group, n, kx, dev, seed=bits * 100 + group + len(layers))
                layers[n, kx] = (K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, dt, dev), w64,
                                 torch.randn(n, device=dev).to(dt) if has_bias else None)
            kw, w64, bias = layers[n, kx]
            err, ok = 0.0, True
            for _ in range(2):  # the second launch takes the cached-kernel fast path
                x = torch.randn(m, kx, device=dev).to(dt)
                e, o = check_case(kw, w64, x, bias, cfg)
                err, ok = max(err, e), ok and o
            n_bad += not ok
            results.append(dict(bits=bits, group=group, dtype=str(dt), m=m, path=name, err=err, ok=ok))
            if not ok:
                log(f"CHECK FAIL bits={bits} g={group} {dt} m={m} {name} err={err}")
    worst = max(r["err"] for r in results)
    log(f"check: {len(results)} cases, {n_bad} failed, worst rel err {worst:.2e}")
    for dt in (torch.float16, torch.bfloat16):
        w = [r["err"] for r in results if r["dtype"] == str(dt)]
        log(f"  {dt}: median rel err {sorted(w)[len(w) // 2]:.2e}, max {max(w):.2e}")
    return {"cases": results, "failed": n_bad, "worst": worst, "graph": check_graph(dev),
            "compile": check_compile(dev)}


def check_graph(dev):
    """Capture the op (decode with split-K, and GEMM) in a CUDA graph; replay on new inputs."""
    out = {}
    for m in (1, 64):
        spec, t, w64 = random_checkpoint(3, 128, 4096, 4096, dev, seed=m)
        kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.bfloat16, dev)
        x = torch.randn(m, 4096, device=dev).to(torch.bfloat16)
        for _ in range(2):
            K.linear(x, kw)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = K.linear(x, kw)
        x.copy_(torch.randn(m, 4096, device=dev))
        g.replay()
        torch.cuda.synchronize()
        err = rel_err(y, x.double() @ w64.t())
        out[f"m{m}"] = err
        log(f"graph replay m={m}: rel err {err:.2e}")
    return out


def check_compile(dev):
    try:
        spec, t, w64 = random_checkpoint(4, 128, 512, 1024, dev, seed=5)
        kw = K.repack(t["W_q_packed"], t["scale"], t["zero"], spec, torch.float16, dev)
        f = torch.compile(lambda x: torch.relu(K.linear(x, kw)), fullgraph=True)
        x = torch.randn(4, 1024, device=dev).to(torch.float16)
        err = rel_err(f(x), torch.relu(x.double() @ w64.t()))
        log(f"torch.compile(fullgraph) of the op: rel err {err:.2e}")
        return err
    except Exception as e:
        log("torch.compile check failed:", repr(e)[:500])
        return repr(e)[:500]


# --------------------------------------------------------------------------- benchmark


def sets_over_l2(set_bytes, l2):
    """How many rotating sets of set_bytes each to cycle through so they span over 2x L2 (at least 2)."""
    return max(2, math.ceil(2 * l2 / set_bytes) + 1)


class Weights:
    """Rotating random weight sets of one (K, N, bits, group), over 2x L2 in total."""

    def __init__(self, k, n, bits, group, dev, l2, dtype=torch.float16):
        self.k, self.n, self.bits, self.group = k, n, bits, group
        self.bytes = k * bits // 32 * n * 4 + 2 * (k // group) * n * 2
        self.count = sets_over_l2(self.bytes, l2)
        self.sets = []
        for _ in range(self.count):
            qw = torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), dtype=torch.int32, device=dev)
            s = (torch.rand(k // group, n, device=dev) * 0.01 + 1e-3)
            z = -torch.rand(k // group, n, device=dev) * ((1 << bits) - 1) * s
            self.sets.append(K.KernelWeights(qw, s.half(), z.half(), bits, group, n, k, k))
        assert k % K.k_tile(bits) == 0


class Dense:
    def __init__(self, k, n, dev, l2, dtype=torch.float16):
        self.bytes = k * n * 2
        self.count = sets_over_l2(self.bytes, l2)
        self.sets = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(self.count)]


class Machete:
    """vLLM 0.26's own 4-bit kernel on Hopper, the one it serves GPTQ 4-bit checkpoints with: rotating
    random uint4b8 (symmetric, fp16 scales per group, no zeros) weight sets of one (K, N), prepacked
    as vLLM's MacheteLinearKernel does, over 2x L2 in total."""

    def __init__(self, k, n, group, dev, l2):
        from vllm import _custom_ops as ops
        from vllm.scalar_type import scalar_types

        self.ops, self.type, self.k, self.group = ops, scalar_types.uint4b8, k, group
        self.bytes = k * n // 2 + (k // group) * n * 2
        self.count = sets_over_l2(self.bytes, l2)
        self.sets = []
        for _ in range(self.count):
            qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=dev)
            qw = ops.machete_prepack_B(qw.t().contiguous().t(), a_type=torch.float16, b_type=self.type,
                                       group_scales_type=torch.float16)
            s = (torch.rand(k // group, n, device=dev) * 0.01 + 1e-3).half()
            self.sets.append((qw, s))

    @staticmethod
    def available():
        """(usable, why not): vLLM's compiled Machete ops on an sm_90 GPU."""
        try:
            from vllm import _custom_ops  # noqa: F401
        except Exception as e:  # no vLLM bundle on this machine
            return False, f"vllm not importable: {e!r}"[:200]
        if not hasattr(torch.ops._C, "machete_mm"):
            return False, "this vLLM build has no machete_mm"
        if torch.cuda.get_device_capability() != (9, 0):
            return False, "Machete needs sm_90"
        return True, ""


def machete_fns(Mc, m):
    xs = [torch.randn(m, Mc.k, device="cuda", dtype=torch.float16) for _ in range(Mc.count)]
    return [lambda x=x, w=w: Mc.ops.machete_mm(a=x, b_q=w[0], b_type=Mc.type, b_group_scales=w[1],
                                                b_group_size=Mc.group) for x, w in zip(xs, Mc.sets)]


def rotating(fns):
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return call


def quant_fns(W, m, dtype=torch.float16, cfg=None):
    xs = [torch.randn(m, W.k, device="cuda", dtype=dtype) for _ in range(W.count)]
    if cfg is None:
        return [lambda x=x, w=w: K.linear(x, w) for x, w in zip(xs, W.sets)]
    return [lambda x=x, w=w: triton_linear(x, w.qweight, w.scales, w.szeros, w.bits, w.group_size, w.n, w.k, cfg=cfg)
            for x, w in zip(xs, W.sets)]


def dense_fns(D, m, k):
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(D.count)]
    return [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, D.sets)]


def graph_ms(fns, reps=8):
    """Per-call time of the calls captured back to back in one CUDA graph (median of replays)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / (reps * len(fns)))
    del g
    return sorted(times)[len(times) // 2]


def bench_rel_err(W, m):
    """Relative error of the benchmarked pick on the real shape (set 0) vs a float64 product."""
    w = W.sets[0]
    x = torch.randn(m, W.k, device="cuda", dtype=torch.float16)
    y = K.linear(x, w)
    dense = K.dequantize_kernel_weight(w.qweight, w.scales, w.szeros, w.bits, w.group_size, torch.float64)
    ref = x.double() @ dense.t()
    return rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("nan")


def io_bytes(W, m):
    return W.bytes + m * W.k * 2 + m * W.n * 2


def run_bench(dev, info, m_list, bit_configs, shapes, with_graph):
    bw = info["copy_bw_GBps"] * 1e9
    l2 = info["l2_bytes"]
    rows, fp16_ms, fp16_graph = [], {}, {}
    with_machete, why = Machete.available()
    if not with_machete:
        log(f"bench: no Machete column ({why})")
    for k, n, name in shapes:
        D = Dense(k, n, dev, l2)
        for m in m_list:
            fp16_ms[(name, m)] = bench_ms(rotating(dense_fns(D, m, k)))
            if with_graph and m <= GRAPH_MAX_M:
                fp16_graph[(name, m)] = graph_ms(dense_fns(D, m, k))
        del D
        for bits, group in bit_configs:
            W = Weights(k, n, bits, group, dev, l2)
            mc = None
            if with_machete and bits == 4:
                try:
                    mc = Machete(k, n, group, dev, l2)
                except Exception as e:  # a shape or group Machete does not take: the row goes without it
                    log(f"bench: Machete {name} g{group}: {e!r}"[:300])
            for m in m_list:
                cfg = K.configs.pick_config(m, n, k, bits, group, torch.device(dev))
                t = bench_ms(rotating(quant_fns(W, m)))
                floor = io_bytes(W, m) / bw * 1e3
                flops_floor = 2 * m * n * k / (info["matmul_float16_TFLOPs"] * 1e12) * 1e3
                row = dict(shape=name, k=k, n=n, bits=bits, group=group, m=m, us=t * 1e3,
                           GBps=io_bytes(W, m) / (t * 1e-3) / 1e9, floor_us=floor * 1e3,
                           pct_floor=100 * floor / t, flops_floor_us=flops_floor * 1e3,
                           fp16_us=fp16_ms[(name, m)] * 1e3, speedup=fp16_ms[(name, m)] / t, config=cfg.__dict__)
                if with_graph and m <= GRAPH_MAX_M:
                    tg = graph_ms(quant_fns(W, m))
                    row.update(graph_us=tg * 1e3, fp16_graph_us=fp16_graph[(name, m)] * 1e3,
                               graph_speedup=fp16_graph[(name, m)] / tg, graph_pct_floor=100 * floor / tg)
                if mc is not None:  # speedups over Machete: > 1 means ours is faster
                    tm = bench_ms(rotating(machete_fns(mc, m)))
                    row.update(machete_us=tm * 1e3, vs_machete=tm / t)
                    if "graph_us" in row:
                        tmg = graph_ms(machete_fns(mc, m))
                        row.update(machete_graph_us=tmg * 1e3, graph_vs_machete=tmg / tg)
                if m <= 16 or m in (64, 256, 1024):
                    row["rel_err"] = bench_rel_err(W, m)
                rows.append(row)
                log(f"bench {name:>17} {bits}b g{group:<3} M={m:<5} {row['us']:9.1f} us {row['GBps']:7.0f} GB/s "
                    + (f"err {row['rel_err']:.1e} " if "rel_err" in row else "")
                    +
                    f"{row['pct_floor']:5.1f}% floor  x{row['speedup']:5.2f} fp16"
                    + (f"  graph {row['graph_us']:7.1f} us x{row['graph_speedup']:5.2f}" if "graph_us" in row else "")
                    + (f"  machete {row['machete_us']:7.1f} us x{row['vs_machete']:5.2f}"
                       if "machete_us" in row else "")
                    + (f" graph {row['machete_graph_us']:7.1f} us x{row['graph_vs_machete']:5.2f}"
                       if "machete_graph_us" in row else ""))
            del W, mc
            torch.cuda.empty_cache()
    return rows


def measure_overhead(dev):
    """Host cost per call (us) of each layer, on a 4096x4096 4-bit g128 layer at M = 1: a loop of
    2000 calls is host-bound when the host cost exceeds the ~10 us of GPU time."""
    from dashq_vllm.kernels.triton_kernels import launch

    k = n = 4096
    W = Weights(k, n, 4, 128, dev, 0)
    w = W.sets[0]
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    dense = torch.randn(n, k, device=dev, dtype=torch.float16)
    y = torch.zeros(1, n, device=dev, dtype=torch.float16)
    cfg = K.configs.pick_config(1, n, k, 4, 128, torch.device(dev))
    layers = {
        "F.linear fp16": lambda: F.linear(x, dense),
        "torch.ops.dashq.linear": lambda: K.linear(x, w),
        "triton_linear (no op layer)": lambda: triton_linear(x, w.qweight, w.scales, w.szeros, 4, 128, n, k),
        "launch (no alloc, no op)": lambda: launch(x, w.qweight, w.scales, w.szeros, None, y, 4, 128, n, k, cfg),
        "torch.zeros(1, n)": lambda: torch.zeros(1, n, device=dev, dtype=torch.float16),
    }
    out = {}
    for name, f in layers.items():
        for _ in range(50):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            f()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t) / 2000 * 1e6
        log(f"host overhead {name:>30}: {out[name]:6.1f} us/call")
    return out


# --------------------------------------------------------------------------- variant sweep


def refine_candidates(m, n, k, bits, group, sms):
    """Around the committed pick of a decode M: register caps (occupancy) and a narrower tile."""
    from dataclasses import replace

    base = K.configs.pick_config(m, n, k, bits, group, torch.device("cuda"))
    yield base
    for cfg in (base, replace(base, block_n=64, split_k=base.split_k * 2)):
        for reg in (96, 80, 72):
            yield replace(cfg, maxnreg=reg)


def decode_candidate(kind, block_n, warps, **fields):
    """A decode sweep config of a candidate kind name ("dot-half": the dot kind with half_dq)."""
    return KernelConfig(1 if kind == "gemv" else 16, block_n, group_m=1, num_warps=warps, num_stages=3,
                        kind=kind.replace("-half", ""), half_dq=kind == "dot-half", **fields)


def hgemv_candidates(m, n, k, bits, group, sms):
    """The packed-fp16 GEMV (M <= 4): tile widths and warps, 1/2/4 K tiles per flush, split-K to ~2/4/8 programs per
    SM (at most one per super tile), with and without the one-tile prefetch (num_stages 3 / 2); at M = 2 / 4 the
    rows per program (M, or half of M: twice the programs) on 64/128-wide tiles of 4 warps; at M = 1 and 2/4 bits
    also two column blocks per program (HGEMV_COLS: DECODE_HGEMV_COLS=0 leaves them out)."""
    tile = K.k_tile(bits)
    rows_list = (1,) if m == 1 else (m, m // 2)
    widths = ((64, 4, 1), (128, 4, 1), (128, 8, 1), (256, 8, 1)) if m == 1 else ((64, 4, 1), (128, 4, 1))
    if m == 1 and bits != 3 and HGEMV_COLS:  # v14: two column blocks per program (3 bits: spills)
        widths += ((64, 4, 2), (64, 8, 2), (128, 8, 2))
    for rows in rows_list:
        for bn, warps, cols in widths:
            for tt in (1, 2, 4):
                supers = k // tile // tt
                if supers == 0 or (k // tile) % tt:
                    continue
                programs = -(-n // (bn * cols)) * (m // rows)
                splits = {min(supers, max(1, 2 ** round(math.log2(per_sm * sms / programs)))) for per_sm in (2, 4, 8)}
                for sk in sorted(splits):
                    for stages in (3, 2):  # without / with the one-tile prefetch
                        yield KernelConfig(rows, bn, split_k=sk, group_m=1, num_warps=warps, num_stages=stages,
                                           kind="hgemv", block_k=tt * tile, cols=cols)


def sweep_candidates(m, n, k, bits, group, sms):
    """Kernel kinds x tile shapes to time for one (shape, M); split-K from the heuristic."""
    if REFINE and m <= 16:
        yield from refine_candidates(m, n, k, bits, group, sms)
        return
    if SWEEP_KINDS and m <= 16:
        yield K.configs.pick_config(m, n, k, bits, group, torch.device("cuda"))
        if "hgemv" in SWEEP_KINDS and m in (1, 2, 4):
            yield from hgemv_candidates(m, n, k, bits, group, sms)
        return
    if m <= 16:
        cands = [("scaled", bn, w) for bn in (64, 128, 256) for w in (4, 8)]
        cands += [("dot", 128, 4), ("dot", 256, 8), ("swap", 64, 4), ("swap", 128, 4)]
        cands += [("dot-half", 64, 4), ("dot-half", 128, 4), ("dot-half", 128, 8), ("dot-half", 256, 8)]
        if m == 1:
            cands += [("gemv", 64, 4), ("gemv", 128, 4), ("gemv", 128, 8)]
        for kind, bn, warps in cands:
            split = heuristic_config(m, n, k, bits, group, sms, block_n=bn).split_k
            # the tensor-core decode kinds also try half and twice the split (tail waves, KERNELS.md v11)
            splits = {max(1, split // 4), split}
            if kind in ("scaled", "dot-half"):
                splits |= {max(1, split // 2), split * 2}
            for sk in sorted(splits):
                yield decode_candidate(kind, bn, warps, split_k=sk)
        # stream-K (KERNELS.md v11): 2-8 programs per SM share every (tile, K tile) iteration
        for kind, bn, per_sm in [("scaled", 128, p) for p in (2, 3, 4)] + [("scaled", 64, p) for p in (4, 6)] + \
                [("dot-half", 64, p) for p in (4, 6, 8)] + [("dot-half", 128, p) for p in (4, 6)]:
            yield decode_candidate(kind, bn, 4, stream_k=per_sm * sms)
    elif WIDE_ONLY:  # v5: the "wide" GEMM (one dot per BLOCK_K step) against dequant + cuBLAS
        yield KernelConfig(128, 128, kind="dequant")
        tiles = ((32, 128, 4), (64, 64, 4), (64, 128, 4)) if m <= 64 else \
            ((64, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8))
        for bm, bn, warps in tiles:
            for bk in sorted({min(64, group), min(128, group)}):
                yield KernelConfig(bm, bn, num_warps=warps, num_stages=3, kind="wide", block_k=bk)
        yield KernelConfig(64, 128, num_warps=4, num_stages=3, kind="wide", scaled=False)
    else:
        yield KernelConfig(128, 128, kind="dequant")
        yield KernelConfig(128, 128, kind="dequant", nk=True)  # cuBLAS on F.linear's layout
        yield from swap_candidates(m, n, k, bits, group, sms)
        for bm, bn, warps, kind in ((16, 128, 4, "scaled"), (32, 128, 4, "scaled"), (32, 128, 4, "dot"),
                                    (64, 128, 4, "dot"), (128, 128, 8, "dot"), (128, 256, 8, "dot"),
                                    (64, 128, 4, "scaled"), (128, 128, 8, "scaled"), (128, 256, 8, "scaled")):
            if max(64, 2 * m) >= bm >= min(32, m) // 2 and m < 4096:  # M=4096: dequant + cuBLAS or the best GEMM of M=1024
                yield KernelConfig(bm, bn, num_warps=warps, num_stages=3, kind=kind)
        if m >= 4096:
            yield KernelConfig(128, 256, num_warps=8, num_stages=3, kind="dot")


def swap_candidates(m, n, k, bits, group, sms):
    """Mid-M configs of the swapped kind (weights as the dot's first operand, KERNELS.md "Mid M"):
    token tiles of 32 (M <= 64), 64 and 128 (M >= 64), 256 (M >= 256), 64/128 weight rows, scaled after
    the dot (token tiles <= 64) and/or dequantized before it (>= 64; in float32 or, half_dq, in fp16),
    split-K to ~4 programs per SM (>= 512 k per program) or none."""
    from dashq_vllm.kernels.configs import LOW_BIT_MIN_K, _split_k, swap_stages

    if m >= 4096:
        return
    tile = K.k_tile(bits)
    for bm in (32, 64, 128, 256):
        if bm > max(32, m) or (bm == 32 and m > 64):
            continue
        for bn, warps in ((64, 4), (128, 4), (128, 8)):
            if bm >= 128 and (bn, warps) == (128, 4):  # three 128 x 128 accumulators spill at 4 warps
                continue
            split = _split_k(-(-m // bm) * -(-n // bn), k, tile, sms, LOW_BIT_MIN_K)
            for scaled in (True, False):
                if (scaled and bm > 64) or (not scaled and bm < 64):
                    continue
                for sk in sorted({1, split}):
                    for half in ((False,) if scaled else (False, True)):  # half_dq: the dot mode in fp16
                        yield KernelConfig(bm, bn, split_k=sk, group_m=8, num_warps=warps,
                                           num_stages=swap_stages(bits, bm), kind="swap", scaled=scaled, half_dq=half)


def covered_buckets(m, m_list):
    """The M buckets a swept M stands for: those nearer to it (in log2) than to any other swept
    M, never mixing decode (<= 16) and GEMM buckets; M = 1 stands for itself only (GEMV)."""
    from dashq_vllm.kernels.configs import DECODE_MAX_M, M_BUCKETS

    if m == 1:
        return [1]
    same_side = [x for x in m_list if (x <= DECODE_MAX_M) == (m <= DECODE_MAX_M) and x != 1]
    out = []
    for b in M_BUCKETS:
        if b == 1 or (b <= DECODE_MAX_M) != (m <= DECODE_MAX_M):
            continue
        if min(same_side, key=lambda x: (abs(math.log2(x) - math.log2(b)), x)) == m:
            out.append(b)
    return out


def run_sweep(dev, info, m_list, bit_configs, shapes, budget_s):
    from dashq_vllm.kernels.configs import fit_config

    # K as the loader pads it at each width (e.g. Qwen's 8960 is 9216 at 3 bits), so the table's keys
    # are the ones vLLM looks up
    cases = [(K.padded_k(k, bits), n, name, bits, group) for k, n, name in shapes for bits, group in bit_configs]
    precompile([(bits, group, torch.float16, fit_config(c, k, group, bits, torch.float16), False, n, k, k)
                for k, n, _, bits, group in cases for m in m_list
                for c in sweep_candidates(m, n, k, bits, group, info["sms"])])
    table, rows = {}, []
    t_start = time.time()
    for k, n, name, bits, group in cases:
        W = Weights(k, n, bits, group, dev, info["l2_bytes"])
        for m in m_list:
            best = None
            for cfg in sweep_candidates(m, n, k, bits, group, info["sms"]):
                if time.time() - t_start > budget_s:
                    break
                try:
                    t = graph_ms(quant_fns(W, m, cfg=cfg), reps=max(1, 16 // W.count))
                except Exception as e:  # a config the compiler rejects (e.g. shared memory)
                    log(f"sweep {name} {bits}b M={m} {cfg} failed: {repr(e)[:200]}")
                    continue
                rows.append(dict(shape=name, bits=bits, group=group, m=m, us=t * 1e3, config=cfg.__dict__))
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is not None:
                for bucket in covered_buckets(m, m_list):
                    table[config_key(bits, group, bucket, n, k)] = best[1]
                log(f"sweep best {name:>17} {bits}b g{group} M={m:<5} {best[0] * 1e3:8.1f} us {best[1]}")
        del W
        torch.cuda.empty_cache()
    return table, rows


# --------------------------------------------------------------------------- ablation, profiling, plot


def run_ablation(dev, info):
    """Pipeline depth of the tuned M = 1 4-bit config on gate_up (is the loop latency-bound?)."""
    from dataclasses import replace

    k, n = 4096, 28672
    base = K.configs.pick_config(1, n, k, 4, 128, torch.device(dev))
    W = Weights(k, n, 4, 128, dev, info["l2_bytes"])
    out = {}
    for stages in (2, 3, 4, 5):
        for warps in (4, 8):
            cfg = replace(base, num_stages=stages, num_warps=warps)
            try:
                t = graph_ms(quant_fns(W, 1, cfg=cfg), reps=max(1, 16 // W.count))
            except Exception as e:
                log(f"ablation {cfg} failed: {repr(e)[:200]}")
                continue
            out[f"stages{stages}_warps{warps}"] = t * 1e3
            log(f"ablation gate_up 4b M=1 {base.kind} bn{base.block_n} sk{base.split_k} stages={stages} "
                f"warps={warps}: {t * 1e3:.1f} us")
    return out


def run_single(dev, shape, bits, group, m, cfg=None):
    """A few launches of one (shape, bits, M) with the default pick (or cfg): a target for ncu."""
    k, n, _ = next(s for s in SHAPES + SWEEP_EXTRA if s[2] == shape)
    W = Weights(k, n, bits, group, dev, 0)
    fns = quant_fns(W, m, cfg=cfg)
    for f in fns * 3:
        f()
    torch.cuda.synchronize()


def _m_axis(ax):
    """A speedup panel's axes: M on a log2 scale, a line at 1 (parity)."""
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")


def plot(json_path, png_path):
    """Speedup over fp16 cuBLAS vs M, one panel per shape (graph replays where timed); with a Machete column, a
    second row: the 4-bit kernel's speedup over vLLM's Machete on the same shape (graph replays where timed).
    json_path: one results JSON, or several joined by commas (their bench rows together, e.g. two M ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for path in str(json_path).split(",") for r in json.loads(Path(path).read_text()).get("bench", [])]
    names = [s[2] for s in SHAPES if any(r["shape"] == s[2] for r in rows)]  # a --quick run has three
    if not names:
        raise ValueError(f"{json_path}: its bench section has none of the shapes {[s[2] for s in SHAPES]}")
    machete = any("vs_machete" in r for r in rows)
    fig, axes = plt.subplots(2 if machete else 1, len(names), figsize=(4 * len(names), 7 if machete else 3.6),
                             sharey="row", squeeze=False)
    for col, name in enumerate(names):
        ax = axes[0][col]
        for bits, group in BIT_CONFIGS:
            sel = sorted((r for r in rows if r["shape"] == name and r["bits"] == bits), key=lambda r: r["m"])
            ms = [r["m"] for r in sel]
            ax.plot(ms, [r["speedup"] for r in sel], marker="o", label=f"{bits}b g{group} do_bench")
            gs = [(r["m"], r["graph_speedup"]) for r in sel if "graph_speedup" in r]
            if gs:
                ax.plot(*zip(*gs), linestyle="--", marker="x", label=f"{bits}b g{group} CUDA graph")
        _m_axis(ax)
        ax.set_title(name)
        if machete:
            ax = axes[1][col]
            sel = sorted((r for r in rows if r["shape"] == name and "vs_machete" in r), key=lambda r: r["m"])
            ax.plot([r["m"] for r in sel], [r.get("graph_vs_machete", r["vs_machete"]) for r in sel], marker="o",
                    color="C3", label="4b: Machete time / ours (graph where timed)")
            _m_axis(ax)
    axes[0][0].set_ylabel("speedup over fp16 F.linear")
    axes[0][-1].legend(fontsize=7)
    if machete:
        axes[1][0].set_ylabel("speedup over vLLM Machete (4 bits)")
        axes[1][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


# --------------------------------------------------------------------------- main


def summary(rows):
    log("\nSUMMARY (us; % of memory floor; speedup over fp16 cuBLAS)")
    for name in ("gate_up", "down", "70b_gate_up_shard", "qkv", "o"):
        for bits, group in BIT_CONFIGS:
            sel = {r["m"]: r for r in rows if r["shape"] == name and r["bits"] == bits}
            if not sel:
                continue
            parts = [f"M={m}:{sel[m]['us']:.1f}us/{sel[m]['pct_floor']:.0f}%/x{sel[m]['speedup']:.2f}"
                     for m in (1, 16, 1024, 4096) if m in sel]
            if 1 in sel and "graph_us" in sel[1]:
                parts.append(f"graph M=1:{sel[1]['graph_us']:.1f}us/x{sel[1]['graph_speedup']:.2f}")
            for m in (1, 16):
                if m in sel and "graph_vs_machete" in sel[m]:
                    parts.append(f"vs Machete (graph) M={m}: x{sel[m]['graph_vs_machete']:.2f}")
            log(f"{name:>17} {bits}b g{group:<3} " + "  ".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", default="info,check,bench,graph")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values")
    ap.add_argument("--quick-check", action="store_true", help="fewer group sizes and variants in the check")
    ap.add_argument("--check-bits", default="2,3,4,8", help="bit widths the check covers (e.g. 3 after a 3-bit change)")
    ap.add_argument("--sweep-m", default="1,16,64,1024,4096")
    ap.add_argument("--bench-m", default="", help="M values of the bench section (default: the issue's list)")
    ap.add_argument("--sweep-shapes", default="gate_up,down,o")
    ap.add_argument("--sweep-bits", default="", help="BITS:GROUP,... to sweep (default: the benchmark's "
                    + ",".join(f"{b}:{g}" for b, g in BIT_CONFIGS) + ")")
    ap.add_argument("--sweep-from", metavar="CKPT",
                    help="sweep the layer shapes and bit widths of this DASH-Q checkpoint (instead of "
                         "--sweep-shapes/--sweep-bits), as vLLM merges and shards them")
    ap.add_argument("--sweep-tp", type=int, default=1, help="with --sweep-from: tensor parallel size (default 1)")
    ap.add_argument("--sweep-budget-s", type=float, default=240)
    ap.add_argument("--sweep-keep-buckets", default="", help="merge only these M buckets into the committed table")
    ap.add_argument("--refine", action="store_true", help="decode sweep: register caps around committed picks")
    ap.add_argument("--wide", action="store_true", help="GEMM sweep: the 'wide' kernel against dequant + cuBLAS")
    ap.add_argument("--sweep-kinds", default="",
                    help="decode sweep: only these kinds (e.g. hgemv) and the committed pick")
    ap.add_argument("--tag", default="")
    ap.add_argument("--single", default="", help="shape,bits,group,m: only launch that (for ncu)")
    ap.add_argument("--single-config", default="",
                    help="with --single: KernelConfig fields as JSON instead of the pick")
    ap.add_argument("--check-paths", default="", help="only these check paths (names as in the log, e.g. "
                    "default-m1,decode-dot-half)")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"),
                    help="plot a results JSON, or several joined by commas (CPU)")
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    if args.single:
        shape, bits, group, m = args.single.split(",")
        cfg = KernelConfig(**json.loads(args.single_config)) if args.single_config else None
        run_single("cuda", shape, int(bits), int(group), int(m), cfg)
        return
    sections = set(args.sections.split(","))
    if args.sweep_from:  # a bad checkpoint or TP size fails here, before any GPU work
        try:
            found = shapes_from_checkpoint(args.sweep_from, args.sweep_tp)
        except Exception as e:  # FormatError, OSError, ValueError: one line, exit status 2
            print(f"error: --sweep-from {args.sweep_from}: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"sweeping {len(found)} layer shapes of {args.sweep_from} (tp={args.sweep_tp}): "
              + ", ".join(f"{name} {k}x{n} {b}b g{g}" for k, n, name, b, g in found), flush=True)
    if not torch.cuda.is_available():
        print("error: bench_kernels.py needs a CUDA GPU (only --plot runs without one)", file=sys.stderr)
        sys.exit(2)
    global REFINE, WIDE_ONLY, SWEEP_KINDS
    REFINE, WIDE_ONLY = args.refine, args.wide
    SWEEP_KINDS = frozenset(x for x in args.sweep_kinds.split(",") if x)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global LOG_PATH
    LOG_PATH = out / f"kernels{args.tag}.log"
    dev = "cuda"
    res = {"argv": sys.argv, "sections": sorted(sections), "tag": args.tag}
    t0 = time.time()
    try:
        res["info"] = measure_info(dev)
        if "check" in sections:
            res["check"] = run_checks(dev, args.quick_check, [int(b) for b in args.check_bits.split(",")],
                                      set(filter(None, args.check_paths.split(","))))
            log(f"[{time.time() - t0:.0f}s] checks done")
        m_list = [1, 16, 1024] if args.quick else M_LIST
        if args.bench_m:
            m_list = [int(m) for m in args.bench_m.split(",")]
        shapes = [s for s in SHAPES if not args.quick or s[2] in ("gate_up", "down", "o")]
        if "overhead" in sections:
            res["overhead"] = measure_overhead(dev)
        if "ablation" in sections:
            res["ablation"] = run_ablation(dev, res["info"])
        if "sweep" in sections:
            sweep_m = [int(m) for m in args.sweep_m.split(",")]
            if args.sweep_from:  # the checkpoint's own layer shapes and bit widths
                table, rows = {}, []
                for bits, group in sorted({(b, g) for _, _, _, b, g in found}):
                    part = [(k, n, name) for k, n, name, b, g in found if (b, g) == (bits, group)]
                    t_part, r_part = run_sweep(dev, res["info"], sweep_m, [(bits, group)], part,
                                               args.sweep_budget_s)
                    table.update(t_part)
                    rows += r_part
            else:
                wanted = args.sweep_shapes.split(",")
                known = {s[2]: s for s in SHAPES + SWEEP_EXTRA}
                unknown = [w for w in wanted if w not in known]
                if unknown:
                    raise ValueError(f"--sweep-shapes: unknown {unknown}; known: {sorted(known)}")
                sw_shapes = [known[w] for w in wanted]
                table, rows = run_sweep(dev, res["info"], sweep_m, parse_bit_configs(args.sweep_bits), sw_shapes,
                                        args.sweep_budget_s)
            res["sweep"] = rows
            if args.sweep_keep_buckets:  # merge into the committed table, only these M buckets
                keep = {int(b) for b in args.sweep_keep_buckets.split(",")}
                table = {key: c for key, c in table.items() if int(key.split("/")[2]) in keep}
                table = {**K.configs.load_table(torch.cuda.get_device_name().replace(" ", "_")), **table}
            save_table(table, out / "tuned.json")
            log(f"[{time.time() - t0:.0f}s] sweep done")
        if "bench" in sections:
            if "sweep" in sections:
                os.environ["DASHQ_KERNEL_CONFIGS"] = str(out / "tuned.json")
                K.configs.clear_cache()
            precompile([(b, g, torch.float16, K.configs.pick_config(m, n, k, b, g, torch.device(dev)), False, n, k, k)
                        for k, n, _ in shapes for b, g in BIT_CONFIGS for m in m_list])
            res["bench"] = run_bench(dev, res["info"], m_list, BIT_CONFIGS, shapes, "graph" in sections)
            log(f"[{time.time() - t0:.0f}s] bench done")
            summary(res["bench"])
    except Exception:
        log("ERROR", traceback.format_exc())
    finally:
        (out / f"kernels{args.tag}.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
