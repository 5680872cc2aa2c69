"""The client venvs of the client matrix (``make clients``): one per client library under
``.cache/clients/<name>/``, installed from ``locks/clients/<name>.txt``, and how a test runs a client's
script (``tests/clients/<name>_client.py``) with it. Used by tests/test_client_matrix.py and, for
tritonclient, tests/test_oip.py.

A missing venv, or one built from another lock, fails the test naming ``make clients``: a client test
that skips tests nothing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.server_process import offline_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "clients"
CLIENT_VENVS = ROOT / ".cache" / "clients"
# One script run: the client's import plus a dozen calls on two CPU cores shared with the server.
CLIENT_TIMEOUT_S = 180.0


def client_env() -> dict[str, str]:
    """The server tests' offline environment (HF_ENDPOINT a dead end), but with 127.0.0.1 reachable
    directly: the clients use httpx/requests (and gRPC honours http_proxy), which would send it to the
    dead-end proxy. Not HF_HUB_OFFLINE: huggingface_hub then refuses every URL, the server's included."""
    env = offline_env({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "grpc_proxy"):
        env.pop(name, None)
    return env


def client_python(name: str) -> Path:
    """The python of the ``name`` client's venv; fails the test when the venv is missing or was built
    from another lock than locks/clients/<name>.txt."""
    python = CLIENT_VENVS / name / "bin" / "python"
    stamp = CLIENT_VENVS / name / ".installed"
    if not stamp.is_file() or not python.is_file():
        pytest.fail(f"the {name} client's venv {python.parent.parent} is missing: run `make clients` "
                    f"(installs locks/clients/{name}.txt into it)")
    lock = hashlib.sha256((ROOT / "locks" / "clients" / f"{name}.txt").read_bytes()).hexdigest()
    if stamp.read_text().strip() != lock:
        pytest.fail(f"the {name} client's venv was built from another lock than locks/clients/{name}.txt: "
                    "run `make clients`")
    return python


def run_client(name: str, job: dict) -> dict:
    """Run tests/clients/<name>_client.py with the client's own venv and ``job`` (JSON, argv[1]); its
    JSON output."""
    python = client_python(name)
    started = time.monotonic()
    done = subprocess.run([str(python), str(SCRIPTS / f"{name}_client.py"), json.dumps(job)], capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT_S, env=client_env(), cwd=SCRIPTS)
    assert done.returncode == 0, f"{name} client failed after {time.monotonic() - started:.1f}s:\n{done.stderr}"
    return json.loads(done.stdout)
