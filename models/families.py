"""The model families infercore can run, keyed by the ``model_type`` of a checkpoint's config.json.

Adding a family is one module with an encoder class (a ``contract.Encoder``: ``from_checkpoint(config,
reader)`` returning a module whose ``forward(PackedBatch)`` gives [total_tokens, hidden]) and the
``contract.Heads`` its checkpoints carry, plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .bert import BERT_HEADS, XLMR_HEADS, BertEncoder
from .checkpoint import CheckpointError
from .contract import EncoderClass, Heads
from .jina_xlmr import HEADS as JINA_XLMR_HEADS
from .jina_xlmr import MODEL_TYPES as JINA_MODEL_TYPES
from .jina_xlmr import JinaXlmrEncoder
from .jina_xlmr import accepts_config as jina_accepts_config
from .listwise import QWEN3_HEADS
from .llama_like import HEADS as LLAMA_LIKE_HEADS
from .llama_like import EuroBertEncoder, JinaEmbeddingsV5Encoder, Qwen3Encoder


@dataclass(frozen=True)
class Family:
    """One family: its encoder class and heads (capabilities: ``heads.tasks``, ``heads.listwise``)."""

    name: str
    model_types: tuple[str, ...]
    encoder: EncoderClass
    heads: Heads
    # dtype for dtype="auto" on CUDA; CPU always runs float32
    cuda_dtype: torch.dtype = torch.float16
    # config → whether this family takes it, for families sharing a model_type; None: all of them
    accepts: Callable[[dict[str, Any]], bool] | None = None


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), BertEncoder, BERT_HEADS),
    # Before "xlm-roberta": takes the rotary-position configs of that model_type.
    Family("jina-xlm-roberta", JINA_MODEL_TYPES, JinaXlmrEncoder, JINA_XLMR_HEADS, cuda_dtype=torch.bfloat16,
           accepts=jina_accepts_config),
    # Absolute positions only; Jina's rotary XLM-R (jina-embeddings-v3) is a family of its own.
    Family("xlm-roberta", ("xlm-roberta", "roberta", "camembert"), BertEncoder, XLMR_HEADS,
           cuda_dtype=torch.bfloat16),
    Family("qwen3", ("qwen3",), Qwen3Encoder, QWEN3_HEADS, cuda_dtype=torch.bfloat16),
    Family("eurobert", ("eurobert",), EuroBertEncoder, LLAMA_LIKE_HEADS, cuda_dtype=torch.bfloat16),
    # jina-embeddings-v5 configs: Qwen3 (-small) or EuroBERT (-nano) by is_decoder, with task adapters.
    Family("jina-embeddings-v5", ("jina_embeddings_v5",), JinaEmbeddingsV5Encoder, LLAMA_LIKE_HEADS,
           cuda_dtype=torch.bfloat16),
)


def family_for_config(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types and (family.accepts is None or family.accepts(config)):
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise CheckpointError(
        f"model_type {model_type!r} (architectures {config.get('architectures')}) is not supported; "
        f"supported model types: {', '.join(supported)}"
    )
