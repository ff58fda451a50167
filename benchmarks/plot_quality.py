"""Plot perplexity vs bits per method from a `benchmarks/quality.py` results JSON, and print its
markdown table.

    python -m dashq_vllm.benchmarks.plot_quality benchmarks/results/quality-smollm2-135m-h100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dashq_vllm.benchmarks.quality import markdown_table

LABELS = {"rtn": "RTN (min/max)", "gptq": "GPTQ", "dashq": "DASH-Q"}


def plot(results: dict, png: Path, nsamples: int = 128) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    settings = sorted({(r["bits"], r["group_size"]) for r in runs.values() if r["method"] != "fp16"})
    xs = range(len(settings))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, label in LABELS.items():
        ys = []
        for b, g in settings:
            r = next((v for v in runs.values() if (v["method"], v["bits"], v["group_size"]) == (method, b, g)
                      and (method == "rtn" or v["nsamples"] == nsamples) and "ppl" in v), None)
            ys.append(r["ppl"] if r else float("nan"))
        ax.plot(xs, ys, marker="o", label=label)
    if "fp16" in runs:
        ax.axhline(runs["fp16"]["ppl"], color="gray", ls="--", label="bf16 source")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"{b}-bit g{g}" for b, g in settings])
    ax.set_ylabel("Wikipedia perplexity (log scale)")
    meta = results.get("meta", {})
    ax.set_title(f"{Path(str(meta.get('model', ''))).name}: calib {nsamples}x{meta.get('calib_seqlen')} news tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    results = json.loads(path.read_text())
    plot(results, path.with_suffix(".png"))
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
