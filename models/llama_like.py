"""Llama-style transformers over packed tokens: Qwen3 (causal) and EuroBERT (bidirectional), with the
per-task LoRA adapters jina-embeddings-v5 ships for both.

One module for the two families because they are one architecture with two switches: pre-RMSNorm
blocks, rotary positions (rotate-half, fp32 tables), grouped-query attention and a SiLU-gated MLP;
Qwen3 adds an RMSNorm over each query/key head before the rotation and attends causally, EuroBERT
does neither. jina-embeddings-v5-text-small is a Qwen3-0.6B, -text-nano a EuroBERT-210m, and both
carry the same adapter layout, read here into the packed multi-task LoRA of lora.py.

Checkpoints: ``Qwen3Model`` / ``EuroBertModel`` keys (``embed_tokens``, ``layers.N.self_attn.
{q,k,v,o}_proj``, ``q_norm``/``k_norm`` for Qwen3, ``input_layernorm``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, ``norm``), with or without the ``model.`` prefix the ``...ForCausalLM`` /
``...ForMaskedLM`` classes save; ``lm_head`` is not used. Q, K and V are fused into one projection
and gate/up into another at load time.

Task adapters (jina-embeddings-v5): PEFT LoRA folders ``adapters/<task>/`` beside the weights, each an
``adapter_config.json`` (r, lora_alpha, target_modules) and an ``adapter_model.safetensors`` (keys
``base_model.model.layers.N.self_attn.q_proj.lora_A.weight``). Every task found is loaded and kept
factored, never merged (``lora.LowRankDelta`` per task and fused projection, the scale
``alpha / r`` folded into B): an input whose ``PackedBatch.adapters`` entry names a task gets
``x @ A^T @ B^T * alpha / r`` added to each adapted projection, on the rows of that task's tokens
only, so one packed batch can mix tasks (and inputs without a task).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..kernels import fused_norm
from .attention import varlen_attention
from .checkpoint import CheckpointError
from .contract import Heads
from .layers import WeightReader, activation, apply_rope, assign, find_prefix, rope_cos_sin, rope_inv_freq
from .lora import AdaptedLinear, LowRankDelta, TaskRows, task_rows
from .packing import PackedBatch

# Folder of a model directory that holds one PEFT LoRA folder per task.
ADAPTERS_DIR = "adapters"

# Checkpoint / PEFT name of each projection → (our fused module, index of its part in that module).
PROJECTIONS: dict[str, tuple[str, int]] = {
    "self_attn.q_proj": ("qkv", 0),
    "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2),
    "self_attn.o_proj": ("o", 0),
    "mlp.gate_proj": ("gate_up", 0),
    "mlp.up_proj": ("gate_up", 1),
    "mlp.down_proj": ("down", 0),
}

# EuroBERT's and jina-embeddings-v5's heads: none read (``lm_head`` is the LM's, not an embedder's).
# Qwen3's add jina-reranker-v3's projector (listwise.QWEN3_HEADS).
HEADS = Heads(weight_prefixes=("lm_head.",))

@dataclass(frozen=True)
class LlamaLikeConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over each query and key head before the rotation.
    qk_norm: bool = False
    causal: bool = False

    @classmethod
    def from_hf(
        cls,
        config: dict[str, Any],
        *,
        qk_norm: bool,
        causal: bool,
        default_head_dim: int | None,
        default_eps: float,
        default_max_positions: int,
    ) -> LlamaLikeConfig:
        """``default_*``: what the transformers config class assumes when config.json leaves a field out
        (Qwen3Config: head_dim 128; EuroBertConfig: hidden_size / num_attention_heads)."""
        try:
            heads = config["num_attention_heads"]
            cfg = cls(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or default_head_dim or config["hidden_size"] // heads,
                intermediate_size=config["intermediate_size"],
                rms_norm_eps=config.get("rms_norm_eps", default_eps),
                rope_theta=_rope_theta(config),
                max_position_embeddings=config.get("max_position_embeddings") or default_max_positions,
                hidden_act=config.get("hidden_act", "silu"),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                qk_norm=qk_norm,
                causal=causal,
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError("num_attention_heads is not a multiple of num_key_value_heads")
        if cfg.head_dim % 2:
            raise CheckpointError(f"head_dim {cfg.head_dim} is odd; rotary embeddings need an even head_dim")
        activation(cfg.hidden_act)  # fail at load, not at the first request
        return cfg


def _rope_theta(config: dict[str, Any]) -> float:
    """The rotary base from ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling``
    (earlier configs). Only plain RoPE is computed here, so scaled variants are refused."""
    params = config.get("rope_parameters") or {}
    for declared in (params, config.get("rope_scaling") or {}):
        if any(isinstance(value, dict) for value in declared.values()):
            raise CheckpointError("per-layer-type rope_parameters are not supported")
        rope_type = declared.get("rope_type", declared.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"RoPE type {rope_type!r} is not supported (only plain RoPE)")
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("partial rotary embeddings are not supported")
    # 10000 is what transformers assumes for both families when a config names no base.
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale (the order Qwen3/EuroBERT/Llama use in bf16): the
    kernels' ``fused_norm.rms_norm``, its Triton kernel on CUDA and its torch reference elsewhere."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_norm.rms_norm(x, self.weight, self.eps)


class LlamaLikeLayer(nn.Module):
    """Pre-norm block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

    def __init__(self, cfg: LlamaLikeConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = d
        self.causal = cfg.causal
        q_size, kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv = AdaptedLinear(h, (q_size, kv_size, kv_size), cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.o = AdaptedLinear(q_size, (h,), cfg.attention_bias)
        self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_up = AdaptedLinear(h, (cfg.intermediate_size, cfg.intermediate_size), cfg.mlp_bias)
        self.down = AdaptedLinear(cfg.intermediate_size, (h,), cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, cos: torch.Tensor, sin: torch.Tensor, routes: list[TaskRows]
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(self.attn_norm(x), routes).split(self.qkv.part_sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = varlen_attention(q, k, v, batch, causal=self.causal).reshape(tokens, -1)
        # Residual add + RMSNorm: one kernel on CUDA.
        x, normed = fused_norm.add_rms_norm(self.o(attn, routes), x, self.mlp_norm.weight, self.mlp_norm.eps)
        gate, up = self.gate_up(normed, routes).chunk(2, dim=-1)
        return x + self.down(self.act(gate) * up, routes)

    def load(self, reader: WeightReader, prefix: str) -> None:
        fused: dict[str, list[str]] = {}
        for name, (module, _) in PROJECTIONS.items():
            fused.setdefault(module, []).append(prefix + name)
        for module, prefixes in fused.items():
            getattr(self, module).load(reader, prefixes)
        assign(self.attn_norm, "weight", reader.get(prefix + "input_layernorm.weight"))
        assign(self.mlp_norm, "weight", reader.get(prefix + "post_attention_layernorm.weight"))
        if self.q_norm is not None:
            assign(self.q_norm, "weight", reader.get(prefix + "self_attn.q_norm.weight"))
            assign(self.k_norm, "weight", reader.get(prefix + "self_attn.k_norm.weight"))


class LlamaLikeEncoder(nn.Module):
    """Token ids → final hidden states, [total_tokens, hidden] over a PackedBatch. Subclasses fix the
    family: its name, its config defaults and the two switches (q/k norm, causal)."""

    family = ""

    def __init__(self, cfg: LlamaLikeConfig):
        super().__init__()
        self.config = cfg
        self.hidden_size = cfg.hidden_size
        self.max_positions = cfg.max_position_embeddings
        self.weight_prefix = ""
        # Task adapters, in the order of their indices in the projections' deltas; no config-stated
        # instructions (jina-embeddings-v5's prompts are the catalog's).
        self.adapter_names: tuple[str, ...] = ()
        self.task_instructions: dict[str, str] = {}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLikeLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    @classmethod
    def config_from_hf(cls, config: dict[str, Any]) -> LlamaLikeConfig:
        raise NotImplementedError

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        routes = task_rows(batch, self.adapter_names, family=self.family)
        x = self.embed_tokens(batch.input_ids)
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, x.dtype)  # rotated in the activations' dtype
        for layer in self.layers:
            x = layer(x, batch, cos, sin, routes)
        return self.norm(x)

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], reader: WeightReader) -> LlamaLikeEncoder:
        """Build on the meta device, then fill every parameter from ``reader`` (no random init), and
        load the task adapters under ``adapters/`` of the model directory when it has them."""
        cfg = cls.config_from_hf(config)
        with torch.device("meta"):
            model = cls(cfg)
        prefix = find_prefix(reader.keys(), "embed_tokens.weight")
        assign(model.embed_tokens, "weight", reader.get(prefix + "embed_tokens.weight"))
        for i, layer in enumerate(model.layers):
            layer.load(reader, f"{prefix}layers.{i}.")
        assign(model.norm, "weight", reader.get(prefix + "norm.weight"))
        model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, reader.device)
        model.weight_prefix = prefix
        if reader.model_dir is not None and (reader.model_dir / ADAPTERS_DIR).is_dir():
            model.load_adapters(reader.model_dir / ADAPTERS_DIR, reader.device, reader.dtype)
        return model.eval()

    def load_adapters(self, root: Path, device: torch.device, dtype: torch.dtype) -> None:
        """Load every ``root/<task>/`` PEFT LoRA folder (replacing any adapters loaded before)."""
        names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        for layer in self.layers:
            for module in (layer.qkv, layer.o, layer.gate_up, layer.down):
                module.clear_deltas()
        for task, name in enumerate(names):
            adapter = read_lora_adapter(root / name, len(self.layers))
            for (layer_index, module_name), parts in adapter.modules.items():
                module = getattr(self.layers[layer_index], module_name)
                module.set_delta(task, _factored_delta(module, parts, adapter.scale, device, dtype, root / name))
        self.adapter_names = names


