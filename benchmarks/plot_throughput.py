"""Plot a throughput JSON (benchmarks/throughput.py): output tok/s vs batch size per config.

    python -m dashq_vllm.benchmarks.plot_throughput benchmarks/results/throughput-llama3-8b-h100.json \\
        benchmarks/results/throughput-llama3-8b-h100.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(json_path: str | Path, png_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(json_path).read_text())
    env = doc.get("environment", {})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [n for n in doc["results"] if not n.startswith("_")]
    ref = "fp16" if "fp16" in names else names[0]  # the speed-ups' baseline
    base = {r["batch"]: r["output_tok_s"] for r in doc["results"][ref]["rows"]}
    for name in names:
        res = doc["results"][name]
        rows = res["rows"]
        b = [r["batch"] for r in rows]
        ax.plot(b, [r["output_tok_s"] for r in rows], marker="o", label=f"{name} ({res.get('weights_gib', '?')} GiB)")
        ax2.plot(b, [r["output_tok_s"] / base[r["batch"]] for r in rows], marker="o", label=name)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("batch size (concurrent requests)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens/s")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel(f"speed-up over {ref}")
    s = doc.get("settings", {})
    real = any(res.get("config", {}).get("model_dir") for res in doc["results"].values() if isinstance(res, dict))
    settings = env.get("dashq_settings", {})
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()) if k != "DASHQ_KERNEL_CONFIGS")
    tuned = " + tuned table" if settings.get("DASHQ_KERNEL_CONFIGS") else ""
    fig.suptitle(f"vLLM {env.get('vllm')} offline generate, {doc.get('shape')} "
                 f"({'real checkpoints' if real else 'dummy weights'}{', ' + knobs if knobs else ''}{tuned}), "
                 f"{s.get('input_len')} in / {s.get('output_len')} out, {env.get('gpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
