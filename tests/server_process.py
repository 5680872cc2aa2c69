"""A real ``infercore serve`` process for API tests: started on 127.0.0.1 with a free port, waited for
until ``/health`` answers 200, and stopped with SIGTERM (then SIGKILL) afterwards.

Everything the process writes (stdout and stderr) goes to a log file, so a test can look for what
the server logged and a failed start reports the server's own words.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

INFERCORE = Path(sys.executable).with_name("infercore")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.1
# A port taken between probing it and the server binding it: try again with another one.
BIND_ATTEMPTS = 3

# Settings of the session's multi-model server (tests/conftest.py), which error tests check against.
MULTI_API_KEY = "sk-infercore-test-7f3a"
MULTI_MAX_CLIENT_BATCH_SIZE = 8
MULTI_PAYLOAD_LIMIT_BYTES = 100_000


class ServerFailedToStart(RuntimeError):
    pass


# Every server this process started, so none outlives a test session that ends abnormally.
_started: list[ServerProcess] = []


@atexit.register
def _stop_leftover_servers() -> None:
    for server in _started:
        server.stop(timeout_s=5)


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment with every route to a model hub made a dead end.

    Hub clients honour HF_ENDPOINT and the proxy variables; pointing them at a closed local port
    means any attempt to reach a hub fails at once instead of silently succeeding or hanging.
    The HF_*_OFFLINE switches (and the test session's TRITON_INTERPRET) are left out on purpose:
    `make serve` does not set them either.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERCORE_")}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRITON_INTERPRET"):
        env.pop(name, None)
    dead_end = "http://127.0.0.1:9"
    env.update(
        HF_ENDPOINT=dead_end,
        HTTP_PROXY=dead_end,
        HTTPS_PROXY=dead_end,
        http_proxy=dead_end,
        https_proxy=dead_end,
        NO_PROXY="",
        no_proxy="",
        PYTHONUNBUFFERED="1",
    )
    # One intra-op thread: on a small shared CI box, torch's default of one spinning thread per core
    # makes every request wait for descheduled threads (measured 20-30x slower under contention).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


class ServerProcess:
    """One ``infercore serve`` subprocess. ``args`` are the serve options after host and port."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None,
                 scheme: str = "http", verify: Any = True):
        self.args = list(args)
        self.scheme = scheme
        self.verify = verify  # httpx ``verify`` for polling /health over HTTPS
        self.log_path = log_path
        self.cwd = cwd
        self.env = env if env is not None else offline_env()
        self.port: int | None = None
        self.api_key: str | None = None
        self.proc: subprocess.Popen | None = None
        # True when SIGTERM was not enough and stop() had to SIGKILL the process.
        self.killed = False
        # Statuses /health answered while the server started (for diagnostics only).
        self.health_statuses: list[int] = []

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(INFERCORE), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        for attempt in range(BIND_ATTEMPTS):
            self.port = free_port()
            self._spawn()
            try:
                self.wait_healthy(timeout_s)
                return self
            except ServerFailedToStart:
                log = self.log()
                if attempt + 1 < BIND_ATTEMPTS and "address already in use" in log.lower():
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _started.append(self)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll /health until 200; fail with the server's log if it exits or the time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0, verify=self.verify, trust_env=False) as client:
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code is not None:
                    command = " ".join(self.command())
                    raise ServerFailedToStart(
                        f"`{command}` exited with code {code} before it was healthy; log:\n{self.log()}"
                    )
                try:
                    status = client.get(self.url + "/health").status_code
                except httpx.TransportError:
                    status = None
                if status is not None:
                    self.health_statuses.append(status)
                    if status == 200:
                        return
                time.sleep(POLL_INTERVAL_S)
        self.stop()
        raise ServerFailedToStart(f"server not healthy after {timeout_s:.0f}s; log:\n{self.log()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(timeout_s)
        return self.proc.returncode


def start_server(args: list[str], workdir: Path, name: str, timeout_s: float = START_TIMEOUT_S,
                 scheme: str = "http", verify: Any = True) -> ServerProcess:
    """Start a server whose log goes to ``workdir/<name>.log`` and wait until it is healthy."""
    workdir.mkdir(parents=True, exist_ok=True)
    return ServerProcess(args, workdir / f"{name}.log", cwd=workdir, scheme=scheme, verify=verify).start(timeout_s)
