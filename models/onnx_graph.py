"""Padded ONNX export graphs over the encoders infercore already loaded.

ONNX Runtime takes dense tensors, so these modules recompute our packed encoders' forward over a
padded [batch, seq] layout with an attention mask. They hold no weights of their own: every
parameter is the loaded encoder's (one copy), except where an export needs a different arrangement
(Q, K and V split into three projections so the optimizer recognises the attention pattern and
fuses it into one ``Attention`` node; a task adapter merged into the base weights; outlier channels
split off for int8, below).

Outlier channels (int8 graphs, ``split_outlier_channels``). A few channels of a BERT-like encoder carry
activations an order of magnitude above the rest: on all-MiniLM-L6-v2 one or two of the 1,536 FFN
channels reach 13-24 where the median channel peaks at 1.2, and one or two of the 384 hidden channels
reach 21-30 against 1.7. Dynamic int8 quantizes each activation tensor with one scale, so these
channels set the step for all the others; on MiniLM that alone brings the min cosine against fp32
below 0.99. Measured on calibration texts, two treatments, both exact in fp32 and done by
restructuring the weights before export:

- FFN channels (after the activation): split off and computed apart in fp32, the idea of
  LLM.int8()'s decomposition: ``ffn_out(act(ffn_in(x)))`` becomes the same over the other channels
  plus ``outlier_out(act(outlier_in(x)))`` over the outliers; the two ``outlier_*`` projections stay
  fp32. No extra pass over the [tokens, intermediate] activations.
- Hidden channels (the LayerNorm outputs feeding Q/K/V and the FFN; ``inputs=True``): smoothed, as
  SmoothQuant does: ``W x = (W · diag(s)) (x / s)`` with ``s = max|x_c|^α / max|W_c|^(1-α)`` per
  input channel, so the int8 input sees channels of similar range and the weights (quantized per
  output channel) take the difference. One multiply over [tokens, hidden] per block, nothing more:
  the LayerNorm output is also the residual, so ``1/s`` cannot go into its gamma. This replaced
  splitting these channels off too (``W (x · keep) + W[:, c] x[c]``, 34 channels on MiniLM), whose
  small fp32 products and adds cost 8 % of the graph, at the same quality (700 held-out texts / 226
  short or odd ones, min cosine vs fp32: split 0.9976 / 0.9948, smoothed with α 0.65 0.9968-0.9974
  / 0.9950).

The quantizer leaves every MatMul whose node name contains ``outlier`` in fp32 (``OUTLIER_NODE_TAG``);
an exported node is named after the modules it is called through, so only the fp32 projections'
modules carry the word.

Padding rows (int8 graphs, ``zero_padding``). The hidden states of padding positions never reach a
token's (the mask keeps them out of attention), but dynamic int8 quantizes each activation tensor
with one scale over every row, padding included, and a padding row's activations run larger than a
short input's own: on MiniLM, "?" padded by one position to sit beside a 2-word input fell from
0.995 to 0.987 against fp32. int8 graphs multiply the hidden states by the mask after the
embeddings and after every LayerNorm (one multiply over [tokens, hidden] each), so padding rows
enter the quantized projections as zeros or as the bias's image. fp32 graphs leave them (exact
either way; the multiply would only cost time and the optimizer's attention fusion).

Unpadded graphs (BERT and XLM-R layouts, not Jina's rotary one): the same weights exported a second
time with no mask, attention as one ``com.microsoft.MultiHeadAttention`` node, which ONNX Runtime's
CPU kernel computes with MLAS's flash attention only when it has no mask. The backend runs a group
whose inputs all have the same length through it (passages cut at the model's window mostly are).

Graph contract (every family):

    inputs   input_ids       [batch, seq] int64
             attention_mask  [batch, seq] int64, 1 for tokens, 0 for padding (right-padded; absent
                             from an unpadded graph whose head does not use it)
             token_type_ids  [batch, seq] int64 (BERT with a token-type table only)
    outputs  last_hidden_state  [batch, seq, hidden] float32   (text_embedding: pooled on the host
                                                                with the torch path's pooling code)
             sparse_weights     [batch, vocab] float32          (sparse_embedding: max over the
                                                                sequence of log1p(relu(logits)),
                                                                padding masked, all in the graph)
             logits             [batch] float32                 (rerank: the classifier's logit)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertEncoder
from .jina_xlmr import JinaXlmrEncoder
from .rerank import ClassifierHead
from .sparse import MlmHead

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Every module (and so every exported node) computing an outlier channel has this in its name.
OUTLIER_NODE_TAG = "outlier"
# A channel is an outlier when its largest |activation| on the calibration texts is at least this many
# times the median channel's largest; at most OUTLIER_MAX_SHARE of a tensor's channels (at least one).
# FFN channels (each one moved costs a slice of the FFN's GEMMs in fp32):
OUTLIER_RATIO = 6.0
OUTLIER_MAX_SHARE = 1 / 64
# Hidden channels feeding the projections: SmoothQuant's migration strength. On MiniLM (700 held-out
# texts / 226 short or odd ones, min cosine against fp32): α 0.5 0.9966 / 0.9953, 0.65 0.9974 / 0.9950,
# 0.8 0.9979 / 0.9947.
SMOOTHING_ALPHA = 0.65
# Per-channel factors are kept within this ratio of the median channel's either way: a channel the
# calibration texts barely reached is not blown up by 1/s on an input that does reach it.
SMOOTHING_LIMIT = 100.0
OUTPUT_NAMES = {"text_embedding": "last_hidden_state", "sparse_embedding": "sparse_weights", "rerank": "logits"}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)
    return linear


def _split_linear(fused: nn.Linear | nn.Module, parts: int) -> list[nn.Linear]:
    """``parts`` Linears over equal row blocks of a fused projection (weights copied)."""
    weight, bias = fused.weight.detach(), fused.bias.detach()
    rows = weight.shape[0] // parts
    return [_linear(weight[i * rows : (i + 1) * rows], bias[i * rows : (i + 1) * rows]) for i in range(parts)]


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1/0 → [B, 1, 1, S] 0 / large negative, the layout transformers' BERT exports (and the
    one onnxruntime's attention fusion matches)."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class _UnmaskedAttention(torch.autograd.Function):
    """``softmax(q kᵀ / √d) v`` over every position of [batch, seq, heads · d] projections, exported
    as ONNX Runtime's ``com.microsoft.MultiHeadAttention`` with no mask: on CPU that node runs MLAS's
    flash attention (tiled, no [seq, seq] scores in memory), about a third faster than the unfused
    product, transpose and softmax nodes at 8 × 256 tokens. Only for inputs without padding."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
        b, s, e = q.shape
        heads = [t.reshape(b, s, num_heads, e // num_heads).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, s, e)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads)
        out.setType(q.type())
        return out


class _PaddedAttention(nn.Module):
    """Q, K, V projections, scaled dot product with an additive key mask, softmax, context."""

    def __init__(self, qkv: nn.Module, num_heads: int):
        super().__init__()
        self.query, self.key, self.value = _split_linear(qkv, 3)
        self.num_heads = num_heads
        self.head_dim = self.query.weight.shape[0] // num_heads
        self.smoothing: _InputSmoothing | None = None

    def projections(self) -> tuple[nn.Linear, ...]:
        return (self.query, self.key, self.value)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """``rotary``: cos, sin [seq, rotary_dim / 2] and rotary_dim (a Python int: static in the graph);
        ``mask`` None: no position is padding (the unpadded graph)."""
        projections = self.projections()
        outputs = [p(x) for p in projections] if self.smoothing is None else self.smoothing(x)
        if mask is None and rotary is None:
            return _UnmaskedAttention.apply(*outputs, self.num_heads)
        q, k, v = (self.heads(y) for y in outputs)
        if rotary is not None:
            q, k = _rotate(q, *rotary, self.head_dim), _rotate(k, *rotary, self.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, s, _ = context.shape
        return context.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)


class _InputSmoothing(nn.Module):
    """The projections of one input with its channels rescaled: ``(W · diag(s)) (x / s)`` (module doc).
    Holds scaled copies of the projections: the encoder's own weights are not touched."""

    def __init__(self, scale: torch.Tensor, projections: Sequence[nn.Linear]):
        super().__init__()
        self.register_buffer("inverse", 1.0 / scale)
        self.scaled = nn.ModuleList(_linear(p.weight.detach() * scale, None if p.bias is None else p.bias.detach())
                                    for p in projections)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x * self.inverse
        return [p(x) for p in self.scaled]


def smoothing_scale(channel_max: torch.Tensor, projections: Sequence[nn.Linear], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor ``max|x_c|^α / max|W_c|^(1-α)`` (the weight maximum over
    every projection sharing the input), relative to the median channel's, within SMOOTHING_LIMIT."""
    weight = torch.cat([p.weight.detach() for p in projections]).abs().amax(0).clamp_min(1e-8)
    scale = channel_max.clamp_min(1e-8).pow(alpha) / weight.pow(1 - alpha)
    return (scale / scale.median()).clamp(1 / SMOOTHING_LIMIT, SMOOTHING_LIMIT)


class _FeedForward(nn.Module):
    """``ffn_out(act(ffn_in(x)))``; after ``split_hidden``, outlier FFN channels apart (module doc)."""

    def __init__(self, ffn_in: nn.Linear, act: Callable[[torch.Tensor], torch.Tensor], ffn_out: nn.Linear):
        super().__init__()
        self.ffn_in, self.ffn_out = ffn_in, ffn_out
        self.act = act
        self.outlier_in: nn.Linear | None = None
        self.outlier_out: nn.Linear | None = None
        self.smoothing: _InputSmoothing | None = None

    def split_hidden(self, channels: torch.Tensor) -> None:
        """Move FFN ``channels`` into ``outlier_in``/``outlier_out`` (new Linears: the encoder's own
        weights are not touched)."""
        w_in, b_in = self.ffn_in.weight.detach(), self.ffn_in.bias.detach()
        w_out, b_out = self.ffn_out.weight.detach(), self.ffn_out.bias.detach()
        keep = torch.ones(w_in.shape[0], dtype=torch.bool)
        keep[channels] = False
        self.outlier_in, self.outlier_out = _linear(w_in[channels], b_in[channels]), _linear(w_out[:, channels], None)
        self.ffn_in, self.ffn_out = _linear(w_in[keep], b_in[keep]), _linear(w_out[:, keep], b_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.ffn_in(x) if self.smoothing is None else self.smoothing(x)[0]
        y = self.ffn_out(self.act(inner))
        if self.outlier_in is not None:
            y = y + self.outlier_out(self.act(self.outlier_in(x)))
        return y


def outlier_channels(channel_max: torch.Tensor, ratio: float, max_share: float) -> torch.Tensor:
    """The channels whose largest |activation| is at least ``ratio`` × the median channel's (the
    largest first kept, at most ``max_share`` of them), sorted."""
    limit = ratio * float(channel_max.median())
    most = max(1, int(channel_max.numel() * max_share))
    order = torch.argsort(channel_max, descending=True)[:most]
    return order[channel_max[order] >= limit].sort().values


def split_outlier_channels(graph: nn.Module, calibration: Iterable[tuple[Sequence[int], Sequence[int] | None]],
                           inputs: bool) -> dict[str, int]:
    """Measure ``graph``'s (a PaddedBertGraph or PaddedJinaGraph) activations on ``calibration``
    (token ids and token type ids of one input, run alone: no padding), split the outlier FFN channels
    off and, when ``inputs``, smooth the projections' inputs (module doc). Returns how many FFN
    channels now run in fp32 (``ffn``) and how many projection inputs were smoothed (``smoothed_inputs``)."""
    maxima: dict[tuple[str, int], torch.Tensor] = {}

    def recorder(key: tuple[str, int]):
        def hook(_module, args):
            peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[key] = peak if key not in maxima else torch.maximum(maxima[key], peak)
        return hook

    hooks = []
    for i, (attention, ffn) in enumerate(zip(graph.attention, graph.ffn)):
        hooks.append(ffn.ffn_out.register_forward_pre_hook(recorder(("ffn", i))))
        if inputs:
            hooks.append(attention.register_forward_pre_hook(recorder(("attention", i))))
            hooks.append(ffn.register_forward_pre_hook(recorder(("ffn_input", i))))
    try:
        with torch.inference_mode(False), torch.no_grad():
            for ids, type_ids in calibration:
                input_ids = torch.tensor([list(ids)], dtype=torch.long)
                mask = torch.ones_like(input_ids)
                if graph.uses_token_types:
                    types = torch.tensor([list(type_ids)]) if type_ids else torch.zeros_like(input_ids)
                    graph(input_ids, mask, types.long())
                else:
                    graph(input_ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    if not maxima:
        raise ValueError("no calibration input ran through the graph")
    counts = {"ffn": 0, "smoothed_inputs": 0}
    for i, (attention, ffn) in enumerate(zip(graph.attention, graph.ffn)):
        channels = outlier_channels(maxima["ffn", i], OUTLIER_RATIO, OUTLIER_MAX_SHARE)
        if len(channels):
            ffn.split_hidden(channels)
            counts["ffn"] += len(channels)
        if not inputs:
            continue
        for key, owner, projections in (("attention", attention, attention.projections()),
                                        ("ffn_input", ffn, (ffn.ffn_in,))):
            owner.smoothing = _InputSmoothing(smoothing_scale(maxima[key, i], projections, SMOOTHING_ALPHA),
                                              projections)
            counts["smoothed_inputs"] += 1
    return counts


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, head_dim: int) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim channels of x [B, H, S, D]; cos/sin [S, rotary_dim/2]."""
    x1, x2 = x[..., :rotary_dim].chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if rotary_dim == head_dim:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def _padding_rows(zero: bool, attention_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """[batch, seq, 1]: 1 for tokens, 0 for padding; None when the graph keeps padding rows as they are."""
    return attention_mask.unsqueeze(-1).to(x.dtype) if zero else None


def _keep_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x * rows


class PaddedBertGraph(nn.Module):
    """``BertEncoder`` (BERT, MiniLM, XLM-R with absolute positions, Jina's flash XLM-R layout) over
    padded inputs. Positions count from the family's offset in every row, as in the packed path."""

    def __init__(self, encoder: BertEncoder):
        super().__init__()
        self.embeddings = encoder.embeddings
        self.layers = encoder.layers
        self.attention = nn.ModuleList(_PaddedAttention(layer.qkv, layer.num_heads) for layer in encoder.layers)
        self.ffn = nn.ModuleList(_FeedForward(layer.ffn_in, layer.act, layer.ffn_out) for layer in encoder.layers)
        self.uses_token_types = encoder.embeddings.token_type is not None
        # The unpadded graph (``unpadded()``): attention over every position, no mask.
        self.without_padding = False
        # int8: padding rows of the hidden states zeroed (see the module doc)
        self.zero_padding = False

    def unpadded(self) -> PaddedBertGraph:
        """This graph for batches without padding: attention runs as one MultiHeadAttention node with
        no mask (flash attention on CPU); the attention_mask input is then ignored."""
        self.without_padding = True
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + emb.position_offset
        x = emb.word(input_ids) + emb.position(positions).unsqueeze(0)
        if emb.token_type is not None:
            x = x + emb.token_type(token_type_ids)
        x = emb.norm(x)
        mask = None if self.without_padding else _additive_mask(attention_mask, x.dtype)
        rows = _padding_rows(self.zero_padding and not self.without_padding, attention_mask, x)
        x = _keep_rows(x, rows)
        for layer, attention, ffn in zip(self.layers, self.attention, self.ffn):
            x = _keep_rows(layer.attn_norm(x + layer.attn_out(attention(x, mask))), rows)
            x = _keep_rows(layer.ffn_norm(x + ffn(x)), rows)
        return x


def _task_delta(module: nn.Module, task: int | None) -> nn.Module | None:
    """``task``'s ``lora.LowRankDelta`` on an adapted module (scaling folded into B at load), or None
    for the base weights and for a module that adapter leaves alone."""
    if task is None:
        return None
    return module.deltas[str(task)] if str(task) in module.deltas else None


def _merged_linear(adapted: nn.Module, task: int | None) -> nn.Linear:
    """A plain Linear holding ``W + B_t A_t`` of a ``lora.AdaptedLinear`` (the base weights for ``task``
    None): per adapted part, its output rows get B_part @ A[ranks of the part]."""
    base = adapted.linear
    weight = base.weight.detach().clone()
    delta = _task_delta(adapted, task)
    if delta is not None:
        for (columns, ranks), b in zip(delta.columns_and_ranks, delta.b):
            weight[columns] += b.detach() @ delta.a[ranks].detach()
    return _linear(weight, None if base.bias is None else base.bias.detach())


def _merged_embedding(adapted: nn.Module, task: int | None) -> nn.Embedding:
    """A plain Embedding holding ``table + A_t B_t`` of a ``lora.AdaptedEmbedding`` (A looked up per
    token: [num_embeddings, rank])."""
    table = adapted.weight.detach().clone()
    delta = _task_delta(adapted, task)
    if delta is not None:
        for (columns, ranks), b in zip(delta.columns_and_ranks, delta.b):
            table[:, columns] += delta.a[:, ranks].detach() @ b.detach().T
    return nn.Embedding.from_pretrained(table, freeze=True)


class PaddedJinaGraph(nn.Module):
    """``JinaXlmrEncoder`` (jina-embeddings-v3) over padded inputs with ONE task adapter merged into
    the weights (``task`` None: the base weights). Mixed-task batches run one graph per task."""

    def __init__(self, encoder: JinaXlmrEncoder, task: str | None):
        super().__init__()
        cfg = encoder.config
        index = None if task is None else cfg.adapter_names.index(task)
        emb = encoder.embeddings
        self.word = _merged_embedding(emb.word, index)
        self.token_type = None if emb.token_type is None else _merged_embedding(emb.token_type, index)
        self.norm = emb.norm
        self.uses_token_types = False  # type 0 only: jina-v3's table has one row
        self.attention = nn.ModuleList(
            _PaddedAttention(_merged_linear(layer.qkv, index), layer.num_heads)
            for layer in encoder.layers
        )
        self.attn_out = nn.ModuleList(_merged_linear(layer.attn_out, index) for layer in encoder.layers)
        act = functools.partial(F.gelu, approximate=cfg.gelu_approximate)
        self.ffn = nn.ModuleList(
            _FeedForward(_merged_linear(layer.ffn_in, index), act, _merged_linear(layer.ffn_out, index))
            for layer in encoder.layers
        )
        self.attn_norm = nn.ModuleList(layer.attn_norm for layer in encoder.layers)
        self.ffn_norm = nn.ModuleList(layer.ffn_norm for layer in encoder.layers)
        self.rotary_dim = cfg.rotary_dim
        self.register_buffer("inv_freq", encoder.inv_freq.detach().clone(), persistent=False)
        self.zero_padding = False  # as PaddedBertGraph's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids)
        if self.token_type is not None:
            x = x + self.token_type.weight[0]
        x = self.norm(x)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        angles = positions.unsqueeze(1) * self.inv_freq
        rotary = (angles.cos(), angles.sin(), self.rotary_dim)
        mask = _additive_mask(attention_mask, x.dtype)
        rows = _padding_rows(self.zero_padding, attention_mask, x)
        x = _keep_rows(x, rows)
        for i, attention in enumerate(self.attention):
            x = _keep_rows(self.attn_norm[i](x + self.attn_out[i](attention(x, mask, rotary))), rows)
            x = _keep_rows(self.ffn_norm[i](x + self.ffn[i](x)), rows)
        return x


class SparseGraph(nn.Module):
    """Encoder → MLM transform → decoder logits → log1p(relu) → padding masked → max over the
    sequence: [batch, vocab]. Weights are non-negative, so a zeroed padding row never wins the max."""

    def __init__(self, encoder: nn.Module, head: MlmHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.head.transform(_encode(self.encoder, input_ids, attention_mask, token_type_ids))
        logits = F.linear(hidden, self.head.decoder_weight, self.head.decoder_bias)
        weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
        return weights.max(dim=1).values


class RerankGraph(nn.Module):
    """Encoder → first token → classifier head: [batch] logits."""

    def __init__(self, encoder: nn.Module, head: ClassifierHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = _encode(self.encoder, input_ids, attention_mask, token_type_ids)
        return self.head(hidden[:, 0])


class HiddenGraph(nn.Module):
    """Encoder alone: [batch, seq, hidden] (dense models pool on the host)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return _encode(self.encoder, input_ids, attention_mask, token_type_ids)


def _encode(encoder: nn.Module, input_ids, attention_mask, token_type_ids):
    if encoder.uses_token_types:
        return encoder(input_ids, attention_mask, token_type_ids)
    return encoder(input_ids, attention_mask)
