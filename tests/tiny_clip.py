"""The vision half of a tiny, randomly initialised jina-clip-v2 in the published layout, built
deterministically (``tests.tiny_jina.build_jina_clip_v2`` writes it beside the text tower).

Layout (jina-clip-implementation: ``JinaCLIPModel`` → ``vision_model`` = ``EVAVisionTransformer``
built by ``_build_vision_tower`` with jina-clip-v2's switches): ``vision_model.cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.{q_proj, k_proj, v_proj}.weight,
attn.q_bias, attn.v_bias, attn.inner_attn_ln, attn.proj, norm2, mlp.{w1, w2, ffn_ln, w3}}``,
``norm``; and the model's own ``logit_scale``. Sizes: 60-pixel images with patch 14 (a 4 × 4 grid
that, like 512 / 14, leaves pixels unseen), width 32 (= the text tower's width, as
``add_projections: false`` requires), 2 heads, 2 blocks, SwiGLU hidden int(32 × 2.6667) = 85.

``python -m tests.tiny_clip OUT`` writes the whole tiny jina-clip-v2 directory (for the golden
generator, tests/golden/make_clip_golden.py, which runs in its own environment).
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Any

import torch

VISION_PREFIX = "vision_model."
SEED = 21


def vision_config(**overrides: Any) -> dict[str, Any]:
    """``vision_config`` with every key of the published JinaCLIPVisionConfig, jina-clip-v2's switches
    and tiny sizes (jina-clip-v2: width 1024, layers 24, image_size 512, embed_dim 1024)."""
    config = {
        "embed_dim": 32,
        "width": 32,
        "image_size": 60,
        "patch_size": 14,
        "layers": 2,
        "head_width": 16,
        "mlp_ratio": 2.6667,
        "ls_init_value": None,
        "patch_dropout": 0.0,
        "qkv_bias": True,
        "fused_layer_norm": False,
        "x_attention": True,
        "post_norm": False,
        "rope_embeddings": True,
        "pt_hw_seq_len": 16,
        "intp_freq": True,
        "naive_swiglu": True,
        "subln": True,
        "drop_path_rate": 0.0,
        "proj_type": None,
    }
    config.update(overrides)
    return config


def preprocessor_config(size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` with the published JinaCLIPImageProcessor's settings."""
    impl = "jinaai/jina-clip-implementation"
    return {
        "auto_map": {"AutoImageProcessor": f"{impl}--processing_clip.JinaCLIPImageProcessor",
                     "AutoProcessor": f"{impl}--processing_clip.JinaCLIPProcessor"},
        "image_processor_type": "JinaCLIPImageProcessor",
        "processor_class": "JinaCLIPProcessor",
        "size": size,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "resize_mode": "shortest",
        "interpolation": "bicubic",
        "fill_color": 0,
    }


def vision_weights(config: dict[str, Any], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random weights for ``config`` in the published key layout, plus ``logit_scale``. Scales keep
    activations of order one, so parity tolerances mean something."""
    gen = torch.Generator().manual_seed(seed)
    width, patch = config["width"], config["patch_size"]
    hidden = int(width * config["mlp_ratio"])
    grid = config["image_size"] // patch

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights: dict[str, torch.Tensor] = {}
    p = VISION_PREFIX

    def linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
        weights[name + ".weight"] = randn(fan_out, fan_in, std=fan_in**-0.5)
        if bias:
            weights[name + ".bias"] = randn(fan_out, std=0.1)

    def layer_norm(name: str, dim: int) -> None:
        weights[name + ".weight"] = 1.0 + randn(dim, std=0.1)
        weights[name + ".bias"] = randn(dim, std=0.1)

    weights[p + "cls_token"] = randn(1, 1, width, std=0.5)
    weights[p + "pos_embed"] = randn(1, grid * grid + 1, width, std=0.5)
    weights[p + "patch_embed.proj.weight"] = randn(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    weights[p + "patch_embed.proj.bias"] = randn(width, std=0.1)
    for i in range(config["layers"]):
        b = f"{p}blocks.{i}."
        layer_norm(b + "norm1", width)
        for name in ("q_proj", "k_proj", "v_proj"):
            linear(b + "attn." + name, width, width, bias=False)
        weights[b + "attn.q_bias"] = randn(width, std=0.1)
        weights[b + "attn.v_bias"] = randn(width, std=0.1)
        layer_norm(b + "attn.inner_attn_ln", width)
        linear(b + "attn.proj", width, width)
        layer_norm(b + "norm2", width)
        linear(b + "mlp.w1", width, hidden)
        linear(b + "mlp.w2", width, hidden)
        layer_norm(b + "mlp.ffn_ln", hidden)
        linear(b + "mlp.w3", hidden, width)
    layer_norm(p + "norm", width)
    weights["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return {k: v.contiguous() for k, v in weights.items()}


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the vision weights' names and float32 bytes: the golden files record the digest of
    the checkpoint they were made from, and the tests check the one they build is the same."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        if name.startswith(VISION_PREFIX):
            digest.update(name.encode())
            digest.update(weights[name].to(torch.float32).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    from tests.tiny_jina import build_jina_clip_v2

    print(build_jina_clip_v2(Path(sys.argv[1])))
