"""GPU correctness sweep of the op as a model calls it: Qwen2.5-1.5B's linear shapes (qkv with a
bias, then bias-less o / gate_up / down, in that order, so cached binaries are reused across
layers as in vLLM), bf16 and fp16, M from decode to prefill, eager and under torch.compile,
against float64 (outputs flagged BAD above 2e-2 relative error). Found the launch-cache bug of
KERNELS.md v5; results in benchmarks/results/diag/.

    python benchmarks/kernel_diag.py [--wide]     # on the GPU machine, package installed

--wide forces the "wide" GEMM kind for every call (to check that kernel on these shapes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels import dense_reference, random_module, rel_err  # noqa: E402

from dashq_vllm import kernels as K  # noqa: E402
from dashq_vllm.kernels.configs import KernelConfig, pick_config  # noqa: E402
from dashq_vllm.kernels.triton_kernels import triton_linear  # noqa: E402

SHAPES = [(1536, 2048, True), (1536, 1536, False), (1536, 17920, False), (8960, 1536, False)]  # (K, N, bias)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wide", action="store_true")
    opts = ap.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 256
    wide = KernelConfig(64, 64, kind="wide", block_k=128) if opts.wide else None
    bad = 0
    for dt in (torch.bfloat16, torch.float16):
        for k, n, has_bias in SHAPES:
            spec, t = random_module(4, 128, n, k, seed=k + n)
            kw = K.repack(t["W_q_packed"].cuda(), t["scale"].cuda(), t["zero"].cuda(), spec, dt)
            bias = (torch.randn(n) * 0.1).to(dt).cuda() if has_bias else None

            def op(a, kw=kw, bias=bias, n=n):
                if wide is not None:
                    return triton_linear(a, kw.qweight, kw.scales, kw.szeros, 4, 128, n, kw.k, bias, cfg=wide)
                return K.dashq_linear(a, kw.qweight, kw.scales, kw.szeros, 4, 128, n, kw.k, bias)

            compiled = torch.compile(op, fullgraph=True) if wide is None else op
            for m in (1, 5, 16, 17, 30, 64, 200, 1000):
                x = torch.randn(m, k).to(dt).cuda()
                ref = dense_reference(x.cpu(), t, spec, None if bias is None else bias.cpu())
                e, ec = rel_err(op(x).cpu(), ref), rel_err(compiled(x).cpu(), ref)
                cfg = wide or pick_config(m, n, kw.k, 4, 128, x.device, dt)
                ok = max(e, ec) <= 2e-2  # False for NaN too
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} {str(dt)[6:]} k={k} n={n} bias={has_bias} m={m}: err {e:.2e} "
                      f"compiled {ec:.2e} {cfg.kind} bm{cfg.block_m} bn{cfg.block_n} sk{cfg.split_k}", flush=True)
    print("BAD CASES:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
