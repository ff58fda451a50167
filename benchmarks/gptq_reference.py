"""Cross-check our GPTQ baseline against an independent implementation (llm-compressor).

Runs llm-compressor's GPTQModifier (asymmetric int, group-wise, no act-order, dampening 0.01) on
the same calibration windows our quantizer draws (same tokenizer, text, seed), then measures
perplexity with our evaluator on the same held-out windows, and compares with our own GPTQ
checkpoint's perplexity. llm-compressor pins its own transformers/compressed-tensors, so this
runs in a separate virtualenv that also has this package installed (`pip install -e . --no-deps`):

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/pip install -e . --no-deps
    /tmp/llmc/bin/python -m dashq_vllm.benchmarks.gptq_reference --model ~/.cache/dashq-vllm/models/smollm2-135m \\
        --bits 3 --group-size 64 --nsamples 128 --seqlen 512 --out benchmarks/results/gptq-reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib", default="news")
    p.add_argument("--eval-text", default="wiki")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours", default=None, help="our GPTQ checkpoint to compare (optional)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dashq_vllm.quantize.calibration import token_windows
    from dashq_vllm.quantize.data import get_text
    from dashq_vllm.quantize.evaluate import perplexity

    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(get_text(a.calib), add_special_tokens=False)["input_ids"]
    windows = token_windows(ids, a.nsamples, a.seqlen, a.seed)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    recipe = GPTQModifier(
        ignore=["lm_head"], dampening_frac=0.01, block_size=128,
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": a.bits, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": a.group_size, "actorder": None}}},
    )
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=a.seqlen, num_calibration_samples=a.nsamples)
    quant_s = time.perf_counter() - t0
    model.eval()
    text = get_text(a.eval_text)
    ref = perplexity(model, tok, text, a.seqlen, a.eval_windows)
    res = {"llmcompressor_gptq_ppl": ref["ppl"], "llmcompressor_wall_s": quant_s, "bits": a.bits,
           "group_size": a.group_size, "nsamples": a.nsamples, "seqlen": a.seqlen, "eval_windows": a.eval_windows}
    if a.ours:
        from dashq_vllm.quantize.model_io import load_model

        ours_model, ours_tok = load_model(a.ours)
        res["ours_gptq_ppl"] = perplexity(ours_model, ours_tok, text, a.seqlen, a.eval_windows)["ppl"]
        res["relative_difference"] = res["ours_gptq_ppl"] / res["llmcompressor_gptq_ppl"] - 1
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
