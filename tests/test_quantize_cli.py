"""quantize -> checkpoint -> eval on tiny random models, through the CLI, and every bad input
getting a one-line error with exit status 2."""

import errno
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_text, make_tiny_model
from dashq_vllm import cli
from dashq_vllm.checkpoint import checkpoint_problems
from dashq_vllm.format import dequantize, load_dashq_config
from dashq_vllm.quantize.model_io import load_model

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines()
             if l.strip() and "it/s]" not in l and not l.startswith(("Loading", "Writing", "[transformers]"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("method", ["dashq", "rtn", "gptq"])
def test_quantize_then_eval_tiny_model(tmp_path, tiny_model, calib_file, capsys, method):
    out = tmp_path / f"q-{method}"
    code, stdout, err = run_cli(["quantize", tiny_model, "--out", out, "--bits", "3", "--group-size", "32",
                                 "--method", method, "--calib", calib_file, *FAST[:-1], "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "mean relative weighted error" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["layers"]) == 14 and report["wall_s"] > 0
    assert checkpoint_problems(out) == []
    cfg = load_dashq_config(out)
    assert cfg.method == method and len(cfg.modules) == 14
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "dashq"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file()
    # Unquantized tensors are copied bit-exactly; the quantized ones dequantize close to the source.
    q = load_file(out / "model.safetensors")
    src = load_file(tiny_model / "model.safetensors")
    assert torch.equal(q["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    name = "model.layers.1.mlp.down_proj"
    w = dequantize(q[f"{name}.W_q_packed"], q[f"{name}.scale"], q[f"{name}.zero"], cfg.modules[name])
    ref = src[f"{name}.weight"].float()
    assert w.shape == ref.shape and (w - ref).norm() / ref.norm() < 0.5
    # Eval reads the DASH-Q checkpoint with the torch reference and gives a finite perplexity.
    text = tmp_path / "eval.txt"
    text.write_text(make_text(3000, seed=5))
    code, stdout, err = run_cli(["eval", out, "--ppl", text, "--seqlen", "64", "--max-windows", "4", "--quiet",
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    ppl = json.loads(stdout)["perplexity"][str(text)]["ppl"]
    assert math.isfinite(ppl) and ppl > 1


def test_reference_loader_matches_dense_dequantized_model(tmp_path, tiny_model, calib_file):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(tiny_model), "--out", str(out), "--bits", "4", "--group-size", "32",
                     "--calib", str(calib_file), *FAST]) == 0
    mq, _ = load_model(out)
    md, _ = load_model(tiny_model)
    cfg = load_dashq_config(out)
    tensors = load_file(out / "model.safetensors")
    with torch.no_grad():
        for name, spec in cfg.modules.items():
            w = dequantize(tensors[f"{name}.W_q_packed"], tensors[f"{name}.scale"], tensors[f"{name}.zero"], spec)
            md.get_submodule(name).weight.copy_(w)
        x = torch.randint(3, 200, (2, 17))
        torch.testing.assert_close(mq(x).logits, md(x).logits, rtol=1e-4, atol=1e-4)


def test_padding_when_in_features_not_multiple_of_group(tmp_path, calib_file):
    src = make_tiny_model(tmp_path / "m", hidden=112, inter=176)
    out = tmp_path / "q"
    assert cli.main(["quantize", str(src), "--out", str(out), "--bits", "2", "--group-size", "64",
                     "--calib", str(calib_file), *FAST]) == 0
    spec = load_dashq_config(out).modules["model.layers.0.mlp.down_proj"]
    assert spec.in_features == 176 and spec.quant_in_features == 192


def test_dashq_beats_rtn_on_output_error(tmp_path, calib_file):
    """On the same calibration data, DASH-Q's weighted error is lower than RTN's at 2 bits."""
    src = make_tiny_model(tmp_path / "m", seed=3)
    res = {}
    for method in ("rtn", "dashq"):
        rj = tmp_path / f"{method}.json"
        assert cli.main(["quantize", str(src), "--out", str(tmp_path / method), "--bits", "2", "--group-size", "32",
                         "--method", method, "--calib", str(calib_file), *FAST, "--json", str(rj)]) == 0
        res[method] = sum(l["err_method"] for l in json.loads(rj.read_text())["layers"])
    assert res["dashq"] < 0.8 * res["rtn"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_blocks_kept_in_source_dtype_give_the_fp32_result(tmp_path, calib_file, arch):
    """Decoder blocks stay in the checkpoint's dtype on the host and are upcast one at a time, the
    rest (embeddings, rotary tables, norms) runs in fp32: the checkpoint is bit-identical to the one
    made from the same weights stored in fp32."""
    import shutil

    from transformers import AutoModelForCausalLM

    from dashq_vllm.quantize.pipeline import load_source_model

    src = make_tiny_model(tmp_path / "bf16", arch=arch, seed=4)
    model, _, _ = load_source_model(src, torch.device("cpu"))
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == model.model.norm.weight.dtype == torch.float32
    f32 = tmp_path / "fp32"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(f32)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith((".jinja", ".txt")):
            shutil.copy2(f, f32 / f.name)
    assert load_file(f32 / "model.safetensors")["model.norm.weight"].dtype == torch.float32
    for method in ("dashq", "gptq"):
        outs = {}
        for name, model_dir in (("bf16", src), ("fp32", f32)):
            outs[name] = tmp_path / f"{method}-{name}"
            assert cli.main(["quantize", str(model_dir), "--out", str(outs[name]), "--bits", "2", "--group-size", "32",
                             "--method", method, "--calib", str(calib_file), *FAST]) == 0
        a, b = (load_file(outs[n] / "model.safetensors") for n in ("bf16", "fp32"))
        packed = [k for k in a if k.endswith((".W_q_packed", ".scale", ".zero"))]
        assert len(packed) == 3 * 14
        for k in packed:
            assert torch.equal(a[k], b[k]), (method, k)


# --------------------------------------------------------------------------- bad input


def test_missing_model_dir(tmp_path, capsys):
    line = one_line_error(*run_cli(["quantize", tmp_path / "nope", "--out", tmp_path / "o"], capsys)[::2])
    assert "nope" in line


def test_corrupt_model_dir(tmp_path, capsys, calib_file):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    one_line_error(*run_cli(["quantize", d, "--out", tmp_path / "o", "--calib", calib_file], capsys)[::2])
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = one_line_error(*run_cli(["quantize", d, "--out", tmp_path / "o", "--calib", calib_file], capsys)[::2])
    assert "safetensors" in line


def test_truncated_weights(tmp_path, tiny_model, capsys, calib_file):
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(tiny_model, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = one_line_error(*run_cli(["quantize", d, "--out", tmp_path / "o", "--calib", calib_file], capsys)[::2])
    assert "truncated" in line


def test_unsupported_architecture(tmp_path, capsys, calib_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)).save_pretrained(d)
    from conftest import make_tokenizer

    make_tokenizer(d)
    line = one_line_error(*run_cli(["quantize", d, "--out", tmp_path / "o", "--calib", calib_file, *FAST], capsys)[::2])
    assert "unsupported architecture" in line


@pytest.mark.parametrize("flags,msg", [(["--bits", "5"], "--bits"), (["--group-size", "48"], "--group-size"),
                                       (["--iters", "0"], "--iters")])
def test_unsupported_flags(tmp_path, tiny_model, capsys, flags, msg):
    line = one_line_error(*run_cli(["quantize", tiny_model, "--out", tmp_path / "o", *flags], capsys)[::2])
    assert msg in line


def test_nan_weights(tmp_path, capsys, calib_file):
    d = make_tiny_model(tmp_path / "nan")
    t = load_file(d / "model.safetensors")
    t["model.layers.1.self_attn.v_proj.weight"][3, 4] = float("nan")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    line = one_line_error(*run_cli(["quantize", d, "--out", tmp_path / "o", "--calib", calib_file, *FAST], capsys)[::2])
    assert "model.layers.1.self_attn.v_proj.weight" in line and "NaN" in line


def test_empty_calibration_text(tmp_path, tiny_model, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    line = one_line_error(*run_cli(["quantize", tiny_model, "--out", tmp_path / "o", "--calib", empty, *FAST], capsys)[::2])
    assert "empty" in line


def test_destination_exists_and_not_writable(tmp_path, tiny_model, capsys, calib_file):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    line = one_line_error(*run_cli(["quantize", tiny_model, "--out", dst, "--calib", calib_file, *FAST], capsys)[::2])
    assert "--force" in line and (dst / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_line_error(*run_cli(["quantize", tiny_model, "--out", blocker / "sub", "--calib", calib_file, *FAST], capsys)[::2])
    assert "not writable" in line or "not a directory" in line


def test_disk_full_mid_write_leaves_nothing(tmp_path, tiny_model, capsys, calib_file, monkeypatch):
    import dashq_vllm.checkpoint as ck

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ck, "save_file", full_disk)
    dst = tmp_path / "out"
    line = one_line_error(*run_cli(["quantize", tiny_model, "--out", dst, "--calib", calib_file, *FAST], capsys)[::2])
    assert "No space left" in line or "disk full" in line
    assert not dst.exists()
    assert list(tmp_path.glob(".out*")) == []  # no temporary directory left behind


def test_eval_rejects_bad_checkpoint(tmp_path, tiny_model, capsys, calib_file):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(tiny_model), "--out", str(out), "--calib", str(calib_file), *FAST]) == 0
    t = load_file(out / "model.safetensors")
    del t["model.layers.0.mlp.up_proj.scale"]
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    line = one_line_error(*run_cli(["eval", out, "--ppl", calib_file, "--device", "cpu", "--quiet"], capsys)[::2])
    assert "model.layers.0.mlp.up_proj.scale" in line
    (out / "dashq_config.json").write_text(json.dumps({"format": "something-else", "quantized_modules": {}}))
    line = one_line_error(*run_cli(["eval", out, "--ppl", calib_file, "--device", "cpu", "--quiet"], capsys)[::2])
    assert "unknown format" in line
