"""Dense embedding head: encoder → segment pooling → optional Dense layers → truncate → L2.

One ``EmbeddingModel.run`` call computes a whole packed batch on the device and returns only the
pooled vectors to the host, each already cut to the dimensions its request asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from ..kernels.segment_pool import padded_pool, pool_truncate_normalize, segment_pool, truncate_normalize
from .checkpoint import CheckpointError
from .contract import Encoder
from .model_dir import DenseSpec
from .packing import PackedBatch

_DENSE_ACTIVATIONS = {
    "tanh": torch.tanh,
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "sigmoid": torch.sigmoid,
}


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    """Per-input head options. ``dimensions`` None means the model's full width."""

    normalize: bool = True
    dimensions: int | None = None
    skip_leading: int = 0
    # Task adapter (LoRA) of models that have them (jina-embeddings-v3/v5); None: the base weights.
    task: str | None = None
    # The encoder's last hidden state of every token ([tokens, hidden], TEI's /embed_all) instead of
    # the pooled vector; pooling, Dense layers, dimensions and normalisation do not apply.
    per_token: bool = False


class DenseLayer(nn.Module):
    """sentence-transformers ``Dense``: Linear + activation on pooled vectors (fp32)."""

    def __init__(self, spec: DenseSpec, device: torch.device):
        super().__init__()
        weights = load_file(str(spec.path / "model.safetensors"), device="cpu")
        prefix = "linear." if "linear.weight" in weights else ""
        self.linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias, device=device)
        try:
            state = {"weight": weights[prefix + "weight"]}
            if spec.bias:
                state["bias"] = weights[prefix + "bias"]
            self.linear.load_state_dict(state)
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{spec.path}: Dense weights do not match its config ({exc})") from None
        self.act = _DENSE_ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class EmbeddingModel:
    """A packed encoder with a pooling head (a ``contract.Runner``). ``run`` writes no state, so the
    executor threads of one model share it."""

    task: ClassVar[str] = "text_embedding"
    listwise: ClassVar[bool] = False

    def __init__(self, encoder: Encoder, pooling: str, dense: Sequence[DenseLayer] = ()):
        self.encoder = encoder
        self.pooling = pooling
        self.dense = list(dense)
        self.dimensions = dense[-1].linear.out_features if dense else encoder.hidden_size

    @staticmethod
    def default_options() -> EmbedOptions:
        return EmbedOptions()

    @torch.inference_mode()
    def run(self, batch: PackedBatch, options: Sequence[EmbedOptions]) -> list[np.ndarray]:
        """Embed every input of ``batch``; ``options[i]`` applies to input i.

        Returns one float32 vector per input, of length ``options[i].dimensions`` (or full), or with
        ``options[i].per_token`` the input's [tokens, hidden] float32 hidden states.
        """
        if any(o.task for o in options):
            batch = dataclasses.replace(batch, adapters=tuple(o.task for o in options))
        return self.pool(self.encoder(batch), batch.cu_seqlens, options)

    @torch.inference_mode()
    def pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, options: Sequence[EmbedOptions]) -> list[np.ndarray]:
        """The head alone: packed hidden states [total_tokens, hidden] of the sequences ``cu_seqlens``
        delimits (inputs first, then any filler) → one vector per input, as ``run`` returns them.
        Other backends that compute the encoder themselves pool through here (``per_token``: the
        input's rows of ``hidden``), or through ``pool_padded``."""
        device = hidden.device
        num_seqs = cu_seqlens.shape[0] - 1
        skip = None
        if any(o.skip_leading for o in options):
            filler = [0] * (num_seqs - len(options))
            skip = torch.tensor([o.skip_leading for o in options] + filler, device=device)
        dims = [o.dimensions or self.dimensions for o in options]
        if self.dense:
            out = self._finish(segment_pool(hidden, cu_seqlens, self.pooling, skip)[: len(options)], dims, options)
        else:  # nothing between pooling and normalising: one fused kernel on CUDA
            out = pool_truncate_normalize(hidden, cu_seqlens, self.pooling, torch.tensor(dims, device=device),
                                          torch.tensor([o.normalize for o in options], device=device), skip)
        host = out.cpu().numpy()
        results = [host[i, :d] for i, d in enumerate(dims)]
        if any(o.per_token for o in options):
            bounds = cu_seqlens.tolist()
            for i, o in enumerate(options):
                if o.per_token:
                    results[i] = hidden[bounds[i]:bounds[i + 1]].float().cpu().numpy()
        return results

    @torch.inference_mode()
    def pool_padded(self, hidden: torch.Tensor, lengths: Sequence[int],
                    options: Sequence[EmbedOptions]) -> list[np.ndarray]:
        """``pool`` over a padded [batch, seq, hidden] layout, row i's tokens in its first
        ``lengths[i]`` positions (a padded backend's output): the same vectors, without packing."""
        skip = [o.skip_leading for o in options] if any(o.skip_leading for o in options) else None
        dims = [o.dimensions or self.dimensions for o in options]
        host = self._finish(padded_pool(hidden, lengths, self.pooling, skip), dims, options).cpu().numpy()
        results = [host[i, :d] for i, d in enumerate(dims)]
        for i, o in enumerate(options):
            if o.per_token:
                results[i] = hidden[i, : lengths[i]].float().cpu().numpy()
        return results

    def _finish(self, pooled: torch.Tensor, dims: list[int], options: Sequence[EmbedOptions]) -> torch.Tensor:
        """Pooled [N, H] → the Dense layers, then each row cut to its dimensions and L2-normalised
        where asked (one normalisation when every row keeps its width and is normalised)."""
        for layer in self.dense:
            pooled = layer(pooled)
        if all(d == self.dimensions for d in dims) and all(o.normalize for o in options):
            return F.normalize(pooled, dim=1)  # x / max(|x|, 1e-12), as truncate_normalize
        device = pooled.device
        return truncate_normalize(pooled, torch.tensor(dims, device=device),
                                  torch.tensor([o.normalize for o in options], device=device))
