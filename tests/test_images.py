"""Image input: every supported format and mode is decoded the way jina-clip-v2's published processor
does (pixels compared with goldens the published transform made, tests/golden/make_clip_golden.py),
and hostile or malformed input fails with ImageInputError naming the problem, before it can cost
memory."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from infercore.models.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInputError,
    ImageLimits,
    ImagePreprocessor,
    decode_base64_image,
    preprocess_image,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
IMAGES = GOLDEN / "images"
PIXEL_TOLERANCE = 1 / 255


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "clip_vision_golden.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def processor() -> ImagePreprocessor:
    # the tiny checkpoint's processor: 60 px (tests/tiny_clip.py), patch 14
    return ImagePreprocessor(size=60, patch_size=14)


def _unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return pixels * std + mean


def test_the_golden_set_covers_every_format_and_mode():
    modes = {}
    for path in IMAGES.iterdir():
        with Image.open(path) as image:
            modes[path.name] = (image.format, image.mode)
    assert {fmt for fmt, _ in modes.values()} == {"PNG", "JPEG", "WEBP", "GIF"}
    assert {"RGB", "RGBA", "LA", "L", "P", "I;16", "1", "CMYK"} <= {mode for _, mode in modes.values()}


def test_pixels_match_the_published_transform_for_every_format_and_mode(golden, processor):
    names = list(golden["names"])
    assert sorted(names) == sorted(p.name for p in IMAGES.iterdir())
    for name, expected_u8 in zip(names, golden["pixels_u8"], strict=True):
        prepared = preprocess_image((IMAGES / name).read_bytes(), processor)
        assert prepared.pixels.shape == (3, 60, 60) and prepared.pixels.dtype == torch.float32
        expected = torch.from_numpy(expected_u8).float() / 255
        error = (_unnormalize(prepared.pixels) - expected).abs().max().item()
        assert error <= PIXEL_TOLERANCE, f"{name}: max pixel error {error * 255:.2f}/255"


def test_a_changed_pixel_pipeline_fails_the_comparison(golden, processor):
    """The comparison above can fail: bilinear instead of bicubic is caught."""
    bilinear = ImagePreprocessor(size=60, patch_size=14, resample=Image.Resampling.BILINEAR)
    index = list(golden["names"]).index("jpeg_rgb.jpg")
    prepared = preprocess_image((IMAGES / "jpeg_rgb.jpg").read_bytes(), bilinear)
    expected = torch.from_numpy(golden["pixels_u8"][index]).float() / 255
    assert (_unnormalize(prepared.pixels) - expected).abs().max().item() > PIXEL_TOLERANCE


def test_exif_orientation_is_applied(processor):
    data = (IMAGES / "jpeg_exif_orientation6.jpg").read_bytes()
    prepared = preprocess_image(data, processor)
    assert (prepared.width, prepared.height) == (60, 90)  # stored 90 × 60, orientation 6
    with Image.open(io.BytesIO(data)) as raw:
        unrotated = raw.convert("RGB")
    buffer = io.BytesIO()
    unrotated.save(buffer, "PNG")
    assert not torch.allclose(preprocess_image(buffer.getvalue(), processor).pixels, prepared.pixels, atol=0.1)


def test_an_animated_gif_uses_its_first_frame(processor):
    data = (IMAGES / "gif_animated.gif").read_bytes()
    frames = []
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 2
        for index in range(2):
            gif.seek(index)
            buffer = io.BytesIO()
            gif.convert("RGB").save(buffer, "PNG")
            frames.append(preprocess_image(buffer.getvalue(), processor).pixels)
    pixels = preprocess_image(data, processor).pixels
    assert torch.equal(pixels, frames[0])
    assert not torch.allclose(pixels, frames[1], atol=0.1)


def test_base64_and_data_uris_give_the_same_pixels_as_bytes(processor):
    data = (IMAGES / "png_rgba.png").read_bytes()
    encoded = base64.b64encode(data).decode()
    expected = preprocess_image(data, processor).pixels
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    for value in (encoded, f"data:image/png;base64,{encoded}", f"DATA:image/webp;charset=x;base64,{wrapped}",
                  encoded.rstrip("=")):
        assert torch.equal(preprocess_image(value, processor).pixels, expected)


def test_cost_in_tokens_is_the_towers_sequence_length(processor):
    assert preprocess_image((IMAGES / "png_rgb.png").read_bytes(), processor).tokens == 4 * 4 + 1
    assert ImagePreprocessor(size=512, patch_size=14).tokens_per_image == 36 * 36 + 1


# ---- bad input ---------------------------------------------------------------------------------


def _png(width: int, height: int, idat: bytes = b"", mode_bytes: tuple[int, int] = (8, 0)) -> bytes:
    """A PNG whose header says width × height, with ``idat`` as its (possibly bogus) data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, mode_bytes[0], mode_bytes[1], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width × height, holding one 1 × 1 frame."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
            + b"\x02\x02\x44\x01\x00;")


