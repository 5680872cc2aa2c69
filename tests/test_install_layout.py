"""The install a fresh clone gets: no folder of the repository shadows an installed distribution, and
the installed versions are the lock's.

Every test here runs Python as a user does, from the repository root (which puts the root on
``sys.path``: ``python -c``, ``python -m pytest``, a script run from a checkout).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The repository's top-level folders whose names are also names of packages on PyPI.
TOP_LEVEL_FOLDERS = ("server", "models", "kernels", "proto")


def run_from_root(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_top_level_folders_are_not_regular_packages():
    # A folder with __init__.py on sys.path outranks any installed package of the same name.
    for name in TOP_LEVEL_FOLDERS:
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow PyPI's {name!r}"


def test_installed_distributions_win_over_the_repository_folders(tmp_path):
    # Stand-ins for installed distributions named like our folders, on the path after the root.
    for name in TOP_LEVEL_FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"INSTALLED = {name!r}\n")
    code = "import json, " + ", ".join(TOP_LEVEL_FOLDERS) + "\n"
    code += f"print(json.dumps({{n: getattr(__import__(n), 'INSTALLED', None) for n in {TOP_LEVEL_FOLDERS!r}}}))"
    proc = run_from_root(code, {"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {name: name for name in TOP_LEVEL_FOLDERS}


def test_transformers_and_its_kernels_distribution_import_from_the_root():
    code = (
        "import importlib.util, json, transformers.modeling_utils, sentence_transformers\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'origin': spec and spec.origin}))"
    )
    proc = run_from_root(code)
    assert proc.returncode == 0, proc.stderr
    origin = json.loads(proc.stdout.strip().splitlines()[-1])["origin"]
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        # Without the distribution the name is at most our folder as an empty namespace portion.
        assert origin is None
    else:
        assert origin is not None and Path(origin).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()


def test_infercore_subpackages_import_from_the_root_and_from_elsewhere(tmp_path):
    code = ("import infercore.kernels.fused_norm, infercore.models.bert, infercore.server.engine\n"
            "print(infercore.server.engine.__file__)")
    for cwd in (ROOT, tmp_path):
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).resolve() == ROOT / "server" / "engine.py"


def test_a_plain_checkout_imports_without_any_install(tmp_path):
    # A GPU host runs the suite from a checkout: no editable finder (-S skips site), the root on the path.
    import site

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    code = "import infercore.models.loader, infercore.server.engine, infercore.kernels.splade_pool; print('ok')"
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ---- the lock -------------------------------------------------------------------------------------

def _lock_path() -> Path | None:
    # `make test` names the lock it installed from; `make test-latest` runs unlocked ("none").
    value = os.environ.get("INFERCORE_LOCK", "locks/cpu.txt")
    return None if value == "none" else ROOT / value


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normalise(name)] = version
    return pins


def test_lock_files_pin_every_package_exactly():
    for kind in ("cpu", "cuda"):
        pins = read_lock(ROOT / "locks" / f"{kind}.txt")
        for name in ("torch", "transformers", "sentence-transformers", "tokenizers", "numpy", "grpcio",
                     "protobuf", "triton", "kernels"):
            assert name in pins, f"{kind} lock lacks {name}"
        assert "infercore" not in pins
    assert read_lock(ROOT / "locks" / "cpu.txt")["torch"] == "2.13.0+cpu"


def test_each_lock_has_one_onnx_runtime_build():
    # onnxruntime and onnxruntime-gpu install the same module and overwrite each other's files.
    cpu, cuda = read_lock(ROOT / "locks" / "cpu.txt"), read_lock(ROOT / "locks" / "cuda.txt")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert "onnx" in cpu and "onnx" in cuda


def test_installed_versions_are_the_locks():
    lock = _lock_path()
    if lock is None:
        pytest.skip("unlocked run (make test-latest)")
    pins = read_lock(lock)
    installed = {_normalise(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}
    for name in ("transformers", "sentence-transformers", "tokenizers", "numpy", "grpcio", "protobuf", "torch"):
        assert installed.get(name) == pins[name], f"{name}: installed {installed.get(name)}, locked {pins[name]}"
    differing = {name: (version, pins[name]) for name, version in installed.items()
                 if name in pins and version != pins[name]}
    assert not differing, f"installed versions differ from {lock.name}: {differing}"
    # A dependency added to pyproject.toml without `make lock` installs unpinned: caught here.
    unlocked = sorted(set(installed) - set(pins) - {"pip", "infercore", "wheel"})
    assert not unlocked, f"installed but not in {lock.name} (run `make lock`): {unlocked}"
