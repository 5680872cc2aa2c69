"""The EVA02 vision tower of jina-clip-v2 (EVA02-L/14 at 512 × 512), images → vectors in the space
the text tower embeds into.

Published implementation (``jinaai/jina-clip-implementation``: ``eva_model.py``,
``rope_embeddings.py``, ``modeling_clip.py``, ``configuration_clip.py``), with jina-clip-v2's
``vision_config`` (``rope_embeddings``, ``intp_freq``, ``naive_swiglu``, ``subln`` on, ``post_norm``
off, ``qkv_bias`` on, no layer scale, no projection head):

- patch embedding: Conv2d(3, width, kernel = stride = patch_size) with bias; a 512-pixel input and
  patch 14 give a 36 × 36 grid (the last 8 rows and columns of pixels are never seen: the stride
  floors, as the published Conv2d does); a learned CLS token in front and a learned absolute
  position table ``pos_embed`` [1, 1 + patches, width] added to all tokens;
- 2-D rotary positions on the patch tokens only (CLS is not rotated): of each head's ``head_width``
  channels the first half rotates with the patch's row, the second half with its column; within a
  half, channel pairs (2i, 2i + 1) rotate together (interleaved, not rotate-half) by angle
  ``t * theta ** (-2i / (head_width / 2))`` with theta 10000. With ``intp_freq`` the position
  ``t`` of grid index g is ``g / grid * pt_hw_seq_len`` (the grid squeezed onto the 16 positions
  of pre-training); without it ``t = g`` (and the grid must then be ``pt_hw_seq_len``);
- pre-LN blocks: ``x += attn(norm1(x)); x += mlp(norm2(x))``, every LayerNorm eps 1e-6;
- attention (``subln``): separate bias-free q/k/v projections plus ``q_bias`` and ``v_bias`` (k has
  none), scale head_width ** -0.5, the sub-LayerNorm ``inner_attn_ln`` on the heads' output before
  ``proj`` (with bias);
- MLP (``naive_swiglu``): ``w3(ffn_ln(silu(w1 x) * w2 x))``, all three Linears with bias, hidden
  ``int(width * mlp_ratio)`` (2730 for width 1024, mlp_ratio 2.6667), ``ffn_ln`` the sub-LayerNorm;
- output: the final ``norm`` on all tokens, the CLS token taken (``use_mean_pooling=False``), the
  head an identity because ``embed_dim == width`` and ``proj_type`` is None; jina-clip-v2 has
  ``add_projections: false``, so ``visual_projection`` is an identity too. Matryoshka truncation
  and L2 normalisation follow, as ``encode_image`` and the text tower do.

Weights under ``vision_model.``: ``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``,
``blocks.N.{norm1, attn.q_proj, attn.k_proj, attn.v_proj, attn.q_bias, attn.v_bias,
attn.inner_attn_ln, attn.proj, norm2, mlp.w1, mlp.w2, mlp.ffn_ln, mlp.w3}``, ``norm``; the rotary
tables are buffers the published model does not save. Beside them the checkpoint holds the CLIP
``logit_scale`` (the contrastive temperature; read and kept, not needed to embed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.segment_pool import truncate_normalize
from .checkpoint import CheckpointError
from .embedding import EmbedOptions
from .images import ImageLimits, ImagePreprocessor
from .layers import WeightReader, assign, load_layer_norm, load_linear

log = logging.getLogger("infercore.models")

VISION_PREFIX = "vision_model."
LAYER_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class EvaVisionConfig:
    """jina-clip's ``vision_config`` (JinaCLIPVisionConfig), restricted to what jina-clip-v2 uses."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int
    mlp_ratio: float
    embed_dim: int
    pt_hw_seq_len: int = 16
    intp_freq: bool = True

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        """Patches per side (the stride floors: pixels past grid * patch_size are not seen)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_clip_config(cls, config: dict[str, Any]) -> EvaVisionConfig:
        """From a jina-clip ``config.json``; CheckpointError for a variant this tower does not run."""
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError("jina-clip config.json has no vision_config")
        # Switches whose other setting selects code this tower does not have. Defaults are the
        # published JinaCLIPVisionConfig's.
        required = {"rope_embeddings": (False, True), "naive_swiglu": (False, True), "subln": (False, True),
                    "post_norm": (False, False), "qkv_bias": (True, True)}
        for key, (default, wanted) in required.items():
            if bool(vision.get(key, default)) != wanted:
                raise CheckpointError(
                    f"vision_config {key}={vision.get(key, default)!r} is not supported (the EVA02 tower of "
                    f"jina-clip-v2 has {key}={wanted})"
                )
        if vision.get("ls_init_value") or vision.get("proj_type") is not None:
            raise CheckpointError("vision_config with layer scale (ls_init_value) or a projection head "
                                  "(proj_type) is not supported")
        if config.get("add_projections"):
            raise CheckpointError("jina-clip configs with add_projections=true are not supported")
        try:
            cfg = cls(
                image_size=int(vision.get("image_size", 224)),
                patch_size=int(vision.get("patch_size", 16)),
                width=int(vision.get("width", 768)),
                layers=int(vision.get("layers", 12)),
                head_width=int(vision.get("head_width", 64)),
                mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
                embed_dim=int(vision.get("embed_dim", 768)),
                pt_hw_seq_len=int(vision.get("pt_hw_seq_len", 16)),
                intp_freq=bool(vision.get("intp_freq", False)),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"vision_config has a value of the wrong type ({exc})") from None
        if cfg.embed_dim != cfg.width:
            raise CheckpointError(f"vision_config embed_dim {cfg.embed_dim} differs from width {cfg.width}; "
                                  "a projection head is not supported")
        if cfg.width % cfg.head_width or (cfg.head_width // 2) % 2:
            raise CheckpointError(f"vision_config width {cfg.width} / head_width {cfg.head_width} do not give "
                                  "whole heads with an even rotary half")
        if cfg.grid < 1:
            raise CheckpointError(f"vision_config image_size {cfg.image_size} is smaller than a patch")
        if not cfg.intp_freq and cfg.grid != cfg.pt_hw_seq_len:
            raise CheckpointError("vision_config without intp_freq needs image_size // patch_size == pt_hw_seq_len")
        return cfg


def rotary_2d_tables(cfg: EvaVisionConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [patches, head_width] in fp32 for the patch tokens in row-major grid order.

    Channel c < head_width / 2 rotates with the row, the rest with the column; pairs (2i, 2i + 1)
    share one angle (see the module docstring).
    """
    half = cfg.head_width // 2
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    grid = torch.arange(cfg.grid, dtype=torch.float32, device=device)
    if cfg.intp_freq:
        grid = grid / cfg.grid * cfg.pt_hw_seq_len
    angles = (grid[:, None] * inv_freq[None, :]).repeat_interleave(2, dim=1)  # [grid, half]
    rows = angles[:, None, :].expand(cfg.grid, cfg.grid, half)
    cols = angles[None, :, :].expand(cfg.grid, cfg.grid, half)
    table = torch.cat((rows, cols), dim=-1).reshape(cfg.num_patches, cfg.head_width)
    return table.cos(), table.sin()


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., N, D] rotated pairwise: (x0, x1) → (x0 cos - x1 sin, x1 cos + x0 sin), in fp32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


