"""The seams ARCHITECTURE.md describes, read from the source: dependencies point one way
(server → models → kernels), and a dialect knows the engine only through canonical requests and
``ServerInfo``: it imports neither ``infercore.models``/``infercore.kernels`` nor another dialect, and
never reads the engine's loaded models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIALECTS = sorted(p for p in (ROOT / "server" / "dialects").glob("*.py") if p.name != "__init__.py")


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` (a module of ``package``) imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", DIALECTS, ids=[p.stem for p in DIALECTS])
def test_a_dialect_imports_no_model_code_and_no_other_dialect(path):
    imports = imported_modules(path, "infercore.server.dialects")
    below = sorted(m for m in imports if m.startswith(("infercore.models", "infercore.kernels")))
    assert not below, f"{path.name} imports {below}; describe models through server/info.py"
    others = {f"infercore.server.dialects.{p.stem}" for p in DIALECTS} - {f"infercore.server.dialects.{path.stem}"}
    crossing = sorted(m for m in imports if m in others or any(m.startswith(o + ".") for o in others))
    assert not crossing, f"{path.name} imports another dialect: {crossing}"


@pytest.mark.parametrize("path", DIALECTS, ids=[p.stem for p in DIALECTS])
def test_a_dialect_never_reads_the_engines_loaded_models(path):
    source = path.read_text()
    for reach in ("engine.models", "bi_encoder_rerankers", ".tokenizer", ".runner", ".scheduler"):
        assert reach not in source, f"{path.name} reads {reach}; put what it needs on ModelInfo or the result"


@pytest.mark.parametrize("folder", ["models", "kernels"])
def test_lower_layers_never_import_the_server(folder):
    package = f"infercore.{folder}"
    for path in sorted((ROOT / folder).glob("*.py")):
        imports = imported_modules(path, package)
        assert not [m for m in imports if m.startswith("infercore.server")], path.name
    if folder == "kernels":
        for path in sorted((ROOT / folder).glob("*.py")):
            assert not [m for m in imported_modules(path, package) if m.startswith("infercore.models")], path.name
