"""Solver-only speed of DASH-Q vs GPTQ on a model-sized layer set (Llama-3-8B or Qwen2.5-1.5B;
random weights and activations: speed does not depend on the values). Times one decoder block's
seven linears per method (synchronised wall clock, after a warm-up) and extrapolates to all blocks.

    python -m dashq_vllm.benchmarks.solver_speed --bits 2 --group-size 64 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from dashq_vllm.quantize import solver
from dashq_vllm.quantize.gptq import gptq

BLOCKS = {  # model: (number of blocks, {name: (out_features, in_features)})
    "llama3-8b": (32, {
        "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}),
    "qwen2.5-1.5b": (28, {
        "q_proj": (1536, 1536), "k_proj": (256, 1536), "v_proj": (256, 1536), "o_proj": (1536, 1536),
        "gate_proj": (8960, 1536), "up_proj": (8960, 1536), "down_proj": (1536, 8960)}),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(method: str, shapes: dict, grams: dict, bits: int, group: int, device) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g, device=device) * 0.02
        H = grams[k]
        _sync(device)
        t0 = time.perf_counter()
        if method == "dashq":
            h = solver.hessian_group_view(solver.damp_hessian_diag(torch.diag(H), 0.01), group)
            solver.dashq(solver.group_view(w, group), h, bits, iters=10)
        else:
            gptq(w, H, bits, group)
        _sync(device)
        out[name] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=sorted(BLOCKS), default="llama3-8b")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096, help="calibration rows used to form X^T X")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=1.0, help="shrink shapes (e.g. 0.25) for a quick CPU run")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shapes = {k: (max(a.group_size, int(n * a.scale) // a.group_size * a.group_size),
                  max(a.group_size, int(m * a.scale) // a.group_size * a.group_size))
              for k, (n, m) in BLOCKS[a.model][1].items()}
    nblocks = BLOCKS[a.model][0]
    g = torch.Generator(device=device).manual_seed(1)
    grams = {}
    for k in {k for _, k in shapes.values()}:
        x = torch.randn(a.tokens, k, generator=g, device=device)
        grams[k] = x.T @ x
    # Warm-up (kernels, allocator) on a small problem.
    time_block("dashq", {"w": (256, 256)}, {256: torch.eye(256, device=device)}, a.bits, a.group_size, device)
    time_block("gptq", {"w": (256, 256)}, {256: torch.eye(256, device=device)}, a.bits, a.group_size, device)
    res = {m: time_block(m, shapes, grams, a.bits, a.group_size, device) for m in ("dashq", "gptq")}
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": a.model, "blocks": nblocks, "bits": a.bits, "group_size": a.group_size, "scale": a.scale,
        "shapes": shapes, "per_linear_s": res,
        "block_s": {m: sum(v.values()) for m, v in res.items()},
        "model_s": {m: nblocks * sum(v.values()) for m, v in res.items()},
    }
    summary["speedup_dashq_over_gptq"] = summary["block_s"]["gptq"] / summary["block_s"]["dashq"]
    print(json.dumps(summary, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
