"""The seam between an executor and the runtime that computes a model: one narrow interface.

An executor hands a backend the token ids of the inputs it took from the scheduler and gets one
result per input back; it knows nothing else about the runtime. A backend:

- builds its own batch (``make_batch``): packed (padding-free, ``PackedBatch``) for torch, padded
  and grouped by length (``PaddedBatch``) for ONNX Runtime; ``is_padded`` tells the scheduler to
  count padded tokens against the batch budget, ``computed_tokens`` the executor what padding cost;
- computes it (``run``): per input a float32 vector (text_embedding, cut to the dimensions asked),
  a ``SparseVector`` (sparse_embedding) or a float logit (rerank): the heads' own contract;
- gives each executor thread its instance (``for_executor``): torch sets that thread's intra-op
  threads, ONNX Runtime opens a session with that many threads, so executors never oversubscribe;
- says what it is (``name``, ``precision``) for /info and /metrics, and whether an exception is an
  out-of-memory one (the executor splits such a batch in halves).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .packing import PackedBatch, pack_sequences


class Backend(Protocol):
    name: str  # "torch" | "onnx"
    precision: str  # "float32" | "bfloat16" | "float16" | "int8"
    is_padded: bool

    def make_batch(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None,
                   options: Sequence[Any]) -> Any:
        """The inputs' batch in this backend's layout (on its device)."""

    def computed_tokens(self, batch: Any) -> int:
        """Token positions the batch computes, padding (and filler) included."""

    def run(self, batch: Any, options: Sequence[Any]) -> list[Any]:
        """One result per input of ``batch``; ``options[i]`` applies to input i."""

    def for_executor(self, threads: int | None) -> Backend:
        """The instance an executor thread runs with, using ``threads`` intra-op threads (None:
        the runtime's default). Called on that thread."""

    def is_out_of_memory(self, exc: BaseException) -> bool: ...


class TorchBackend:
    """The packed torch path: the runner (encoder + head) on ``device`` in ``dtype``."""

    name = "torch"
    is_padded = False

    def __init__(self, runner: Any, device: torch.device, dtype: torch.dtype):
        self.runner = runner
        self.device = device
        self.precision = str(dtype).removeprefix("torch.")

    def make_batch(self, ids, type_ids, options) -> PackedBatch:
        # Pinned host memory on CUDA: the copy to the device is asynchronous.
        return pack_sequences(ids, type_ids, device=self.device, pin_memory=self.device.type == "cuda")

    def computed_tokens(self, batch: PackedBatch) -> int:
        return batch.total_tokens

    def run(self, batch: PackedBatch, options) -> list[Any]:
        return list(self.runner.run(batch, options))

    def for_executor(self, threads: int | None) -> TorchBackend:
        if self.device.type == "cpu" and threads:
            # OpenMP and MKL thread counts are per calling thread: this sets the executor's only.
            torch.set_num_threads(threads)
        return self

    def is_out_of_memory(self, exc: BaseException) -> bool:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        message = str(exc)
        return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
