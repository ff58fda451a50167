"""Bounded worker processes for the benchmark drivers.

A vLLM worker starts engine processes of its own; ``subprocess.run(..., timeout=)`` kills only the
direct child and leaves those engines holding the GPU (and the next configuration then fails to
start). :func:`run_bounded` runs the command as the leader of a new session and, on timeout,
kills the whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

TIMEOUT = "timeout"


def run_bounded(cmd: Sequence[str], timeout: float | None, env: Mapping[str, str] | None = None,
                grace: float = 10.0) -> tuple[str, int | str]:
    """Run ``cmd``; return (stdout + stderr, exit code), or (output so far, ``"timeout"``) after
    ``timeout`` seconds, when the command's process group is sent SIGTERM and, ``grace`` seconds
    later, SIGKILL."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else None, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        code = TIMEOUT
    _signal_group(proc.pid, signal.SIGKILL)  # engine processes that outlived their parent
    return (out or "") + (err or ""), code


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