class EvaAttention(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        width = cfg.width
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(width, width, bias=True)  # bias = the checkpoint's q_bias
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=True)  # bias = the checkpoint's v_bias
        self.inner_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, tokens, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # CLS (token 0) keeps its q and k; the patches rotate by their grid position.
        q = torch.cat((q[:, :, :1], apply_rotary_interleaved(q[:, :, 1:], *rotary)), dim=2)
        k = torch.cat((k[:, :, :1], apply_rotary_interleaved(k[:, :, 1:], *rotary)), dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(self.inner_norm(out))

    def load(self, reader: WeightReader, prefix: str) -> None:
        assign(self.q_proj, "weight", reader.get(prefix + "q_proj.weight"))
        assign(self.q_proj, "bias", reader.get(prefix + "q_bias"))
        assign(self.k_proj, "weight", reader.get(prefix + "k_proj.weight"))
        assign(self.v_proj, "weight", reader.get(prefix + "v_proj.weight"))
        assign(self.v_proj, "bias", reader.get(prefix + "v_bias"))
        load_layer_norm(self.inner_norm, reader, prefix + "inner_attn_ln")
        load_linear(self.proj, reader, prefix + "proj")


class EvaSwiGLU(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.mlp_hidden)  # w1, through SiLU
        self.up = nn.Linear(cfg.width, cfg.mlp_hidden)  # w2
        self.inner_norm = nn.LayerNorm(cfg.mlp_hidden, eps=LAYER_NORM_EPS)  # ffn_ln
        self.down = nn.Linear(cfg.mlp_hidden, cfg.width)  # w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.inner_norm(F.silu(self.gate(x)) * self.up(x)))

    def load(self, reader: WeightReader, prefix: str) -> None:
        load_linear(self.gate, reader, prefix + "w1")
        load_linear(self.up, reader, prefix + "w2")
        load_layer_norm(self.inner_norm, reader, prefix + "ffn_ln")
        load_linear(self.down, reader, prefix + "w3")


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = EvaAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = EvaSwiGLU(cfg)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary)
        return x + self.mlp(self.norm2(x))

    def load(self, reader: WeightReader, prefix: str) -> None:
        load_layer_norm(self.norm1, reader, prefix + "norm1")
        self.attn.load(reader, prefix + "attn.")
        load_layer_norm(self.norm2, reader, prefix + "norm2")
        self.mlp.load(reader, prefix + "mlp.")


