"""Independent GPTQ cross-check: llm-compressor's GPTQModifier vs our ``--method gptq``, same data.

Unlike ``gptq_reference.py`` this does not need dashq-vllm installed next to llm-compressor: the
project venv dumps the exact token ids (calibration windows drawn by ``token_windows`` exactly as
``quantize/pipeline.py`` draws them, and the held-out text's ids as ``evaluate.perplexity``
tokenizes it), and a separate venv holding only torch + llmcompressor quantizes the same bf16 model
(loaded in fp32 on CPU) with them and measures perplexity with our protocol (non-overlapping
2048-token windows, summed token NLL / count, exp), in the same process, on the fake-quantized
model. Not imported by the tests, not needed by the package.

Commands (SmolLM2-135M, 4-bit g128; use --bits 3 for the 3-bit run)::

    export DASHQ_HOME=/tmp/llmc-home OMP_NUM_THREADS=2
    M=$DASHQ_HOME/models/smollm2-135m
    .venv/bin/dashq-vllm assets fetch smollm2-135m news wiki
    # our side
    .venv/bin/dashq-vllm quantize $M --out /work/llmc/ours-gptq-w4g128 --method gptq --bits 4 \\
        --group-size 128 --calib news --nsamples 32 --seqlen 512 --seed 0 --device cpu --json /work/llmc/ours.json
    .venv/bin/dashq-vllm eval /work/llmc/ours-gptq-w4g128 --seqlen 2048 --max-windows 40 --device cpu \\
        --json /work/llmc/ours-ppl.json
    .venv/bin/dashq-vllm eval $M --seqlen 2048 --max-windows 40 --device cpu --json /work/llmc/src-ppl.json
    # the exact ids (project venv)
    .venv/bin/python benchmarks/gptq_llmcompressor.py dump --model $M --out /work/llmc/ids.npz \\
        --calib news --nsamples 32 --seqlen 512 --seed 0 --eval-text wiki
    # independent side (its own venv; llm-compressor pins its own transformers)
    # (torch 2.13.0+cpu came from this machine's local index; elsewhere add
    #  --index-url https://download.pytorch.org/whl/cpu to get the CPU wheel)
    python3 -m venv /work/llmc/venv && /work/llmc/venv/bin/pip install torch==2.13.0 && /work/llmc/venv/bin/pip install llmcompressor
    /work/llmc/venv/bin/python benchmarks/gptq_llmcompressor.py run --model $M --ids /work/llmc/ids.npz \\
        --bits 4 --group-size 128 --eval-source --ours-ppl /work/llmc/ours-ppl.json --json /work/llmc/llmc-w4g128.json

Configuration matched to ours: weights only, int, asymmetric (zero point), group-wise, min/max
(llm-compressor's default weight observer, memoryless_minmax), ``actorder=None``,
``dampening_frac`` 0.01 (x mean diag of H, as ours), block 128, every Linear of the decoder
blocks, lm_head ignored, sequential pipeline with error propagation (block i calibrated on the
outputs of the already-quantized blocks < i, as ours). Remaining difference: llm-compressor takes
each group's scale/zero from the original weights before GPTQ runs ("static groups"); ours takes
them from the error-updated weights when the group's first column is reached (the reference
GPTQ code's default, ``static_groups=False``). Ours also rounds scale/zero to fp16 for storage.
in_features not divisible by the group size (SmolLM2's 576 at g128) are zero-padded on the
llm-compressor side the way ours pads them (see ``pad_inputs_to_group``), since llm-compressor
refuses such layers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def cmd_dump(a) -> int:
    """Run in the project venv: the exact ids our quantizer and evaluator use."""
    import numpy as np
    from transformers import AutoTokenizer

    from dashq_vllm.quantize.data import get_text
    from dashq_vllm.quantize.pipeline import QuantizeOptions, calibration_samples

    tok = AutoTokenizer.from_pretrained(a.model)
    opts = QuantizeOptions(method="gptq", calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed)
    calib = calibration_samples(tok, opts)  # the very call quantize_model() makes
    ev = tok(get_text(a.eval_text), add_special_tokens=False, verbose=False)["input_ids"]
    np.savez(a.out, calib=calib.numpy().astype(np.int64), eval=np.asarray(ev, dtype=np.int64))
    print(f"wrote {a.out}: calib {tuple(calib.shape)}, eval {len(ev)} tokens")
    return 0


def perplexity(model, ids, seqlen: int, max_windows: int) -> dict:
    """Our protocol (quantize/evaluate.py), on pre-tokenized ids."""
    import torch
    import torch.nn.functional as F

    n = min(ids.numel() // seqlen, max_windows)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            logits = model(x, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
            count += seqlen - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": n, "seqlen": seqlen,
            "seconds": time.perf_counter() - t0}


def pad_inputs_to_group(model, group_size: int) -> int:
    """llm-compressor refuses group-wise quantization of a Linear whose in_features is not a
    multiple of group_size (SmolLM2: 576 with g128). Ours zero-pads such a weight (and its Gram
    matrix) to the next multiple; do the same here: Linear(k) -> [zero-pad input to k', Linear(k')]
    with zero extra columns. The extra inputs are always 0, so the function is unchanged, their
    Hessian rows are 0 ("dead" columns: weight 0, diag set to 1 in both implementations), and
    the min/max of the last, partly padded group equals that of its real columns (both clamp
    min <= 0 <= max). Returns the number of wrapped linears."""
    import torch
    from torch import nn

    wrapped = 0
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if not isinstance(m, nn.Linear) or m.in_features % group_size == 0:
                continue
            pad = (-m.in_features) % group_size
            big = nn.Linear(m.in_features + pad, m.out_features, bias=m.bias is not None,
                            dtype=m.weight.dtype, device=m.weight.device)
            with torch.no_grad():
                big.weight.zero_()
                big.weight[:, : m.in_features] = m.weight
                if m.bias is not None:
                    big.bias.copy_(m.bias)
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, nn.Sequential(nn.ConstantPad1d((0, pad), 0.0), big))
            wrapped += 1
    return wrapped


def check_quantized(model, bits: int, group_size: int) -> dict:
    """Every targeted linear must hold weights on its scale/zero grid: at most 2**bits distinct
    values in every group (exhaustive), and weight == fake_quantize(weight) (re-quantizing
    with the stored scale/zero changes nothing)."""
    import torch
    from compressed_tensors.quantization import fake_quantize

    n, max_distinct, max_requant_err, statuses = 0, 0, 0.0, set()
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if not hasattr(m, "weight_scale"):
            raise SystemExit(f"{name}: not quantized (no weight_scale)")
        w = m.weight.detach().float()
        g = w.reshape(-1, group_size).sort(dim=-1).values
        distinct = int((1 + (g[:, 1:] != g[:, :-1]).sum(-1)).max())
        requant = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, m.quantization_scheme.weights)
        max_requant_err = max(max_requant_err, float((requant.float() - w).abs().max()))
        max_distinct = max(max_distinct, distinct)
        statuses.add(str(getattr(m, "quantization_status", "?")))
        n += 1
    return {"quantized_linears": n, "max_distinct_values_per_group": max_distinct,
            "max_abs_weight_minus_requantized": max_requant_err, "quantization_status": sorted(statuses)}


def cmd_run(a) -> int:
    """Run in a venv with llmcompressor: quantize with its GPTQ, evaluate with our protocol."""
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    data = np.load(a.ids)
    calib = torch.from_numpy(data["calib"]).long()
    ev = torch.from_numpy(data["eval"]).long()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    res: dict = {"model": a.model, "bits": a.bits, "group_size": a.group_size, "calib_shape": list(calib.shape),
                 "eval_windows": a.eval_windows, "eval_seqlen": a.eval_seqlen, "versions": _versions()}
    if a.eval_source:
        res["source"] = perplexity(model, ev, a.eval_seqlen, a.eval_windows)
        print(f"source ppl {res['source']['ppl']:.4f}", flush=True)

    with torch.no_grad():
        probe = ev[:256].unsqueeze(0)
        before = model(probe, use_cache=False).logits
        res["padded_linears"] = pad_inputs_to_group(model, a.group_size)
        res["padding_max_abs_logit_change"] = float((model(probe, use_cache=False).logits - before).abs().max())
    print(f"padded {res['padded_linears']} linears, max |logit change| {res['padding_max_abs_logit_change']:.2e}", flush=True)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    layer_cls = type(model.model.layers[0]).__name__
    recipe = GPTQModifier(
        ignore=["lm_head"], dampening_frac=0.01, block_size=128, actorder=None, batched_quantization=None,
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": a.bits, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": a.group_size, "actorder": None, "observer": "memoryless_minmax"}}},
    )
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False, batch_size=1,
            pipeline="sequential", sequential_targets=[layer_cls], propagate_error=True)
    res["quantize_wall_s"] = time.perf_counter() - t0
    model.eval()
    res["check"] = check_quantized(model, a.bits, a.group_size)
    print(json.dumps(res["check"]), flush=True)
    if res["check"]["max_distinct_values_per_group"] > 2 ** a.bits:
        raise SystemExit("weights are not on a 2**bits grid per group; the model is not quantized")
    res["llmcompressor_gptq"] = perplexity(model, ev, a.eval_seqlen, a.eval_windows)
    ppl = res["llmcompressor_gptq"]["ppl"]
    print(f"llm-compressor GPTQ ppl {ppl:.4f}", flush=True)
    if a.ours_ppl:
        ours = json.loads(Path(a.ours_ppl).read_text())
        ours_ppl = ours["perplexity"][next(iter(ours["perplexity"]))]["ppl"] if "perplexity" in ours else ours["ppl"]
        res["ours_gptq_ppl"] = ours_ppl
        res["relative_difference"] = ours_ppl / ppl - 1
        res["within_2pct"] = abs(res["relative_difference"]) <= 0.02
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llmcompressor", "compressed-tensors", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="(project venv) save the calibration windows and eval ids")
    d.add_argument("--model", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--calib", default="news")
    d.add_argument("--nsamples", type=int, default=32)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval-text", default="wiki")
    d.set_defaults(func=cmd_dump)
    r = sub.add_parser("run", help="(llmcompressor venv) quantize with llm-compressor GPTQ and measure ppl")
    r.add_argument("--model", required=True)
    r.add_argument("--ids", required=True)
    r.add_argument("--bits", type=int, default=4)
    r.add_argument("--group-size", type=int, default=128)
    r.add_argument("--eval-seqlen", type=int, default=2048)
    r.add_argument("--eval-windows", type=int, default=40)
    r.add_argument("--eval-source", action="store_true", help="also measure the unquantized model first")
    r.add_argument("--ours-ppl", default=None, help="`dashq-vllm eval --json` output of our GPTQ checkpoint")
    r.add_argument("--json", default=None)
    r.set_defaults(func=cmd_run)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
