"""Reading weights from a model directory: safetensors only, single file or sharded.

Pickled PyTorch files (``pytorch_model.bin``) can run arbitrary code when loaded, so a directory
that only has those is refused with an explanation instead of being loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


class CheckpointError(Exception):
    """A model directory or checkpoint that cannot be served; the message says why in plain words."""


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a model's weights, or a CheckpointError saying what is wrong."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        shards = sorted({model_dir / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are not in {model_dir}: {', '.join(missing)}")
        return shards
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    pickled = [name for name in PICKLE_FILES if (model_dir / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{model_dir} has only pickled PyTorch weights ({', '.join(pickled)}); infercore loads "
            "safetensors only, because pickle files can execute code. Convert them once, e.g. "
            "`python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"`"
        )
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        raise CheckpointError(
            f"{model_dir} has safetensors files ({', '.join(others)}) but neither {SAFETENSORS_FILE} "
            f"nor {SAFETENSORS_INDEX}"
        )
    raise CheckpointError(f"{model_dir} has no weights ({SAFETENSORS_FILE} not found)")


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Lazy name → tensor view over one or more safetensors files (memory-mapped, read on access)."""

    def __init__(self, files: list[Path]):
        self._handles = []
        self._where: dict[str, int] = {}
        for i, path in enumerate(files):
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
            self._handles.append(handle)
            for name in handle.keys():
                self._where[name] = i

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def open_weights(model_dir: Path) -> SafetensorsWeights:
    return SafetensorsWeights(weight_files(model_dir))
