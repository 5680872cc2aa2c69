"""Jina's XLM-RoBERTa with rotary positions and task LoRA adapters, over packed tokens:
jina-embeddings-v3 and the text tower of jina-clip-v2.

Published layout (``XLMRobertaLoRA`` over Jina's flash XLM-R): weights under ``roberta.`` (for
jina-clip-v2 under the text tower's own prefix), ``emb_ln``, ``encoder.layers.N.{mixer.Wqkv,
mixer.out_proj, norm1, mlp.fc1, mlp.fc2, norm2}``, no position table. Every Linear and Embedding is
a torch parametrization: the base weight is ``<module>.parametrizations.weight.original`` and the
adapters of all tasks are stacked in ``.parametrizations.weight.0.lora_A`` / ``.0.lora_B``:

- Linear [out, in]:      lora_A [tasks, rank, in], lora_B [tasks, out, rank]; delta_t = B[t] @ A[t]
- Embedding [num, dim]:  lora_A [tasks, num, rank], lora_B [tasks, rank, dim]; delta_t = A[t] @ B[t]

scaled by ``lora_alpha / lora_rank``; task t is index t of ``lora_adaptations``. The published code
materialises ``W + delta_t`` on every call. Here nothing is merged: one copy of the base weights,
and each task's factors are read into the packed multi-task LoRA of lora.py (the scaling folded
into B), which adds a task's low-rank delta to the rows of that task's tokens only, so one batch
mixes tasks and a token's result does not depend on the tasks of the tokens beside it.

Which adapter an input gets: ``PackedBatch.adapters``; None means the base weights for
jina-embeddings-v3 (its ``encode(task=None)`` disables every adapter) and the default adapter for
jina-clip-v2 (``default_lora_task``, which its text tower always applies when no task is given).

Blocks are post-LN (``x = LN(x + attn(x)); x = LN(x + mlp(x))``), attention is bidirectional and
RoPE is GPT-NeoX style (rotate-half, not interleaved) over ``rotary_emb_dim`` (default head_dim)
with base ``rotary_emb_base``; positions count from 0 in every sequence and the cos/sin tables are
computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import varlen_attention
from .bert import load_classifier_head
from .checkpoint import CheckpointError
from .contract import Heads
from .layers import WeightReader, apply_rope, assign, find_prefix, load_layer_norm, rope_cos_sin, rope_inv_freq
from .lora import AdaptedEmbedding, AdaptedLinear, LowRankDelta, TaskRows, task_rows
from .packing import PackedBatch

MODEL_TYPES = ("xlm-roberta", "jina_clip")

# jina-clip-v2's config names its text tower's base model (``hf_model_name_or_path``) instead of
# describing it; the published code fetches that model's config.json from the hub and overlays
# ``hf_model_config_kwargs``. Offline, the base config of the one known text tower stands in.
JINA_V3_REPO = "jinaai/jina-embeddings-v3"
JINA_V3_CONFIG: dict[str, Any] = {
    "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 8194,
    "type_vocab_size": 1, "pad_token_id": 1, "position_embedding_type": "rotary", "rotary_emb_base": 20000.0,
    "lora_adaptations": ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"],
    "lora_rank": 4, "lora_alpha": 1,
}

# Jina's flash MLP applies GELU whatever ``hidden_act`` says; tanh-approximated for these names.
_GELU_TANH = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
_GELU_ACTS = ("gelu", "gelu_python", *_GELU_TANH)

# Heads: the (XLM-)RoBERTa sequence-classification layout (bert.py); the masked-LM head is not read.
HEADS = Heads(classifier=load_classifier_head, weight_prefixes=("pooler.", "lm_head.", "classifier."))

_ORIGINAL = ".parametrizations.weight.original"
_LORA_A = ".parametrizations.weight.0.lora_A"
_LORA_B = ".parametrizations.weight.0.lora_B"


def accepts_config(config: dict[str, Any]) -> bool:
    """Whether a config of one of MODEL_TYPES is this family's: XLM-R with rotary positions (absolute
    ones are the BERT encoder's), or a jina-clip model (its text tower)."""
    return config.get("model_type") == "jina_clip" or config.get("position_embedding_type") == "rotary"


