"""Reference for Jina's rotary XLM-R with task LoRA: transformers' native ``JinaEmbeddingsV3Model``.

That class has no adapters of its own and expects the converted ``-hf`` key layout, so a checkpoint
in the published (``XLMRobertaLoRA``) layout is converted here: one task's adapter is merged into
every weight the way the published ``LoRAParametrization.lora_forward`` materialises it on each call
(Linear ``W + B[t] @ A[t] * alpha / rank``; Embedding ``W + A[t] @ B[t] * alpha / rank``, in fp32),
or none for the base weights; then ``emb_ln`` → ``embeddings.LayerNorm``, the fused ``mixer.Wqkv``
split into q/k/v, ``out_proj`` → ``o_proj``, ``norm1/norm2`` → ``post_attention/post_mlp_layernorm``.
The pooler is dropped (embeddings are mean-pooled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

ORIGINAL = ".parametrizations.weight.original"
LORA_A = ".parametrizations.weight.0.lora_A"
LORA_B = ".parametrizations.weight.0.lora_B"


def merge_task(
    weights: Mapping[str, torch.Tensor], text_config: dict[str, Any], task: str | None
) -> dict[str, torch.Tensor]:
    """Published keys → plain ``<module>.weight`` keys with ``task``'s adapter merged (None: base)."""
    tasks = text_config.get("lora_adaptations") or []
    scaling = text_config.get("lora_alpha", 1) / text_config.get("lora_rank", 4)
    index = None if task is None else tasks.index(task)
    merged = {}
    for name, tensor in weights.items():
        if ".parametrizations.weight.0." in name:
            continue
        if not name.endswith(ORIGINAL):
            merged[name] = tensor
            continue
        module = name[: -len(ORIGINAL)]
        weight = tensor.float()
        if index is not None:
            a, b = weights[module + LORA_A][index].float(), weights[module + LORA_B][index].float()
            is_embedding = module.endswith("_embeddings")
            weight = weight + (a @ b if is_embedding else b @ a) * scaling
        merged[module + ".weight"] = weight.to(tensor.dtype)
    return merged


def to_port_layout(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Merged published keys under ``prefix`` → ``JinaEmbeddingsV3Model`` state dict keys."""
    out = {}
    for name, tensor in weights.items():
        if not name.startswith(prefix) or name.startswith(prefix + "pooler."):
            continue
        key = name[len(prefix):]
        key = key.replace("emb_ln.", "embeddings.LayerNorm.").replace("encoder.layers.", "layers.")
        if ".mixer.Wqkv." in key:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[key.replace("mixer.Wqkv", f"self_attn.{part}")] = chunk.clone()
            continue
        key = key.replace("mixer.out_proj", "self_attn.o_proj")
        key = key.replace("norm1.", "post_attention_layernorm.").replace("norm2.", "post_mlp_layernorm.")
        out[key] = tensor
    return out


def port_config(text_config: dict[str, Any]) -> JinaEmbeddingsV3Config:
    c = text_config
    return JinaEmbeddingsV3Config(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        hidden_act=c.get("hidden_act", "gelu"),
        max_position_embeddings=c.get("max_position_embeddings", 8194),
        type_vocab_size=c.get("type_vocab_size", 1),
        layer_norm_eps=c.get("layer_norm_eps", 1e-5),
        pad_token_id=c.get("pad_token_id", 1),
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rotary_emb_base"])},
        # eager attention: a path independent of the SDPA calls the packed encoder makes
        attn_implementation="eager",
    )


def reference_model(
    weights: Mapping[str, torch.Tensor], text_config: dict[str, Any], task: str | None, prefix: str = "roberta."
) -> JinaEmbeddingsV3Model:
    """The port with ``task``'s adapter merged in, fp32, eval mode."""
    model = JinaEmbeddingsV3Model(port_config(text_config), add_pooling_layer=False)
    state = to_port_layout(merge_task(weights, text_config, task), prefix)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.float().eval()


@torch.inference_mode()
def reference_hidden(model: JinaEmbeddingsV3Model, ids: list[list[int]]) -> list[torch.Tensor]:
    """Each sequence alone (no padding): [len, hidden] last hidden states."""
    return [model(input_ids=torch.tensor([seq])).last_hidden_state[0] for seq in ids]
