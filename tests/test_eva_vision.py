"""jina-clip-v2's EVA02 vision tower computes what timm's ``Eva`` computes on the same weights
(golden features made by tests/golden/make_clip_golden.py in its own environment), a jina-clip-v2
checkpoint in the published layout loads with every weight used, and images come out in the text
tower's space with the text head's options."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from infercore.models.checkpoint import CheckpointError, open_weights
from infercore.models.embedding import EmbedOptions
from infercore.models.eva_vision import EvaVisionConfig, EvaVisionTower
from infercore.models.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInputError, preprocess_image
from infercore.models.jina_xlmr import JinaXlmrEncoder
from infercore.models.layers import WeightReader
from infercore.models.loader import load_model
from tests import tiny_clip, tiny_jina

GOLDEN = Path(__file__).resolve().parent / "golden"
COSINE = 0.99999
MAX_ABS = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "clip_vision_golden.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_jina.build_jina_clip_v2(tmp_path_factory.mktemp("clip") / "jina-clip-v2")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_model("jina-clip-v2", clip_dir, device="cpu")


def _normalized(pixels_u8: np.ndarray) -> torch.Tensor:
    """torchvision's ToTensor + Normalize of the golden uint8 pixels."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels_u8).float() / 255 - mean) / std


def _assert_parity(ours: torch.Tensor, expected: torch.Tensor) -> None:
    cosine = F.cosine_similarity(ours, expected, dim=1).min().item()
    max_abs = (ours - expected).abs().max().item()
    assert cosine >= COSINE and max_abs <= MAX_ABS, f"cosine {cosine:.8f}, max abs {max_abs:.2e}"


def test_the_tiny_checkpoint_is_the_one_the_goldens_were_made_from(clip_dir, golden):
    weights = load_file(str(clip_dir / "model.safetensors"))
    assert tiny_clip.weights_digest(weights) == str(golden["vision_digest"]), (
        "the tiny vision weights changed: regenerate the goldens (make clip-golden)"
    )


def test_vision_features_match_timm_eva(clip, golden):
    tower = clip.images.tower
    with torch.inference_mode():
        _assert_parity(tower(torch.from_numpy(golden["random_pixels"])), torch.from_numpy(golden["random_features"]))
        _assert_parity(tower(_normalized(golden["pixels_u8"])), torch.from_numpy(golden["features"]))


def test_a_wrong_rotary_interpolation_fails_the_comparison(clip, golden):
    """The parity above can fail: rotary positions without the frequency interpolation are caught."""
    tower = clip.images.tower
    cfg = tower.config
    plain = EvaVisionConfig(**{**cfg.__dict__, "intp_freq": False, "pt_hw_seq_len": cfg.grid})
    from infercore.models.eva_vision import rotary_2d_tables

    cos, sin = rotary_2d_tables(plain)
    saved = tower.rope_cos, tower.rope_sin
    try:
        tower.rope_cos, tower.rope_sin = cos, sin
        with torch.inference_mode():
            ours = tower(torch.from_numpy(golden["random_pixels"]))
        assert (ours - torch.from_numpy(golden["random_features"])).abs().max().item() > MAX_ABS
    finally:
        tower.rope_cos, tower.rope_sin = saved


def test_image_bytes_to_vectors_end_to_end(clip, golden):
    names = list(golden["names"])
    prepared = [preprocess_image((GOLDEN / "images" / n).read_bytes(), clip.image_processor) for n in names]
    pixels = torch.stack([p.pixels for p in prepared])
    vectors = clip.images.embed_images(pixels, [EmbedOptions()] * len(names))
    expected = F.normalize(torch.from_numpy(golden["features"]), dim=1)
    _assert_parity(torch.from_numpy(np.stack(vectors)), expected)


def test_matryoshka_truncation_and_normalization_per_image(clip, golden):
    pixels = torch.from_numpy(golden["random_pixels"])
    full, short, raw = clip.images.embed_images(
        torch.cat([pixels[:1]] * 3),
        [EmbedOptions(), EmbedOptions(dimensions=8), EmbedOptions(normalize=False)],
    )
    features = torch.from_numpy(golden["random_features"][0])
    assert full.shape == (32,) and short.shape == (8,) and raw.shape == (32,)
    assert np.allclose(raw, features.numpy(), atol=MAX_ABS)
    assert np.allclose(full, F.normalize(features, dim=0).numpy(), atol=MAX_ABS)
    assert np.allclose(short, F.normalize(features[:8], dim=0).numpy(), atol=MAX_ABS)