def _jpeg_declaring(width: int, height: int) -> bytes:
    """The test set's JPEG with its frame header (SOF0) changed to say width × height."""
    data = bytearray((IMAGES / "jpeg_rgb.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is plain text, not an image", r"not an image in a supported format"),
        (b"", r"empty"),
        ((IMAGES / "png_rgb.png").read_bytes()[:400], r"truncated or corrupt"),
        ((IMAGES / "jpeg_rgb.jpg").read_bytes()[:2000], r"truncated or corrupt"),
        (_png(60_000, 60_000, zlib.compress(b"\x00" * 1000)), r"decompression bomb"),
        (_png(8_000, 8_000, zlib.compress(b"\x00" * 1000)), r"8000×8000 pixels, more than .*decompression bomb"),
        (_gif(65_535, 65_535), r"decompression bomb"),
        (_jpeg_declaring(60_000, 60_000), r"decompression bomb"),
        (_png(0, 0), r"has no pixels"),
        (_png(0, 5), r"has no pixels"),
        (_encoded(Image.new("L", (100_000, 1)), "PNG"), r"100000×1 .*aspect ratio"),
        (_encoded(Image.new("RGB", (8, 8)), "BMP"), r"format BMP is not supported"),
        (_encoded(Image.new("RGB", (8, 8)), "TIFF"), r"format TIFF is not supported"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", r"format SVG is not supported"),
    ],
    ids=["text", "empty", "truncated-png", "truncated-jpeg", "bomb", "bomb-64mp", "bomb-gif", "bomb-jpeg", "0x0",
         "0x5", "100000x1", "bmp", "tiff", "svg"],
)
def test_bad_image_bytes_are_refused_with_a_plain_reason(processor, data, message):
    with pytest.raises(ImageInputError, match=message):
        preprocess_image(data, processor)


def test_a_bomb_is_refused_before_its_pixels_are_decoded(processor, monkeypatch):
    """The pixel limit is checked from the header: nothing is decoded for an oversized image."""
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    data = _encoded(Image.new("L", (3000, 3000)), "PNG")
    small = ImagePreprocessor(size=60, patch_size=14, limits=ImageLimits(max_pixels=3000 * 3000 - 1))
    with pytest.raises(ImageInputError, match="decompression bomb"):
        preprocess_image(data, small)
    assert not loads


def test_the_byte_limit_is_checked_before_base64_is_decoded(processor):
    limits = ImageLimits(max_bytes=1000)
    small = ImagePreprocessor(size=60, patch_size=14, limits=limits)
    data = (IMAGES / "jpeg_rgb.jpg").read_bytes()
    assert len(data) > 1000
    with pytest.raises(ImageInputError, match="larger than the limit of 1000 bytes"):
        preprocess_image(base64.b64encode(data).decode(), small)
    with pytest.raises(ImageInputError, match=r"more than the limit of 1000"):
        preprocess_image(data, small)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64 at all!", r"not valid base64"),
        ("data:image/png;base64,@@@@", r"not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", r"media type 'text/plain' is not an image"),
        ("data:image/png,rawbytes", r"not of the form data:image/<type>;base64"),
        ("data:image/png;" + "x" * 300 + ";base64,aGVsbG8=", r"prefix of at most 256"),
        ("data:image/png;base64,", r"empty"),
    ],
)
def test_bad_base64_and_data_uris_are_refused(processor, value, message):
    with pytest.raises(ImageInputError, match=message):
        preprocess_image(value, processor)


def test_error_messages_do_not_carry_the_input(processor):
    payload = base64.b64encode(b"GIF89a" + b"\x00" * 64).decode()
    for value in (payload, "data:image/gif;base64," + payload, "data:image/png;base64," + payload + "%%"):
        with pytest.raises(ImageInputError) as caught:
            preprocess_image(value, processor)
        assert payload[8:40] not in str(caught.value)


def test_decode_base64_image_returns_the_bytes():
    data = (IMAGES / "png_tiny.png").read_bytes()
    assert decode_base64_image("data:image/png;base64," + base64.b64encode(data).decode(), 10_000) == data