@dataclass(frozen=True)
class JinaXlmrConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_dim: int
    rotary_base: float
    gelu_approximate: str = "none"
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    max_positions: int = 8192
    # Task adapters: names in checkpoint order, rank, alpha / rank, and the adapter an input with
    # no task gets (None: the base weights).
    adapter_names: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_scaling: float = 1.0
    default_adapter: str | None = None
    task_instructions: dict[str, str] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> JinaXlmrConfig:
        """From jina-embeddings-v3's config.json, or jina-clip-v2's (its ``text_config``)."""
        default_adapter = None
        if config.get("model_type") == "jina_clip":
            text = config.get("text_config") or {}
            base = text.get("hf_model_name_or_path", JINA_V3_REPO)
            if base != JINA_V3_REPO:
                raise CheckpointError(
                    f"jina-clip text tower {base!r} is not supported (only the {JINA_V3_REPO} backbone, whose "
                    "config is known offline)"
                )
            config = {**JINA_V3_CONFIG, **(text.get("hf_model_config_kwargs") or {})}
            default_adapter = text.get("default_lora_task")
        if config.get("position_embedding_type") != "rotary":
            raise CheckpointError("the Jina XLM-R family needs position_embedding_type 'rotary'")
        if config.get("rotary_emb_interleaved") or config.get("rotary_emb_scale_base") is not None:
            raise CheckpointError("interleaved or XPos-scaled rotary embeddings are not supported")
        act = config.get("hidden_act", "gelu")
        if act not in _GELU_ACTS:
            raise CheckpointError(f"hidden_act {act!r} is not supported by the Jina XLM-R family (GELU only)")
        try:
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            if hidden % heads:
                raise CheckpointError("hidden_size is not a multiple of num_attention_heads")
            rotary_dim = int(config.get("rotary_emb_dim") or hidden // heads)
            if rotary_dim % 2 or not 0 < rotary_dim <= hidden // heads:
                raise CheckpointError(f"rotary_emb_dim {rotary_dim} must be even and at most the head size")
            pad = config.get("pad_token_id")
            names, rank, scaling = _adapters(config)
            instructions = config.get("task_instructions") or {}
            for task in [*instructions, default_adapter]:
                if task is not None and task not in names:
                    raise CheckpointError(
                        f"task {task!r} is named in the config but is not one of lora_adaptations {list(names)}"
                    )
            return cls(
                vocab_size=config["vocab_size"],
                hidden_size=hidden,
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=heads,
                intermediate_size=config["intermediate_size"],
                rotary_dim=rotary_dim,
                rotary_base=float(config.get("rotary_emb_base", 10000.0)),
                gelu_approximate="tanh" if act in _GELU_TANH else "none",
                type_vocab_size=config.get("type_vocab_size", 1),
                layer_norm_eps=config.get("layer_norm_eps", 1e-5),
                # RoPE has no table; the limit is the trained length, which the config states
                # RoBERTa-style (two rows more than the usable positions: 8194 for 8192 tokens).
                max_positions=config.get("max_position_embeddings", 8194) - (1 if pad is None else pad) - 1,
                adapter_names=names,
                lora_rank=rank,
                lora_scaling=scaling,
                default_adapter=default_adapter,
                task_instructions=dict(instructions),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}") from None


def _adapters(config: dict[str, Any]) -> tuple[tuple[str, ...], int, float]:
    """(task names, rank, scaling) from ``lora_adaptations`` / ``lora_rank`` / ``lora_alpha``."""
    names = config.get("lora_adaptations")
    if not names:
        return (), 0, 1.0
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"lora_adaptations must be a list of task names, got {names!r}")
    if len(set(names)) != len(names):
        raise CheckpointError(f"lora_adaptations names a task twice: {names}")
    rank, alpha = config.get("lora_rank", 4), config.get("lora_alpha", 1)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise CheckpointError(f"lora_rank {rank!r} / lora_alpha {alpha!r} must be positive numbers")
    return tuple(names), rank, alpha / rank


