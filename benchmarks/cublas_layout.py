"""Does cuBLAS care which way the dequantized weight is laid out? Times x @ W for fp16 W stored (K, N)
(what the "dequant" path writes today: torch.mm(x, W)) and (N, K) (what F.linear / the fp16 baseline
uses: x @ W^T), inside CUDA-graph replays, for Llama-3-8B's and the 70B shard's shapes at M = 128-1024.

    python3 benchmarks/cublas_layout.py --out DIR     # on a GPU; writes DIR/cublas_layout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 6144, "qkv"), (4096, 4096, "o"), (4096, 28672, "gate_up"), (14336, 4096, "down"),
          (8192, 28672, "70b_gate_up_shard")]


def graph_us(fn, reps=20):
    """Per-call GPU time of fn inside one CUDA graph of `reps` calls (median of 5 replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[2]


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
            kn = graph_us(lambda: torch.mm(x, w_kn, out=y))
            nk = graph_us(lambda: F.linear(x, w_nk))
            rows.append(dict(shape=name, k=k, n=n, m=m, kn_us=kn, nk_us=nk))
            print(f"{name:>17} M={m:<5} W(K,N) {kn:7.1f} us  W(N,K) {nk:7.1f} us  ratio {kn / nk:4.2f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cublas_layout.json").write_text(json.dumps(
        dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
