"""Does cuBLAS care which way the dequantized weight is laid out? Times x @ W for fp16 W stored (K, N)
(the "dequant" kind's default: torch.mm(x, W)) and (N, K) (its ``nk`` option and F.linear, the fp16
baseline: x @ W^T) inside CUDA-graph replays (bench_kernels.graph_ms), on bench_kernels' shapes
(Llama-3-8B's linears and the 70B shard) at M = 128-1024.

    python3 -m dashq_vllm.benchmarks.cublas_layout --out DIR   # on a GPU, package installed
(results/cublas_layout_h200.json was measured with an equivalent inline graph timer, 20 calls per graph)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dashq_vllm.benchmarks.bench_kernels import SHAPES, graph_ms  # the kernel benchmark's shapes and timer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", default="128,256,512,1024")
    args = ap.parse_args()
    rows = []
    for k, n, name in SHAPES:
        w_nk = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        w_kn = w_nk.t().contiguous()
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            kn = graph_ms([lambda: torch.mm(x, w_kn, out=y)], reps=20) * 1e3
            nk = graph_ms([lambda: F.linear(x, w_nk)], reps=20) * 1e3
            rows.append(dict(shape=name, k=k, n=n, m=m, kn_us=kn, nk_us=nk))
            print(f"{name:>17} M={m:<5} W(K,N) {kn:7.1f} us  W(N,K) {nk:7.1f} us  ratio {kn / nk:4.2f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cublas_layout.json").write_text(json.dumps(
        dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