def load_adapted_linear(module: AdaptedLinear, reader: WeightReader, prefix: str, cfg: JinaXlmrConfig) -> None:
    """A parametrized Linear: its base weight and bias, and one delta per task from the stacked
    lora_A [tasks, rank, in] / lora_B [tasks, out, rank]."""
    assign(module.linear, "weight", _base_weight(reader, prefix))
    assign(module.linear, "bias", reader.get(prefix + ".bias"))
    lora = _read_lora(reader, prefix, cfg, "linear", *reversed(module.linear.weight.shape))
    if lora is not None:
        a, b = lora
        for task in range(len(cfg.adapter_names)):
            module.set_delta(task, LowRankDelta(_cast(a[task], reader), [(slice(None), _scaled(b[task], cfg, reader))]))


def load_adapted_embedding(
    module: AdaptedEmbedding, reader: WeightReader, prefix: str, cfg: JinaXlmrConfig
) -> None:
    """A parametrized Embedding: its base table, and one delta per task from the stacked
    lora_A [tasks, num, rank] (looked up per token) / lora_B [tasks, rank, dim]."""
    assign(module, "weight", _base_weight(reader, prefix))
    lora = _read_lora(reader, prefix, cfg, "embedding", *module.weight.shape)
    if lora is not None:
        a, b = lora
        for task in range(len(cfg.adapter_names)):
            delta = LowRankDelta(_cast(a[task], reader), [(slice(None), _scaled(b[task].T, cfg, reader))], lookup=True)
            module.set_delta(task, delta)


def _cast(tensor: torch.Tensor, reader: WeightReader) -> torch.Tensor:
    return tensor.to(dtype=reader.dtype).contiguous()


def _scaled(b: torch.Tensor, cfg: JinaXlmrConfig, reader: WeightReader) -> torch.Tensor:
    """B with the scaling (lora_alpha / lora_rank) folded in, in fp32, then cast to the model dtype."""
    return (b * cfg.lora_scaling).to(dtype=reader.dtype).contiguous()


def _base_weight(reader: WeightReader, prefix: str) -> torch.Tensor:
    """The parametrized base weight, or a plain ``.weight`` in checkpoints saved without adapters."""
    return reader.get_any(prefix + _ORIGINAL, prefix + ".weight")


