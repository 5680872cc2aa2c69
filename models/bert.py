"""BERT-family encoder over packed tokens (BERT, MiniLM, bge, e5, gte-base, SPLADE backbones, and
RoBERTa / XLM-RoBERTa with absolute positions: multilingual-e5, jina-reranker-v2).

Published checkpoints (BertModel / BertForMaskedLM / BertForSequenceClassification, with or without
the ``bert.`` prefix, old ``gamma``/``beta`` LayerNorm names; XLMRobertaModel / ...ForSequence-
Classification under ``roberta.``; Jina's flash XLM-R layout with ``emb_ln``, ``mixer.Wqkv``,
``norm1``/``norm2``, ``mlp.fc1``/``fc2``) load by key name; Q, K and V are fused into one projection
at load time. Post-LayerNorm blocks, learned absolute positions, token types. RoBERTa-style models
number positions from ``pad_token_id + 1`` (``position_offset``).

Heads (``BERT_HEADS``, ``XLMR_HEADS``), each in the layout its saving class writes, found beside the
backbone's prefix:

- masked LM (``BertForMaskedLM``): ``cls.predictions.{transform.dense, transform.LayerNorm, bias,
  decoder}``, the decoder tied to the word embeddings unless the checkpoint holds its own;
- sequence classification with one label: BERT's ``bert.pooler.dense`` + tanh on the first token,
  then ``classifier`` (hidden → 1); (XLM-)RoBERTa's, and Jina's flash layout of jina-reranker-v2,
  ``classifier.dense`` + tanh on the first token, then ``classifier.out_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_norm
from ..kernels.bias_gelu import bias_gelu, use_bias_gelu_kernel
from .attention import varlen_attention
from .checkpoint import CheckpointError
from .contract import Heads
from .layers import GELU_APPROXIMATE, WeightReader, activation, assign, find_prefix, load_layer_norm, load_linear
from .packing import PackedBatch
from .rerank import ClassifierHead, require_one_label
from .sparse import MlmHead

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Position id of a sequence's first token: 0 for BERT, pad_token_id + 1 for (XLM-)RoBERTa.
    position_offset: int = 0

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig:
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"BERT position_embedding_type {position_type!r} is not supported (only 'absolute')")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise CheckpointError("BERT decoder / cross-attention checkpoints are not embedding models")
        pad = config.get("pad_token_id") or 0
        try:
            cfg = cls(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=config["num_attention_heads"],
                intermediate_size=config["intermediate_size"],
                hidden_act=config.get("hidden_act", "gelu"),
                max_position_embeddings=config.get("max_position_embeddings", 512),
                type_vocab_size=config.get("type_vocab_size", 2),
                layer_norm_eps=config.get("layer_norm_eps", 1e-12),
                pad_token_id=pad,
                position_offset=pad + 1 if config.get("model_type") in ROBERTA_TYPES else 0,
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}") from None
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError("hidden_size is not a multiple of num_attention_heads")
        activation(cfg.hidden_act)  # fail at load, not at the first request
        return cfg


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.position_offset = cfg.position_offset

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        positions = batch.positions + self.position_offset if self.position_offset else batch.positions
        x = self.word(batch.input_ids) + self.position(positions)
        if self.token_type is not None:
            if batch.token_type_ids is None:
                x = x + self.token_type.weight[0]
            else:
                x = x + self.token_type(batch.token_type_ids)
        return self.norm(x)

    def load(self, reader: WeightReader, prefix: str, norm: str | None = None) -> None:
        """``prefix``: the embeddings module's; ``norm``: its LayerNorm when stored elsewhere (Jina's
        ``emb_ln``)."""
        assign(self.word, "weight", reader.get(prefix + "word_embeddings.weight"))
        assign(self.position, "weight", reader.get(prefix + "position_embeddings.weight"))
        if self.token_type is not None:
            assign(self.token_type, "weight", reader.get(prefix + "token_type_embeddings.weight"))
        load_layer_norm(self.norm, reader, norm or prefix + "LayerNorm")


class BertLayer(nn.Module):
    """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)
        self.gelu_approximate = GELU_APPROXIMATE.get(cfg.hidden_act)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        attn = varlen_attention(q, k, v, batch).reshape(tokens, -1)
        if fused_norm.use_fused_kernels(x):
            return self._fused_tail(x, attn)
        x = self.attn_norm(x + self.attn_out(attn))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))

    def _fused_tail(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The block after attention on CUDA: each projection runs without its bias, which the
        following kernel adds (residual + bias + LayerNorm in one kernel, bias + GELU in another).
        Through the dispatchers, which run the references in place of a kernel the start-up
        self-check switched off."""
        x = fused_norm.add_layer_norm(
            F.linear(attn, self.attn_out.weight), x, self.attn_norm.weight, self.attn_norm.bias, self.attn_norm.eps,
            x_bias=self.attn_out.bias,
        )
        if self.gelu_approximate is not None and use_bias_gelu_kernel(x):
            inner = bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias, self.gelu_approximate)
        else:
            inner = self.act(self.ffn_in(x))
        return fused_norm.add_layer_norm(
            F.linear(inner, self.ffn_out.weight), x, self.ffn_norm.weight, self.ffn_norm.bias, self.ffn_norm.eps,
            x_bias=self.ffn_out.bias,
        )

    def load(self, reader: WeightReader, prefix: str) -> None:
        att = prefix + "attention."
        names = ("query", "key", "value")
        assign(self.qkv, "weight", torch.cat([reader.get(f"{att}self.{n}.weight") for n in names]))
        assign(self.qkv, "bias", torch.cat([reader.get(f"{att}self.{n}.bias") for n in names]))
        load_linear(self.attn_out, reader, att + "output.dense")
        load_layer_norm(self.attn_norm, reader, att + "output.LayerNorm")
        load_linear(self.ffn_in, reader, prefix + "intermediate.dense")
        load_linear(self.ffn_out, reader, prefix + "output.dense")
        load_layer_norm(self.ffn_norm, reader, prefix + "output.LayerNorm")

    def load_jina(self, reader: WeightReader, prefix: str) -> None:
        """Jina's flash XLM-R block: ``mixer.Wqkv`` (already fused, q|k|v), ``mixer.out_proj``,
        ``norm1``, ``mlp.fc1``, ``mlp.fc2``, ``norm2``."""
        load_linear(self.qkv, reader, prefix + "mixer.Wqkv")
        load_linear(self.attn_out, reader, prefix + "mixer.out_proj")
        load_layer_norm(self.attn_norm, reader, prefix + "norm1")
        load_linear(self.ffn_in, reader, prefix + "mlp.fc1")
        load_linear(self.ffn_out, reader, prefix + "mlp.fc2")
        load_layer_norm(self.ffn_norm, reader, prefix + "norm2")


class BertEncoder(nn.Module):
    """Token ids → final hidden states, [total_tokens, hidden] over a PackedBatch (a
    ``contract.Encoder`` without task adapters)."""

    family = "bert"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.weight_prefix = ""
        self.adapter_names: tuple[str, ...] = ()
        self.task_instructions: dict[str, str] = {}
        self.hidden_size = cfg.hidden_size
        self.max_positions = cfg.max_position_embeddings - cfg.position_offset
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embeddings(batch)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], reader: WeightReader) -> BertEncoder:
        """Build on the meta device, then fill every parameter from ``reader`` (no random init)."""
        cfg = BertConfig.from_hf(config)
        with torch.device("meta"):
            model = cls(cfg)
        prefix = find_prefix(reader.keys(), "embeddings.word_embeddings.weight")
        if prefix + "emb_ln.weight" in reader:  # Jina's flash XLM-R layout
            model.embeddings.load(reader, prefix + "embeddings.", norm=prefix + "emb_ln")
            for i, layer in enumerate(model.layers):
                layer.load_jina(reader, f"{prefix}encoder.layers.{i}.")
        else:
            model.embeddings.load(reader, prefix + "embeddings.")
            for i, layer in enumerate(model.layers):
                layer.load(reader, f"{prefix}encoder.layer.{i}.")
        model.weight_prefix = prefix
        return model.eval()


# BertForMaskedLM's head below the checkpoint root: the weights it always has (its decoder weight
# is there only when not tied to the word embeddings).
MLM_HEAD_PREFIX = "cls.predictions."
MLM_HEAD_WEIGHTS = tuple(
    MLM_HEAD_PREFIX + name
    for name in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
                 "transform.LayerNorm.bias", "bias")
)


def load_bert_mlm_head(encoder: BertEncoder, reader: WeightReader) -> MlmHead:
    """``BertForMaskedLM``'s ``cls.predictions``: transform (dense, activation, LayerNorm), decoder
    tied to the word embeddings unless the checkpoint holds its own, and the vocabulary bias."""
    cfg = encoder.config
    prefix = _head_root(encoder) + MLM_HEAD_PREFIX
    if prefix + "transform.dense.weight" not in reader:
        raise CheckpointError(
            "the checkpoint has no masked-LM head (cls.predictions.*): a sparse embedding model needs a "
            "BertForMaskedLM checkpoint"
        )
    with torch.device("meta"):
        head = MlmHead(cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps, activation(cfg.hidden_act))
    load_linear(head.dense, reader, prefix + "transform.dense")
    load_layer_norm(head.norm, reader, prefix + "transform.LayerNorm")
    decoder = prefix + "decoder.weight"
    # Tied: the same tensor as the embedding table, not a copy.
    assign(head, "decoder_weight", reader.get(decoder) if decoder in reader else encoder.embeddings.word.weight)
    assign(head, "decoder_bias", reader.get_any(prefix + "bias", prefix + "decoder.bias"))
    return head.eval()


def load_classifier_head(encoder: nn.Module, reader: WeightReader, config: dict[str, Any]) -> ClassifierHead:
    """The head of a one-label sequence-classification checkpoint, in whichever of the two layouts
    (module docstring) it has. Also the head of Jina's rotary XLM-R, whose checkpoints share the
    (XLM-)RoBERTa layout."""
    require_one_label(config)
    root = _head_root(encoder)
    with torch.device("meta"):
        head = ClassifierHead(encoder.hidden_size)
    if root + "classifier.out_proj.weight" in reader:  # (XLM-)RoBERTa, Jina flash XLM-R
        load_linear(head.dense, reader, root + "classifier.dense")
        load_linear(head.out, reader, root + "classifier.out_proj")
    elif root + "classifier.weight" in reader:  # BERT: pooler, then classifier
        pooler = encoder.weight_prefix + "pooler.dense"
        if pooler + ".weight" not in reader:
            raise CheckpointError("a BERT sequence classifier needs its pooler (pooler.dense) weights")
        load_linear(head.dense, reader, pooler)
        assign(head.out, "weight", reader.get(root + "classifier.weight"))
        assign(head.out, "bias", reader.get(root + "classifier.bias"))
    else:
        raise CheckpointError(
            "the checkpoint has no sequence-classification head (classifier.*): a reranker needs a "
            "*ForSequenceClassification checkpoint with one label"
        )
    return head.eval()


def _head_root(encoder: nn.Module) -> str:
    """Where the heads sit: the backbone's prefix without the saving class's backbone name."""
    return encoder.weight_prefix.removesuffix("bert.").removesuffix("roberta.")


BERT_HEADS = Heads(
    mlm=load_bert_mlm_head, classifier=load_classifier_head, weight_prefixes=("pooler.", "cls.", "classifier.")
)
# (XLM-)RoBERTa checkpoints: the same classifier layouts; their masked-LM head (``lm_head``) is not
# read, so no sparse models.
XLMR_HEADS = Heads(classifier=load_classifier_head, weight_prefixes=("pooler.", "lm_head.", "classifier."))
