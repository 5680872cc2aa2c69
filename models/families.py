"""The model families infercore can run, keyed by the ``model_type`` of a checkpoint's config.json.

Adding a family is one module with an encoder class (``from_checkpoint(config, reader)`` returning
a module whose ``forward(PackedBatch)`` gives [total_tokens, hidden]) plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .bert import BertEncoder
from .checkpoint import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    encoder: type
    # dtype for dtype="auto" on CUDA; CPU always runs float32
    cuda_dtype: torch.dtype = torch.float16


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), BertEncoder),
)


def family_for_config(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise CheckpointError(
        f"model_type {model_type!r} (architectures {config.get('architectures')}) is not supported; "
        f"supported model types: {', '.join(supported)}"
    )
