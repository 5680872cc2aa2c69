"""The model contract: what a family's encoder, its heads and a task's runner promise the rest of
infercore, as structural types (``typing.Protocol``) with capability flags instead of attributes
probed with ``getattr``.

- ``Encoder``: a family's module from token ids to hidden states over a ``PackedBatch``, with what
  the loaded checkpoint supports (task adapters, their instructions, where its weights sit).
- ``Heads``: the task heads a family's checkpoints carry, each loaded by the family's own file from
  its own key layout (as vLLM's family files own their ``*For<Task>`` classes). Generic code holds
  the head modules (``sparse.MlmHead``, ``rerank.ClassifierHead``, ``listwise.Projector``), never
  their checkpoint names.
- ``Runner``: an encoder with a task's head, the one thing executors call (``run``), with the flags
  front ends and the engine read (``task``, ``pooling``, ``dimensions``, ``listwise``);
  ``ListwiseRunner`` adds the host-side steps of a runner whose requests are laid out in blocks.

Implemented by ``bert.BertEncoder``, ``jina_xlmr.JinaXlmrEncoder``, ``llama_like.Qwen3Encoder`` /
``EuroBertEncoder`` and the runners in ``embedding``, ``sparse``, ``rerank`` and ``listwise``;
``families.FAMILIES`` pairs each encoder class with its ``Heads``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

if TYPE_CHECKING:
    from .layers import WeightReader
    from .listwise import BlockEmbeddings, ListwiseLayout, Projector
    from .packing import PackedBatch
    from .rerank import ClassifierHead
    from .sparse import MlmHead
    from .tokenizer import TextTokenizer

# The tasks a runner can serve, in the order front ends list them.
TASKS = ("text_embedding", "sparse_embedding", "rerank")


@runtime_checkable
class Encoder(Protocol):
    """Token ids → final hidden states [total_tokens, hidden_size] over a ``PackedBatch``.

    ``forward`` writes no state, so the executor threads of one model share the module.
    """

    family: ClassVar[str]
    hidden_size: int
    # Longest sequence the positions support (tokens, special tokens included).
    max_positions: int
    # Key prefix of the backbone in the checkpoint ('' / 'bert.' / 'roberta.' / 'model.' ...): what
    # the saving class put in front of it. Heads are found relative to it.
    weight_prefix: str
    # Task adapters (LoRA) an input may select through ``PackedBatch.adapters``; () for none.
    adapter_names: tuple[str, ...]
    # Task → instruction prefix as the checkpoint's config states it ({} when it states none).
    task_instructions: Mapping[str, str]
    # The family's config dataclass (widths the kernel self-check and benchmarks read).
    config: Any

    def __call__(self, batch: PackedBatch) -> torch.Tensor: ...


class EncoderClass(Protocol):
    """What ``families.Family.encoder`` holds: builds a loaded ``Encoder`` from a checkpoint."""

    def from_checkpoint(self, config: dict[str, Any], reader: WeightReader) -> Encoder: ...


@dataclass(frozen=True)
class Heads:
    """The task heads a family's checkpoints carry, declared by the family's file.

    mlm:        (encoder, reader) → the masked-LM head (sparse embedding); None: no sparse models
    classifier: (encoder, reader, config.json) → the one-logit sequence-classification head
                (cross-encoder rerank); None: no cross-encoders
    listwise:   (encoder, reader) → the listwise ranking projector, or None when this checkpoint
                has none (jina-reranker-v3 on a Qwen3 backbone); None: no listwise rerankers
    weight_prefixes: checkpoint key prefixes (below the backbone's root) of heads this family's
                checkpoints may carry; a task that leaves them unused is not warned about
    """

    mlm: Callable[[Encoder, WeightReader], MlmHead] | None = None
    classifier: Callable[[Encoder, WeightReader, dict[str, Any]], ClassifierHead] | None = None
    listwise: Callable[[Encoder, WeightReader], Projector | None] | None = None
    weight_prefixes: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks some checkpoint of the family can serve (every encoder embeds)."""
        rerank = self.classifier is not None or self.listwise is not None
        return tuple(
            task for task, served in zip(TASKS, (True, self.mlm is not None, rerank), strict=True) if served
        )


OptionsT = TypeVar("OptionsT")
ResultT = TypeVar("ResultT", covariant=True)


@runtime_checkable
class Runner(Protocol[OptionsT, ResultT]):
    """An encoder with a task's head. ``run`` writes no state, so the executor threads of one model
    share it; it computes a whole packed batch and returns one host-side result per input.

    Flags, read by the loader, the engine and front ends instead of the runner's class:

    task:       one of TASKS
    pooling:    how token states become the result ("mean", "cls", "last", "splade", "special_tokens"...)
    dimensions: width of one result (1 for rerank)
    listwise:   True for a ``ListwiseRunner``: a request is laid out in blocks by ``build_blocks``, the
                blocks run as inputs, ``merge_blocks`` turns their results into scores; False: one
                input per text (embedding) or per (query, document) window (cross-encoder)
    """

    task: ClassVar[str]
    listwise: ClassVar[bool]
    pooling: str
    dimensions: int
    encoder: Encoder

    def default_options(self) -> OptionsT: ...

    def run(self, batch: PackedBatch, options: Sequence[OptionsT]) -> list[ResultT]: ...


@runtime_checkable
class ListwiseRunner(Runner[Any, Any], Protocol):
    """A runner whose requests are laid out in blocks of documents read together (``listwise`` True)."""

    def build_blocks(
        self,
        tokenizer: TextTokenizer,
        query: str,
        documents: Sequence[str],
        max_query_tokens: int,
        limit: int,
        truncate: bool,
    ) -> ListwiseLayout: ...

    def merge_blocks(self, blocks: Sequence[BlockEmbeddings]) -> list[float]: ...