class EvaVisionTower(nn.Module):
    """Normalised pixels [B, 3, image_size, image_size] → CLS features [B, embed_dim] (before
    truncation and normalisation)."""

    family = "eva02-vision"

    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        cos, sin = rotary_2d_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # CLIP's contrastive temperature (exp(logit_scale) scales cosine similarities); not used to embed.
        self.logit_scale: float | None = None

    @property
    def dimensions(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def tokens_per_image(self) -> int:
        """Sequence length of one image (patches + CLS): its cost in a token budget."""
        return self.config.num_patches + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [batch, 3, {size}, {size}], got {list(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        rotary = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = block(x, rotary)
        return self.norm(x[:, 0])

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], reader: WeightReader,
                        prefix: str = VISION_PREFIX) -> EvaVisionTower:
        """Build on the meta device, then fill every parameter from ``reader`` (no random init)."""
        cfg = EvaVisionConfig.from_clip_config(config)
        with torch.device("meta"):
            model = cls(cfg)
        patch = reader.get(prefix + "patch_embed.proj.weight")
        expected = (cfg.width, 3, cfg.patch_size, cfg.patch_size)
        if tuple(patch.shape) != expected:
            raise CheckpointError(f"{prefix}patch_embed.proj.weight has shape {tuple(patch.shape)}, expected "
                                  f"{expected} (vision_config width / patch_size)")
        assign(model.patch_embed, "weight", patch)
        assign(model.patch_embed, "bias", reader.get(prefix + "patch_embed.proj.bias"))
        assign(model, "cls_token", reader.get(prefix + "cls_token"))
        assign(model, "pos_embed", reader.get(prefix + "pos_embed"))
        for i, block in enumerate(model.blocks):
            block.load(reader, f"{prefix}blocks.{i}.")
        load_layer_norm(model.norm, reader, prefix + "norm")
        extra_block = f"{prefix}blocks.{cfg.layers}."
        if any(key.startswith(extra_block) for key in reader.keys()):
            raise CheckpointError(f"the checkpoint has more vision blocks than vision_config layers={cfg.layers}")
        cos, sin = rotary_2d_tables(cfg, reader.device)
        model.rope_cos, model.rope_sin = cos, sin
        if "logit_scale" in reader:
            model.logit_scale = float(reader.get("logit_scale", torch.float32))
        return model.eval()


class ImageEmbeddingModel:
    """The vision tower with the text head's output options: Matryoshka truncation and L2
    normalisation per image. Writes no state while it runs, so executor threads share it."""

    def __init__(self, tower: EvaVisionTower):
        self.tower = tower
        self.dimensions = tower.dimensions

    @property
    def tokens_per_image(self) -> int:
        return self.tower.tokens_per_image

    @torch.inference_mode()
    def embed_images(self, pixels: torch.Tensor, options: Sequence[EmbedOptions]) -> list[np.ndarray]:
        """pixels [B, 3, S, S] (``images.preprocess_image`` output, stacked); ``options[i]`` applies to
        image i. Returns one float32 vector per image, of length ``options[i].dimensions`` (or full).

        Of EmbedOptions only ``normalize`` and ``dimensions`` apply: the tower pools its CLS token and
        has no task adapters or prompt tokens (``task`` and ``skip_leading`` are text options).
        """
        if len(options) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(options)} options")
        features = self.tower(pixels.to(self.tower.pos_embed.device)).float()
        dims = [o.dimensions or self.dimensions for o in options]
        device = features.device
        out = truncate_normalize(features, torch.tensor(dims, device=device),
                                 torch.tensor([o.normalize for o in options], device=device))
        host = out.cpu().numpy()
        return [host[i, :d] for i, d in enumerate(dims)]


def load_image_side(config: dict[str, Any], reader: WeightReader, model_dir: Path,
                    limits: ImageLimits | None = None) -> tuple[ImageEmbeddingModel, ImagePreprocessor] | None:
    """For a jina-clip checkpoint: the vision tower (from ``reader``, so its weights count as used)
    and the image processor of ``model_dir``; None for a model without image input, including a
    jina-clip checkpoint saved without any vision weights (its text tower alone; logged)."""
    if config.get("model_type") != "jina_clip":
        return None
    if not any(name.startswith(VISION_PREFIX) for name in reader.keys()):
        log.warning("%s: jina-clip checkpoint without vision weights (no %s*): text input only", model_dir,
                    VISION_PREFIX)
        return None
    tower = EvaVisionTower.from_checkpoint(config, reader)
    processor = ImagePreprocessor.for_model_dir(model_dir, tower.image_size, tower.config.patch_size, limits)
    return ImageEmbeddingModel(tower), processor
