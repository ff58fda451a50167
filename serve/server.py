"""Starting, waiting for and stopping a ``dashq-vllm serve`` process (tests, benchmarks,
``dashq-vllm chat --launch``).

The server runs in its own session (process group) so that stopping it also reaches the
engine processes vLLM forks; it is stopped through its PID: SIGTERM to the server (vLLM shuts
its engine down), then SIGKILL to the group it leads if it has not exited in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(ckpt) as srv: ... srv.base_url ...``"""

    def __init__(self, checkpoint: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 vllm_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log_path: str | Path | None = None, ready_timeout: float = 600.0):
        self.checkpoint = str(checkpoint)
        self.host = host
        self.port = port or free_port(host)
        self.vllm_args = list(vllm_args)
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="dashq-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dashq_vllm.serve.cli", "serve", self.checkpoint, "--host", self.host,
                "--port", str(self.port), *self.vllm_args]

    def start(self) -> "ServerProcess":
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        finally:
            log.close()
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float | None = None) -> "ServerProcess":
        """Poll ``/health`` until it answers 200; raise ServerError if the process exits or time runs out."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"server exited with status {code} before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        raise ServerError(f"server not ready after {timeout or self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server, then SIGKILL its process group if it outlives ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group this server leads (engine processes) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        code = self.proc.returncode
        if self._own_log and code in (0, -signal.SIGTERM, -signal.SIGKILL):
            self.log_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
