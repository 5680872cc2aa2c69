"""Tiny, randomly initialised checkpoints of Jina's rotary XLM-R in the published layouts, and a tiny
multilingual-e5-style XLM-R (absolute positions), built deterministically.

jina-embeddings-v3 (``XLMRobertaLoRA``): weights under ``roberta.``, every Linear and Embedding a
torch parametrization (``<module>.parametrizations.weight.original``) with the adapters of all tasks
stacked in ``.parametrizations.weight.0.lora_A`` / ``lora_B`` (Linear: [tasks, rank, in] / [tasks,
out, rank]; Embedding: [tasks, num, rank] / [tasks, rank, dim]), ``emb_ln``, ``encoder.layers.N.{mixer.Wqkv,
mixer.out_proj, norm1, mlp.fc1, mlp.fc2, norm2}``, ``pooler.dense``; config.json as published
(``lora_adaptations``, ``rotary_emb_base``, ``task_instructions``, ``auto_map``...), with tiny sizes.
The published adapters of a linear layer start with B = 0; here both factors are random, so every
task visibly changes the output.

jina-clip-v2: the same text tower, with one adapter and no pooler, under
``text_model.transformer.roberta.`` (jina-clip-implementation's module nesting: ``JinaCLIPModel.text_model``
is an ``HFTextEncoder`` whose ``transformer`` is ``XLMRobertaLoRA``, whose ``roberta`` is the
``XLMRobertaModel`` built with ``add_pooling_layer=False``), the EVA02 vision tower under
``vision_model.`` and ``logit_scale`` (tests/tiny_clip.py), the ``jina_clip`` config whose
``text_config.hf_model_config_kwargs`` carries the text sizes, and ``preprocessor_config.json``.

The vocabulary is MiniLM's WordPiece one (30522 tokens): fine for numerics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests import tiny_clip
from tests.tiny_checkpoints import copy_tokenizer

V3_TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
V3_INSTRUCTIONS = {
    "retrieval.query": "Represent the query for retrieving evidence documents: ",
    "retrieval.passage": "Represent the document for retrieval: ",
    "separation": "",
    "classification": "",
    "text-matching": "",
}
XLMR_FLASH = "jinaai/xlm-roberta-flash-implementation"

TINY_SIZES: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
)


def v3_config(**overrides: Any) -> dict[str, Any]:
    """jina-embeddings-v3's config.json with tiny sizes."""
    config = {
        "architectures": ["XLMRobertaLoRA"],
        "auto_map": {
            "AutoConfig": f"{XLMR_FLASH}--configuration_xlm_roberta.XLMRobertaFlashConfig",
            "AutoModel": f"{XLMR_FLASH}--modeling_lora.XLMRobertaLoRA",
            "AutoModelForMaskedLM": f"{XLMR_FLASH}--modeling_xlm_roberta.XLMRobertaForMaskedLM",
            "AutoModelForPreTraining": f"{XLMR_FLASH}--modeling_xlm_roberta.XLMRobertaForPreTraining",
        },
        "model_type": "xlm-roberta",
        **TINY_SIZES,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 8194,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "rotary",
        "rotary_emb_base": 20000.0,
        "use_flash_attn": True,
        "lora_adaptations": list(V3_TASKS),
        "lora_rank": 4,
        "lora_alpha": 1,
        "lora_dropout_p": 0.0,
        "load_trained_adapters": True,
        "lora_main_params_trainable": False,
        "task_instructions": dict(V3_INSTRUCTIONS),
        "matryoshka_dimensions": [32, 64, 128, 256, 512, 768, 1024],
        "emb_pooler": None,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def published_weights(config: dict[str, Any], prefix: str = "roberta.", seed: int = 0,
                      pooler: bool = True) -> dict[str, torch.Tensor]:
    """Random weights in the published parametrized layout for ``config`` (sizes, tasks, rank)."""
    gen = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    tasks, rank = len(config["lora_adaptations"]), config["lora_rank"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights: dict[str, torch.Tensor] = {}

    def parametrized(module: str, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        weights[module + ".parametrizations.weight.original"] = base
        weights[module + ".parametrizations.weight.0.lora_A"] = a
        weights[module + ".parametrizations.weight.0.lora_B"] = b

    def embedding(module: str, num: int) -> None:
        parametrized(module, randn(num, h, std=0.5), randn(tasks, num, rank, std=0.5), randn(tasks, rank, h, std=0.5))

    def linear(module: str, fan_in: int, fan_out: int) -> None:
        parametrized(module, randn(fan_out, fan_in, std=fan_in**-0.5),
                     randn(tasks, rank, fan_in, std=fan_in**-0.5), randn(tasks, fan_out, rank, std=0.5))
        weights[module + ".bias"] = randn(fan_out, std=0.1)

    def layer_norm(module: str) -> None:
        weights[module + ".weight"] = 1.0 + randn(h, std=0.1)
        weights[module + ".bias"] = randn(h, std=0.1)

    embedding(prefix + "embeddings.word_embeddings", config["vocab_size"])
    embedding(prefix + "embeddings.token_type_embeddings", config["type_vocab_size"])
    layer_norm(prefix + "emb_ln")
    for i in range(config["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}."
        linear(layer + "mixer.Wqkv", h, 3 * h)
        linear(layer + "mixer.out_proj", h, h)
        layer_norm(layer + "norm1")
        linear(layer + "mlp.fc1", h, inter)
        linear(layer + "mlp.fc2", inter, h)
        layer_norm(layer + "norm2")
    if pooler:
        linear(prefix + "pooler.dense", h, h)
    return {k: v.contiguous() for k, v in weights.items()}


def write_checkpoint(out: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(out)
    return out


def build_jina_v3(out: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny jina-embeddings-v3 directory in the published layout (no sentence-transformers files:
    the catalog entry supplies the pooling)."""
    config = v3_config(**overrides)
    return write_checkpoint(out, config, published_weights(config, seed=seed))


CLIP_TEXT_PREFIX = "text_model.transformer.roberta."


def clip_text_config() -> dict[str, Any]:
    """The text tower's effective config: jina-embeddings-v3's, overlaid with the clip config's
    ``hf_model_config_kwargs`` (one adapter, alpha 4)."""
    return v3_config(
        lora_adaptations=["retrieval.query"], lora_alpha=4,
        task_instructions={"retrieval.query": V3_INSTRUCTIONS["retrieval.query"]},
    )


def build_jina_clip_v2(out: Path, seed: int = 1) -> Path:
    """A tiny jina-clip-v2 directory: config ``jina_clip``, the text tower under CLIP_TEXT_PREFIX,
    the vision tower under ``vision_model.`` (seeded by tiny_clip.SEED: the golden files depend on it)."""
    text = clip_text_config()
    kwargs = {k: text[k] for k in (*TINY_SIZES, "lora_adaptations", "lora_rank", "lora_alpha", "task_instructions")}
    config = {
        "architectures": ["JinaCLIPModel"],
        "auto_map": {"AutoConfig": "jinaai/jina-clip-implementation--configuration_clip.JinaCLIPConfig",
                     "AutoModel": "jinaai/jina-clip-implementation--modeling_clip.JinaCLIPModel"},
        "model_type": "jina_clip",
        "projection_dim": 1024,
        "add_projections": False,
        "matryoshka_dimensions": [32, 64, 128, 256, 512, 768, 1024],
        "torch_dtype": "float32",
        "text_config": {
            "hf_model_name_or_path": "jinaai/jina-embeddings-v3",
            "embed_dim": 32,
            "pooler_type": "mean_pooler",
            "proj_type": None,
            "proj_bias": False,
            "default_lora_task": "retrieval.query",
            "default_instruction_task": None,
            "hf_model_config_kwargs": {**kwargs, "lora_dropout_p": 0.0, "load_trained_adapters": False,
                                       "use_flash_attn": True},
        },
        "vision_config": tiny_clip.vision_config(),
    }
    weights = published_weights(text, prefix=CLIP_TEXT_PREFIX, seed=seed, pooler=False)
    weights.update(tiny_clip.vision_weights(config["vision_config"]))
    write_checkpoint(out, config, weights)
    size = config["vision_config"]["image_size"]
    (out / "preprocessor_config.json").write_text(json.dumps(tiny_clip.preprocessor_config(size), indent=2))
    return out


def build_multilingual_e5(out: Path, seed: int = 0) -> Path:
    """A tiny XLMRobertaModel with multilingual-e5-large's settings (absolute positions numbered
    from pad_token_id + 1 = 2, 514 rows, one token type, eps 1e-5), saved by transformers, MiniLM
    tokenizer (whose template is XLM-R's ``<s> text </s>`` spelled [CLS] / [SEP])."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        **TINY_SIZES, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, layer_norm_eps=1e-5, position_embedding_type="absolute",
    )
    XLMRobertaModel(config, add_pooling_layer=True).eval().save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    return out