@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT LoRA folder, read and checked. modules: (layer, fused module) → {part: (A, B)} in fp32."""

    scale: float
    modules: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]]


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.([A-Za-z_]+\.[A-Za-z_]+)\.lora_([AB])\.weight$"
)


def read_lora_adapter(path: Path, num_layers: int) -> LoraAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors``; refuse anything infercore would
    not compute exactly (DoRA, LoRA biases, per-module ranks, other targets) with a CheckpointError."""
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights_file.is_file():
        pickled = " (only a pickled adapter_model.bin, which infercore does not load)" if (
            path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path}: task adapter has no adapter_model.safetensors{pickled}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: task adapter has no adapter_config.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from None

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: {reason}")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"adapter type {config['peft_type']!r} is not supported (only LORA)")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag):
            raise refuse(f"{flag} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise refuse(f"LoRA bias {config['bias']!r} is not supported (only 'none')")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(field):
            raise refuse(f"{field} is not supported")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise refuse("adapter_config.json needs numeric 'r' and 'lora_alpha'") from None
    if rank <= 0:
        raise refuse(f"LoRA rank {rank} is not positive")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = []  # a regex (or "all-linear"); the weights below say what it matched
    leaf_names = {name.rsplit(".", 1)[-1] for name in PROJECTIONS}
    unknown = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in leaf_names)
    if unknown:
        raise refuse(f"LoRA on {unknown} is not supported (supported targets: {sorted(leaf_names)})")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file), device="cpu").items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise refuse(f"unexpected adapter weight {key!r} (expected LoRA A/B of {sorted(leaf_names)})")
        layer, projection, which = int(match[1]), match[2], match[3]
        if projection not in PROJECTIONS:
            raise refuse(f"LoRA on {projection!r} is not supported (supported targets: {sorted(leaf_names)})")
        if layer >= num_layers:
            raise refuse(f"adapter weight {key!r} names layer {layer} of a {num_layers}-layer model")
        pairs.setdefault((layer, projection), {})[which] = tensor.float()
    if not pairs:
        raise refuse("adapter_model.safetensors holds no LoRA weights")

    modules: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, projection), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise refuse(f"layers.{layer}.{projection} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise refuse(
                f"layers.{layer}.{projection}: LoRA shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not have "
                f"rank r={rank}"
            )
        module, part = PROJECTIONS[projection]
        modules.setdefault((layer, module), {})[part] = (a, b)
    return LoraAdapter(scale=scale, modules=modules)