def _read_lora(
    reader: WeightReader, prefix: str, cfg: JinaXlmrConfig, kind: str, dim0: int, dim1: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A module's stacked adapters in fp32, shape-checked; None when the model has none.

    kind "linear": dim0, dim1 = in, out; "embedding": dim0, dim1 = num_embeddings, dim.
    """
    names = (prefix + _LORA_A, prefix + _LORA_B)
    if not cfg.adapter_names:
        if any(n in reader for n in names):
            raise CheckpointError(
                f"the checkpoint holds task adapters ({names[0]}) but config.json has no lora_adaptations naming them"
            )
        return None
    tasks, rank = len(cfg.adapter_names), cfg.lora_rank
    if kind == "linear":
        expected = ((tasks, rank, dim0), (tasks, dim1, rank))
    else:
        expected = ((tasks, dim0, rank), (tasks, rank, dim1))
    tensors = []
    for name, shape in zip(names, expected, strict=True):
        if name not in reader:
            raise CheckpointError(f"config.json lists lora_adaptations but the checkpoint has no {name!r}")
        tensor = reader.get(name, dtype=torch.float32)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{name} has shape {tuple(tensor.shape)}, expected {shape} ({tasks} lora_adaptations, "
                f"lora_rank {rank})"
            )
        tensors.append(tensor)
    return tensors[0], tensors[1]


class JinaEmbeddings(nn.Module):
    """Word + token-type embeddings (no position table), then ``emb_ln``."""

    def __init__(self, cfg: JinaXlmrConfig):
        super().__init__()
        self.word = AdaptedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type = AdaptedEmbedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch, routes: list[TaskRows]) -> torch.Tensor:
        x = self.word(batch.input_ids, routes)
        if self.token_type is not None:
            types = batch.token_type_ids
            if types is None:
                types = torch.zeros_like(batch.input_ids)
            x = x + self.token_type(types, routes)
        return self.norm(x)

    def load(self, reader: WeightReader, prefix: str, cfg: JinaXlmrConfig) -> None:
        load_adapted_embedding(self.word, reader, prefix + "embeddings.word_embeddings", cfg)
        if self.token_type is not None:
            load_adapted_embedding(self.token_type, reader, prefix + "embeddings.token_type_embeddings", cfg)
        load_layer_norm(self.norm, reader, prefix + "emb_ln")


class JinaLayer(nn.Module):
    """Post-LN block with fused Wqkv, RoPE on q and k, and LoRA on all four Linears."""

    def __init__(self, cfg: JinaXlmrConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.qkv = AdaptedLinear(h, (3 * h,), bias=True)
        self.attn_out = AdaptedLinear(h, (h,), bias=True)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = AdaptedLinear(h, (cfg.intermediate_size,), bias=True)
        self.ffn_out = AdaptedLinear(cfg.intermediate_size, (h,), bias=True)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.gelu_approximate = cfg.gelu_approximate

    def forward(
        self,
        x: torch.Tensor,
        batch: PackedBatch,
        rotary: tuple[torch.Tensor, torch.Tensor],
        routes: list[TaskRows],
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x, routes).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
        attn = varlen_attention(q, k, v, batch).reshape(tokens, -1)
        x = self.attn_norm(x + self.attn_out(attn, routes))
        hidden = F.gelu(self.ffn_in(x, routes), approximate=self.gelu_approximate)
        return self.ffn_norm(x + self.ffn_out(hidden, routes))

    def load(self, reader: WeightReader, prefix: str, cfg: JinaXlmrConfig) -> None:
        load_adapted_linear(self.qkv, reader, prefix + "mixer.Wqkv", cfg)
        load_adapted_linear(self.attn_out, reader, prefix + "mixer.out_proj", cfg)
        load_layer_norm(self.attn_norm, reader, prefix + "norm1")
        load_adapted_linear(self.ffn_in, reader, prefix + "mlp.fc1", cfg)
        load_adapted_linear(self.ffn_out, reader, prefix + "mlp.fc2", cfg)
        load_layer_norm(self.ffn_norm, reader, prefix + "norm2")


class JinaXlmrEncoder(nn.Module):
    """Token ids → final hidden states [total_tokens, hidden] over a PackedBatch, each input with
    its task adapter (``batch.adapters``)."""

    family = "jina-xlm-roberta"

    def __init__(self, cfg: JinaXlmrConfig):
        super().__init__()
        self.config = cfg
        self.hidden_size = cfg.hidden_size
        self.max_positions = cfg.max_positions
        self.weight_prefix = ""
        self.adapter_names = cfg.adapter_names
        # task → instruction prefix as the config states it (jina-embeddings-v3's task_instructions)
        self.task_instructions = dict(cfg.task_instructions)
        self.embeddings = JinaEmbeddings(cfg)
        self.layers = nn.ModuleList(JinaLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rotary_dim, cfg.rotary_base), persistent=False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        routes = task_rows(batch, self.adapter_names, self.config.default_adapter, self.family)
        rotary = rope_cos_sin(batch.positions, self.inv_freq, torch.float32)  # rotated in fp32
        x = self.embeddings(batch, routes)
        for layer in self.layers:
            x = layer(x, batch, rotary, routes)
        return x

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], reader: WeightReader) -> JinaXlmrEncoder:
        """Build on the meta device, then fill every parameter from ``reader`` (no random init)."""
        cfg = JinaXlmrConfig.from_hf(config)
        with torch.device("meta"):
            model = cls(cfg)
        prefix = find_prefix(reader.keys(), "emb_ln.weight")
        model.embeddings.load(reader, prefix, cfg)
        for i, layer in enumerate(model.layers):
            layer.load(reader, f"{prefix}encoder.layers.{i}.", cfg)
        model.inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rotary_base, reader.device)
        model.weight_prefix = prefix
        return model.eval()
