"""The model families infercore can run, keyed by the ``model_type`` of a checkpoint's config.json.

Adding a family is one module with an encoder class (``from_checkpoint(config, reader)`` returning
a module whose ``forward(PackedBatch)`` gives [total_tokens, hidden]), optional head loaders, plus
one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .bert import BertEncoder, load_bert_mlm_head
from .checkpoint import CheckpointError
from .layers import WeightReader
from .sparse import MlmHead


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    encoder: type
    # dtype for dtype="auto" on CUDA; CPU always runs float32
    cuda_dtype: torch.dtype = torch.float16
    # (encoder, reader) → the masked-LM head, for sparse embedding; None: no sparse models
    mlm_head: Callable[[Any, WeightReader], MlmHead] | None = None


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), BertEncoder, mlm_head=load_bert_mlm_head),
    # Absolute positions only; Jina's rotary XLM-R (jina-embeddings-v3) is a family of its own.
    Family("xlm-roberta", ("xlm-roberta", "roberta", "camembert"), BertEncoder, cuda_dtype=torch.bfloat16),
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
