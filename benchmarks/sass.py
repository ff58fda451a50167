"""The kernels compiled ahead of time for sm_90 on this machine (Triton's bundled ptxas and nvdisasm; no GPU),
and the instruction mix of a kernel's K loop: the "compiled first" numbers of KERNELS.md.

    python -m dashq_vllm.benchmarks.sass 4:128:2 2:64:4 3:128:1 4:128:2:pf   # BITS:GROUP:TT[:pf][:bnN][:wN][:rN][:cN]

prints, per hgemv config (fp16 x, 64 wide, 4 warps, one row of x and one column block unless bnN / wN / rN / cN
say otherwise; pf: the one-tile prefetch), the K loop's SASS instructions, their count per weight x row product a
thread computes in one iteration, and the top opcodes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch

_SIG = {"x_ptr": None, "qw_ptr": "*i32", "s_ptr": None, "z_ptr": None, "b_ptr": None, "y_ptr": None, "M": "i32",
        "N": "i32", "K": "i32", "KX": "i32", "stride_xm": "i32", "stride_ym": "i32", "SPLIT_K": "i32"}
_ALIGNED = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "N", "K", "KX", "stride_xm", "stride_ym")


def compile_sm90(fn, dtype, consts: dict, num_warps: int = 4, num_stages: int = 3):
    """A kernel of the (x, qw, s, z, b, y, M, N, K, KX, stride_xm, stride_ym, SPLIT_K, constexprs...) signature
    compiled for sm_90, with the 16-divisibility a real launch specialises on. Raises ImportError when this
    Triton cannot compile ahead of time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dashq_vllm.kernels.triton_kernels import FP_FUSION

    t = {torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    sig = {k: v or t for k, v in _SIG.items()}
    sig.update({k: "constexpr" for k in consts})
    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in _ALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **FP_FUSION})


def hgemv_consts(bits: int, group: int, tt: int, block_n: int = 64, prefetch: bool = False, rows: int = 1,
                 cols: int = 1) -> dict:
    """The constexprs of an hgemv launch (rows of x and column blocks per program) on an fp16 layer whose N and K
    the tile divides."""
    from dashq_vllm.kernels.layout import k_tile

    return dict(BITS=bits, GROUP=group, BLOCK_N=block_n, TT=tt, ATOMIC=True, HAS_BIAS=False, PTX=True,
                EVEN_K=True, KT=k_tile(bits), PREFETCH=prefetch, EVEN_N=True, ROWS=rows, COLS=cols)


def nvdisasm_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm_path(), "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def loop_histogram(sass: str) -> collections.Counter:
    """Opcodes of the longest loop: the instructions from a label to the last branch back to it."""
    lines = sass.splitlines()
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line)}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            start = labels[m.group(1)]
            if i - start > best[1] - best[0]:
                best = (start, i)
    ops = (_INSN.search(line) for line in lines[best[0]:best[1] + 1])
    return collections.Counter(m.group(1) for m in ops if m)


def main(argv=None) -> int:
    from dashq_vllm.kernels.layout import k_tile
    from dashq_vllm.kernels.triton_kernels import dashq_gemv_kernel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="BITS:GROUP:TT[:pf][:bnN][:wN][:rN][:cN]")
    args = ap.parse_args(argv)
    for spec in args.configs:
        bits, group, tt, *rest = spec.split(":")
        bits, group, tt = int(bits), int(group), int(tt)
        block_n = next((int(r[2:]) for r in rest if r.startswith("bn")), 64)
        warps = next((int(r[1:]) for r in rest if r.startswith("w")), 4)
        rows = next((int(r[1:]) for r in rest if r.startswith("r")), 1)
        cols = next((int(r[1:]) for r in rest if r.startswith("c")), 1)
        compiled = compile_sm90(dashq_gemv_kernel, torch.float16,
                                hgemv_consts(bits, group, tt, block_n, "pf" in rest, rows, cols), num_warps=warps)
        hist = loop_histogram(disassemble(compiled.asm["cubin"]))
        n = sum(hist.values())
        weights = rows * cols * tt * k_tile(bits) * block_n / (32 * warps)  # weight x row products per thread
        # and iteration
        top = " ".join(f"{op} {c}" for op, c in hist.most_common(10))
        print(f"hgemv {spec:16s} loop {n:5d} instructions, {n / weights:.2f} per weight; {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