def test_text_and_images_share_one_space(clip):
    assert clip.images.dimensions == clip.dimensions == 32
    assert clip.matryoshka_dimensions == (32, 64, 128, 256, 512, 768, 1024)
    assert clip.image_processor.tokens_per_image == clip.images.tokens_per_image == 17
    assert clip.images.tower.logit_scale == pytest.approx(float(np.log(1 / 0.07)))
    clip.warmup()  # one text and one image forward pass


def test_the_published_layout_loads_with_no_weight_left_over(clip_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="infercore.models"):
        load_model("jina-clip-v2", clip_dir, device="cpu")
    assert not [r for r in caplog.records if "unused" in r.getMessage()]
    # and without the loader's ignore list: every tensor of the file is taken by one tower
    config = json.loads((clip_dir / "config.json").read_text())
    reader = WeightReader(open_weights(clip_dir), torch.device("cpu"), torch.float32)
    JinaXlmrEncoder.from_checkpoint(config, reader)
    EvaVisionTower.from_checkpoint(config, reader)
    assert reader.unused() == []


def test_a_text_only_model_has_no_image_side(tmp_path):
    model = load_model("v3", tiny_jina.build_jina_v3(tmp_path / "v3"), device="cpu")
    assert model.images is None and model.image_processor is None


def test_a_jina_clip_checkpoint_without_vision_weights_serves_text_only(clip_dir, tmp_path, caplog):
    def drop_vision(weights):
        for name in [n for n in weights if n.startswith("vision_model.") or n == "logit_scale"]:
            del weights[name]

    path = _rewrite(clip_dir, tmp_path / "text-only", change_weights=drop_vision)
    with caplog.at_level(logging.WARNING, logger="infercore.models"):
        model = load_model("text-only", path, device="cpu")
    assert model.images is None and model.dimensions == 32
    assert any("without vision weights" in r.getMessage() for r in caplog.records)


def _rewrite(clip_dir: Path, out: Path, change_weights=None, change_vision=None) -> Path:
    shutil.copytree(clip_dir, out)
    if change_weights:
        weights = load_file(str(out / "model.safetensors"))
        change_weights(weights)
        save_file(weights, str(out / "model.safetensors"))
    if change_vision:
        config = json.loads((out / "config.json").read_text())
        change_vision(config["vision_config"])
        (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_missing_vision_weight_is_refused(clip_dir, tmp_path):
    path = _rewrite(clip_dir, tmp_path / "bad", change_weights=lambda w: w.pop("vision_model.blocks.1.attn.v_bias"))
    with pytest.raises(CheckpointError, match=r"missing the weight 'vision_model\.blocks\.1\.attn\.v_bias'"):
        load_model("bad", path, device="cpu")


def test_vision_weights_beyond_the_config_are_refused(clip_dir, tmp_path):
    path = _rewrite(clip_dir, tmp_path / "bad", change_vision=lambda v: v.update(layers=1))
    with pytest.raises(CheckpointError, match=r"more vision blocks than vision_config layers=1"):
        load_model("bad", path, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"naive_swiglu": False}, r"naive_swiglu=False is not supported"),
        ({"post_norm": True}, r"post_norm=True is not supported"),
        ({"proj_type": "linear"}, r"projection head"),
        ({"patch_size": 12}, r"patch_embed\.proj\.weight has shape"),
    ],
)
def test_vision_variants_this_tower_does_not_run_are_refused(clip_dir, tmp_path, change, message):
    path = _rewrite(clip_dir, tmp_path / "bad", change_vision=lambda v: v.update(change))
    with pytest.raises(CheckpointError, match=message):
        load_model("bad", path, device="cpu")


def test_the_real_size_geometry():
    """jina-clip-v2's own numbers: 36 × 36 patches + CLS, SwiGLU hidden 2730, 1024-d."""
    config = {"model_type": "jina_clip", "vision_config": tiny_clip.vision_config(
        embed_dim=1024, width=1024, image_size=512, layers=24, head_width=64)}
    cfg = EvaVisionConfig.from_clip_config(config)
    assert (cfg.grid, cfg.num_patches + 1, cfg.num_heads, cfg.mlp_hidden) == (36, 1297, 16, 2730)


def test_a_non_image_is_a_clean_error_for_a_loaded_model(clip):
    with pytest.raises(ImageInputError):
        preprocess_image(b"\x89PNG\r\n\x1a\n broken", clip.image_processor)
