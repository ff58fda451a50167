"""Checks a DASH-Q checkpoint directory before ``vllm serve`` spends a minute starting up on it.

Everything is read from file headers (config JSON, safetensors headers through
``dashq_vllm.checkpoint``): no tensor data is loaded, so it takes milliseconds even for a
large model. Each problem is one line; :func:`serve_problems` returns them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dashq_vllm.checkpoint import checkpoint_problems
from dashq_vllm.format import CONFIG_FILENAME, FORMAT

MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass
class CheckpointReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chat_template: Path | None = None  # a template file to hand to vLLM, if the checkpoint has one
    has_quantization_config: bool = False
    summary: str = ""


def _config_checks(d: Path, report: CheckpointReport) -> None:
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # checkpoint_problems reports it
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in MOE_KEYS:
        val = cfg.get(key, text_cfg.get(key))
        if isinstance(val, int) and not isinstance(val, bool) and val > 0:
            report.problems.append(
                f"config.json: {key}={val}: mixture-of-experts models are not supported by the DASH-Q vLLM "
                "method yet")
            break
    qc = cfg.get("quantization_config", text_cfg.get("quantization_config"))
    if qc is not None:
        report.has_quantization_config = True
        method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
        if method != "dashq":
            report.problems.append(
                f"config.json: quantization_config has quant_method {qc.get('quant_method') if isinstance(qc, dict) else qc!r}, "
                "not 'dashq' (remove it, or it conflicts with --quantization dashq)")
        elif qc.get("format", FORMAT) != FORMAT:
            report.problems.append(f"config.json: quantization_config format {qc.get('format')!r} is not {FORMAT!r}")
    if not cfg.get("architectures"):
        report.problems.append("config.json: no 'architectures' entry; vLLM cannot pick a model class")


def _tokenizer_checks(d: Path, report: CheckpointReport, tokenizer_given: bool) -> None:
    if not tokenizer_given and not any((d / f).is_file() for f in TOKENIZER_FILES):
        report.problems.append(
            f"{d.name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); copy them from the base model "
            "or pass --tokenizer")
        return
    template = d / "chat_template.jinja"
    if template.is_file():
        report.chat_template = template
        return
    try:
        tc = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tc = {}
    if not tc.get("chat_template"):
        report.notes.append(
            "the checkpoint has no chat template: /v1/chat/completions will be refused unless you pass "
            "--chat-template (plain /v1/completions works)")


def serve_problems(model_dir: str | Path, tokenizer_given: bool = False) -> CheckpointReport:
    """All problems that would stop vLLM from serving ``model_dir`` with ``--quantization dashq``."""
    d = Path(model_dir)
    report = CheckpointReport(d)
    if not d.is_dir():
        report.problems.append(f"{d}: no such checkpoint directory")
        return report
    report.problems.extend(checkpoint_problems(d))
    if report.problems and not (d / CONFIG_FILENAME).is_file():
        return report  # not a DASH-Q checkpoint at all; the rest would only add noise
    _config_checks(d, report)
    _tokenizer_checks(d, report, tokenizer_given)
    if not report.problems:
        try:
            from dashq_vllm.format import load_dashq_config

            dq = load_dashq_config(d)
            bits = sorted({s.nbits for s in dq.modules.values()})
            groups = sorted({s.group_size for s in dq.modules.values()})
            report.summary = (f"{len(dq.modules)} DASH-Q linears, {'/'.join(map(str, bits))}-bit, group "
                              f"{'/'.join(map(str, groups))}")
        except Exception:  # noqa: BLE001 - already validated; the summary is cosmetic
            pass
    # dedupe, keep order
    seen: set[str] = set()
    report.problems = [p for p in report.problems if not (p in seen or seen.add(p))]
    return report
