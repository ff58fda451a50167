"""Where DASH-Q and GPTQ differ, layer by layer: output error on held-out activations.

For the chosen decoder blocks of a source model, the Gram matrix G = sum_n x_n x_n^T of every
linear's inputs is collected on the calibration text (news, as the quantizer uses it) and on
held-out text (wiki). Each variant quantizes a weight from the calibration statistics (all
windows, or only the first two for the ``-n2`` variants); its error is the relative output error
on the held-out activations,

    err = tr(dW G dW^T) / tr(W G W^T) = ||dW X||^2 / ||W X||^2,   dW = W_hat - W,

split into the part on G's diagonal (the only part DASH-Q's objective sees) and the rest (the
correlations between input channels that GPTQ's error propagation uses). The blocks see the
source model's activations (no earlier block is quantized), so every variant of a layer is
compared on the same inputs. Variants are the pipeline's own quantizer with one knob changed:
damping, iterations, calibration length.

    python -m dashq_vllm.benchmarks.layer_error --model qwen2.5-coder-1.5b --blocks 4,14,24 \\
        --settings 3:128,4:128,3:64,2:32 --nsamples 32 --seqlen 512 --out layer-error.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dashq_vllm.quantize import solver
from dashq_vllm.quantize.calibration import (BlockInputs, block_linears, capture_first_block_inputs,
                                             collect_stats, decoder_layers, run_block)
from dashq_vllm.quantize.pipeline import QuantizeOptions, calibration_samples, load_source_model, quantize_weight

from .throughput import environment

# name: (method, changes to the pipeline's defaults, calibration windows used: None for all)
VARIANTS = {
    "rtn": ("rtn", {}, None),
    "gptq": ("gptq", {}, None),
    "dashq": ("dashq", {}, None),
    "dashq-iters100": ("dashq", {"iters": 100, "tol": 0.0}, None),
    "dashq-damp0": ("dashq", {"damping": 0.0}, None),
    "dashq-damp0.1": ("dashq", {"damping": 0.1}, None),
    "dashq-damp1": ("dashq", {"damping": 1.0}, None),
    "gptq-n2": ("gptq", {}, 2),
    "dashq-n2": ("dashq", {}, 2),
}


def quadratic(a: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(A G A^T): fp32 products, fp64 sum. fp32 is accurate enough for a relative error (the unit
    test checks it against fp64 activations to 1e-4); fp64 matmuls against an 8960-wide Gram matrix
    made a first Qwen run on 2 CPU cores spend most of its time here."""
    return float(((a @ gram) * a).double().sum())


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor, ref: float) -> dict[str, float]:
    """Relative output error tr(dW G dW^T) / ref, ref = tr(W G W^T), and its share on G's diagonal."""
    dw = w_hat.float() - w.float()
    total = quadratic(dw, gram)
    diag = float((dw * dw * torch.diag(gram)).double().sum())
    return {"err": total / ref, "diag_share": diag / total if total > 0 else float("nan")}


def dequantized(weight: torch.Tensor, gq: solver.GroupQuant) -> torch.Tensor:
    return gq.dequantize().reshape(weight.shape[0], -1)[:, : weight.shape[1]]


def block_study(block, calib: BlockInputs, heldout: BlockInputs, settings, variants) -> dict:
    linears = block_linears(block)
    stats = {n: collect_stats(block, BlockInputs(calib.hidden[:n], calib.kwargs), full_gram=True)
             for n in {VARIANTS[v][2] for v in variants}}  # hidden[:None] is every window
    test = collect_stats(block, heldout, full_gram=True)
    out: dict = {}
    for name, lin in linears.items():
        w = lin.weight.data.float()
        ref = quadratic(w, test[name].gram)
        for bits, group in settings:
            cell = out.setdefault(name, {}).setdefault(f"{bits}:{group}", {})
            for v in variants:
                method, changes, windows = VARIANTS[v]
                opts = replace(QuantizeOptions(bits=bits, group_size=group, method=method), **changes)
                t0 = time.perf_counter()
                gq, _ = quantize_weight(w, stats[windows][name], opts)
                cell[v] = output_error(w, dequantized(w, gq), test[name].gram, ref)
                cell[v]["solve_s"] = time.perf_counter() - t0
    return out


def summary(results: dict, settings, variants) -> str:
    """Per setting: geometric mean over layers of each variant's error relative to GPTQ's, and the
    number of layers where the variant beats GPTQ; DASH-Q's diagonal share of its error."""
    lines = ["| setting | " + " | ".join(variants) + " | DASH-Q diag share |", "|---" * (len(variants) + 2) + "|"]
    for bits, group in settings:
        key = f"{bits}:{group}"
        cells = [c[key] for blk in results["blocks"].values() for c in blk.values()]
        row = []
        for v in variants:
            ratios = [c[v]["err"] / c["gptq"]["err"] for c in cells]
            wins = sum(r < 1 for r in ratios)
            row.append(f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} ({wins}/{len(ratios)})")
        share = sum(c["dashq"]["diag_share"] for c in cells) / len(cells)
        lines.append(f"| {bits}-bit g{group} | " + " | ".join(row) + f" | {share:.2f} |")
    return "\n".join(lines)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="asset name or model directory")
    p.add_argument("--blocks", default="0", help="decoder block indices, comma-separated")
    p.add_argument("--settings", default="3:128,4:128,3:64,2:32", help="bits:group list")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--calib", default="news", help="calibration text: a data asset name or a file")
    p.add_argument("--eval-text", default="wiki", help="held-out text: a data asset name or a file")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--heldout", type=int, default=16, help="held-out windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", required=True)
    opts = p.parse_args(argv)
    variants = opts.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "gptq" not in variants or "dashq" not in variants:
        p.error(f"--variants must include gptq and dashq and name only known ones (unknown: {unknown})")
    settings = [tuple(int(x) for x in s.split(":")) for s in opts.settings.split(",")]
    blocks = sorted({int(b) for b in opts.blocks.split(",")})

    from dashq_vllm.quantize.assets import resolve_model

    model, tok, _ = load_source_model(resolve_model(opts.model), torch.device("cpu"))
    layers = decoder_layers(model)
    if blocks[-1] >= len(layers):
        p.error(f"--blocks: the model has {len(layers)} blocks")

    def windows(text: str, n: int) -> torch.Tensor:  # the quantizer's own windowing (seed 0)
        return calibration_samples(tok, QuantizeOptions(calib=text, nsamples=n, seqlen=opts.seqlen))

    calib = capture_first_block_inputs(model, windows(opts.calib, opts.nsamples), torch.device("cpu"))
    heldout = capture_first_block_inputs(model, windows(opts.eval_text, opts.heldout), torch.device("cpu"))
    results = {"meta": {"model": opts.model, "blocks": blocks, "calib": opts.calib, "eval_text": opts.eval_text,
                        "nsamples": opts.nsamples, "heldout": opts.heldout, "seqlen": opts.seqlen, "environment": environment()},
               "blocks": {}}
    out = Path(opts.out)
    t0 = time.perf_counter()
    for i in range(blocks[-1] + 1):
        block = layers[i].float()
        if i in blocks:
            results["blocks"][str(i)] = block_study(block, calib, heldout, settings, variants)
            out.write_text(json.dumps(results, indent=1))  # kept block by block: a long run is not lost
            print(f"[layer_error] block {i} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if i < blocks[-1]:
            calib.hidden, heldout.hidden = run_block(block, calib), run_block(block, heldout)
        layers[i] = block.to("meta")
    print(summary(results, settings, variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
