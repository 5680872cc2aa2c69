"""Golden outputs for jina-clip-v2's vision side, from implementations nobody here wrote, for
tests/test_eva_vision.py to compare against. Runs in its own environment, because timm needs
torchvision, which does not import beside the suite's CPU torch (``make clip-golden`` does all of it):

    python3 -m venv .cache/clip-ref
    .cache/clip-ref/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31
    .venv/bin/python -m tests.tiny_clip .cache/tiny-jina-clip-v2
    .cache/clip-ref/bin/python tests/golden/make_clip_golden.py .cache/tiny-jina-clip-v2

References:

- vision features: timm's ``Eva`` configured as its EVA02 CLIP towers are (separate q/k/v with q and
  v biases, SwiGLU with the sub-LayerNorm ``scale_mlp``, the attention sub-LayerNorm
  ``scale_attn_inner``, 2-D RoPE with EVA's ``ref_feat_shape`` frequency interpolation, class-token
  pooling after the final norm), loaded from the tiny checkpoint's ``vision_model.*`` weights through
  timm's own EVA key mapping (``checkpoint_filter_fn``), strict;
- pixels: the published processor's inference transform (jina-clip-implementation ``transform.py``,
  ``image_transform(is_train=False, resize_mode='shortest', interpolation='bicubic')`` for a square
  size: torchvision ``Resize(size, BICUBIC)``, ``CenterCrop(size)``, RGB, ``ToTensor``), after the
  published ``encode_image`` decoding (``Image.open(...).convert('RGB')``). The published package is
  not installable here (it lives in a Hugging Face repository, not on PyPI), so those few torchvision
  calls are spelled out in this script. Two decoding steps are infercore's documented additions,
  applied here before the published transform so that the comparison covers the rest: the EXIF
  orientation, and 16-bit greyscale scaled to 8 bits (Pillow's own conversion clips it).

Output: tests/golden/clip_vision_golden.npz (uint8 pixels before normalisation, fp32 features, the
random-pixel batch and its features, and the digest of the vision weights it was made from).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from PIL import Image, ImageOps
from safetensors.torch import load_file
from timm.models.eva import Eva, checkpoint_filter_fn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

HERE = Path(__file__).resolve().parent
PREFIX = "vision_model."


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image)  # infercore's addition
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # infercore's addition
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).astype(np.uint8))
    return image.convert("RGB")  # published encode_image


def published_transform(size: int) -> Compose:
    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda image: image.convert("RGB"), ToTensor()])


def timm_tower(config: dict, weights: dict[str, torch.Tensor]) -> Eva:
    vision = config["vision_config"]
    width = vision["width"]
    model = Eva(
        img_size=vision["image_size"], patch_size=vision["patch_size"], num_classes=0, embed_dim=width,
        depth=vision["layers"], num_heads=width // vision["head_width"], mlp_ratio=vision["mlp_ratio"],
        qkv_bias=vision["qkv_bias"], qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
        use_rot_pos_emb=True, ref_feat_shape=(vision["pt_hw_seq_len"],) * 2, global_pool="token",
    ).eval()
    state = {k.removeprefix(PREFIX): v for k, v in weights.items() if k.startswith(PREFIX)}
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return model


def digest(weights: dict[str, torch.Tensor]) -> str:
    """tests/tiny_clip.weights_digest, spelled out (this environment does not import the suite)."""
    sha = hashlib.sha256()
    for name in sorted(weights):
        if name.startswith(PREFIX):
            sha.update(name.encode())
            sha.update(weights[name].to(torch.float32).numpy().tobytes())
    return sha.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="tiny jina-clip-v2 directory (python -m tests.tiny_clip OUT)")
    parser.add_argument("--out", type=Path, default=HERE / "clip_vision_golden.npz")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = json.loads((args.checkpoint / "config.json").read_text())
    processor = json.loads((args.checkpoint / "preprocessor_config.json").read_text())
    weights = load_file(str(args.checkpoint / "model.safetensors"))
    size = processor["size"]
    normalize = Normalize(processor["mean"], processor["std"])

    names = sorted(p.name for p in (HERE / "images").iterdir())
    transform = published_transform(size)
    pixels01 = torch.stack([transform(decode((HERE / "images" / n).read_bytes())) for n in names])
    pixels_u8 = torch.round(pixels01 * 255).to(torch.uint8)
    assert torch.equal(pixels_u8.float() / 255, pixels01), "ToTensor output is not k / 255"

    model = timm_tower(config, weights)
    generator = torch.Generator().manual_seed(7)
    random_pixels = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        features = model(normalize(pixels01))
        random_features = model(random_pixels)
    np.savez_compressed(
        args.out,
        names=np.array(names),
        pixels_u8=pixels_u8.numpy(),
        features=features.numpy().astype(np.float32),
        random_pixels=random_pixels.numpy(),
        random_features=random_features.numpy().astype(np.float32),
        vision_digest=np.array(digest(weights)),
        versions=np.array(f"timm {timm.__version__}, torch {torch.__version__}, torchvision "
                          f"{torchvision.__version__}, Pillow {Image.__version__}, python {sys.version.split()[0]}"),
    )
    print(f"{args.out}: {len(names)} images, features {tuple(features.shape)}, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