def _factored_delta(
    module: AdaptedLinear,
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    device: torch.device,
    dtype: torch.dtype,
    path: Path,
) -> LowRankDelta:
    """Stack the parts' A matrices, fold the scale into each B in fp32, then cast to the model dtype."""
    in_features = module.linear.in_features
    a_parts, b_parts = [], []
    for part, (a, b) in sorted(parts.items()):
        out_features = module.part_sizes[part]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise CheckpointError(
                f"{path}: LoRA shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a projection "
                f"{in_features} → {out_features}"
            )
        a_parts.append(a)
        b_parts.append((module.part_columns[part], (b * scale).to(device=device, dtype=dtype)))
    return LowRankDelta(torch.cat(a_parts).to(device=device, dtype=dtype), b_parts)


class Qwen3Encoder(LlamaLikeEncoder):
    """Qwen3 (Qwen3Model / Qwen3ForCausalLM checkpoints): causal attention, q/k RMSNorm, head_dim from
    the config (128 when it names none, as Qwen3Config does)."""

    family = "qwen3"

    @classmethod
    def config_from_hf(cls, config: dict[str, Any]) -> LlamaLikeConfig:
        if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
            raise CheckpointError("Qwen3 sliding-window attention is not supported")
        return LlamaLikeConfig.from_hf(
            config, qk_norm=True, causal=True, default_head_dim=128, default_eps=1e-6, default_max_positions=32768
        )


class EuroBertEncoder(LlamaLikeEncoder):
    """EuroBERT (EuroBertModel / EuroBertForMaskedLM checkpoints): a bidirectional Llama."""

    family = "eurobert"

    @classmethod
    def config_from_hf(cls, config: dict[str, Any]) -> LlamaLikeConfig:
        return LlamaLikeConfig.from_hf(
            config, qk_norm=False, causal=False, default_head_dim=None, default_eps=1e-5, default_max_positions=8192
        )


class JinaEmbeddingsV5Encoder:
    """``model_type`` "jina_embeddings_v5": one config class over two backbones. As in vLLM's loader,
    ``is_decoder: false`` means the EuroBERT encoder (-nano) and anything else the Qwen3 decoder
    (-small); the weights must agree (Qwen3 has q/k norms, EuroBERT none)."""

    @staticmethod
    def from_checkpoint(config: dict[str, Any], reader: WeightReader) -> LlamaLikeEncoder:
        backbone = EuroBertEncoder if config.get("is_decoder", True) is False else Qwen3Encoder
        has_qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in reader.keys())
        if has_qk_norm != (backbone is Qwen3Encoder):
            raise CheckpointError(
                f"jina_embeddings_v5 config says is_decoder={config.get('is_decoder', True)} ({backbone.family} "
                f"backbone) but the weights {'have' if has_qk_norm else 'lack'} q/k norms"
            )
        return backbone.from_checkpoint(config, reader)
