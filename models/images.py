"""Image bytes → the pixel tensor a vision tower takes, as jina-clip-v2's published processor makes
it, with bounds on what a request can make the server decode.

This is the image counterpart of ``tokenizer.py``: request-side, CPU-bound work with no event loop
or HTTP in it. Pillow releases the GIL while it decodes and resamples, so the server runs
``preprocess_image`` on its executor threads, off the event loop, like tokenization; the model
directory decides the parameters (``preprocessor_config.json``), so the loader builds the
``ImagePreprocessor`` beside the model.

Published pipeline (jina-clip-implementation ``modeling_clip.py`` ``encode_image``,
``processing_clip.py`` ``JinaCLIPImageProcessor``, ``transform.py`` ``image_transform`` with
``is_train=False``, ``resize_mode='shortest'``):

1. ``Image.open(bytes).convert('RGB')``: Pillow's own conversion. Alpha is dropped, not composited
   (RGBA/LA/PA keep their colour channels as stored); palette images take their palette colours;
   CMYK uses Pillow's conversion; greyscale is replicated into three channels. 16-bit greyscale is
   the one mode where this module differs: Pillow clips its values to 255 (a mostly white image),
   so it is scaled to 8 bits first (value >> 8). The published processor's ``fill_color`` (0) only
   pads in its 'longest' resize mode, which jina-clip-v2 does not use.
2. torchvision ``Resize(size)`` on the PIL image: the shorter side becomes ``size``, the longer
   ``int(size * long / short)`` (truncated), Pillow's bicubic (with its antialiasing).
3. torchvision ``CenterCrop(size)``: offsets ``round((side - size) / 2)`` (Python's, half to even).
4. ``ToTensor`` (uint8 / 255, CHW) and ``Normalize`` with the OpenAI CLIP mean and std.

Added here, not in the published code: the EXIF orientation is applied before step 1 (a photo is
embedded the way viewers show it), only the first frame of an animated GIF or WebP is used (the
published code also takes the frame Pillow opens on, which is the first), and the checks below.

Bounds, each failing with ``ImageInputError`` (a plain message for a 4xx, never the image bytes):
encoded bytes per image (``max_bytes``, checked on the base64 length before decoding it), decoded
pixels per image (``max_pixels``, checked from the header before any pixel is decoded: a
decompression bomb), and the aspect ratio (``max_aspect_ratio``: resizing a 100,000 × 1 image's
short side to 512 would make a 51-gigapixel intermediate). Formats: PNG, JPEG, WebP, GIF.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import (
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from .checkpoint import CheckpointError

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's format names that are decoded (a camera's multi-picture JPEG opens as JPEG, at its first
# picture). Their plugins are imported above so that they are registered whatever else ran first.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF"
_PLUGINS = (GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin)

# Signatures of common image formats that are not decoded, to name them in the error instead of
# calling them "not an image". Only magic bytes are compared: no other Pillow plugin parses input.
_OTHER_FORMATS = (
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"qoif", "QOI"),
)
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF",
                b"avis": "AVIF"}

# data:image/png;base64,... : the media type and the base64 marker (Elasticsearch caps the prefix at
# 256 characters; so does this parser).
_DATA_URI = re.compile(r"data:(?P<type>[^;,]*)((?:;[^;,]*)*);base64,", re.IGNORECASE)
_MAX_DATA_URI_PREFIX = 256
_BASE64_WHITESPACE = re.compile(r"[ \t\r\n]")


class ImageInputError(ValueError):
    """An image input that cannot be embedded; the message names the problem (for a 4xx) and never
    contains the input's bytes."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost to decode."""

    max_bytes: int = 20 * 2**20
    # Decoded width × height; Pillow's own bomb warning starts at about 89 megapixels.
    max_pixels: int = 40_000_000
    # Longer side / shorter side.
    max_aspect_ratio: float = 32.0


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the tower: ``pixels`` [3, size, size] float32, normalised; ``tokens`` its
    sequence length in the tower (patches + CLS), its cost in a token budget; the decoded size and
    format for logs (metadata only)."""

    pixels: torch.Tensor
    tokens: int
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class ImagePreprocessor:
    """jina-clip's ``JinaCLIPImageProcessor`` at inference ('shortest' resize, centre crop)."""

    size: int
    patch_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    limits: ImageLimits = ImageLimits()

    @property
    def tokens_per_image(self) -> int:
        return (self.size // self.patch_size) ** 2 + 1

    @classmethod
    def for_model_dir(cls, model_dir: Path, image_size: int, patch_size: int,
                      limits: ImageLimits | None = None) -> ImagePreprocessor:
        """From the directory's ``preprocessor_config.json`` (the published processor's settings)
        when there is one, else the published defaults at the tower's ``image_size``.
        CheckpointError for settings this module does not implement or that disagree with the tower."""
        path = model_dir / "preprocessor_config.json"
        settings: dict[str, Any] = {}
        if path.is_file():
            try:
                settings = json.loads(path.read_text())
            except ValueError as exc:
                raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
        size = settings.get("size", image_size)
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        if size != image_size:
            raise CheckpointError(f"{path.name}: size {size!r} differs from the vision tower's image_size {image_size}")
        resize_mode = settings.get("resize_mode", "shortest")
        if resize_mode != "shortest":
            raise CheckpointError(f"{path.name}: resize_mode {resize_mode!r} is not supported (only 'shortest')")
        interpolation = settings.get("interpolation", "bicubic")
        resamples = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
        if interpolation not in resamples:
            raise CheckpointError(f"{path.name}: interpolation {interpolation!r} is not supported (bicubic, bilinear)")
        mean = _three(settings.get("mean") or OPENAI_CLIP_MEAN, "mean", path)
        std = _three(settings.get("std") or OPENAI_CLIP_STD, "std", path)
        if min(std) <= 0:
            raise CheckpointError(f"{path.name}: std must be positive, got {std}")
        return cls(size=int(size), patch_size=patch_size, mean=mean, std=std, resample=resamples[interpolation],
                   limits=limits or ImageLimits())

    def __call__(self, data: bytes | str) -> PreparedImage:
        """``preprocess_image(data, self)``."""
        return preprocess_image(data, self)


def _three(value: Any, name: str, path: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise CheckpointError(f"{path.name}: {name} must be three numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI or of bare base64 (standard alphabet; line
    breaks and missing padding tolerated). ImageInputError for anything else, or for more than
    ``max_bytes`` once decoded (judged from the length, before decoding)."""
    if not isinstance(value, str):
        raise ImageInputError("an image must be given as a base64 string or a data:image/...;base64, URI")
    payload = value
    if value[:5].lower() == "data:":
        match = _DATA_URI.match(value, 0, _MAX_DATA_URI_PREFIX + 1)
        if match is None or match.end() > _MAX_DATA_URI_PREFIX:
            raise ImageInputError(
                "image data URI is not of the form data:image/<type>;base64,<data> (with a prefix of at most "
                f"{_MAX_DATA_URI_PREFIX} characters)"
            )
        media_type = match.group("type").strip().lower()
        if not media_type.startswith("image/"):
            raise ImageInputError(f"data URI media type {media_type[:64]!r} is not an image type (image/...)")
        payload = value[match.end():]
    payload = _BASE64_WHITESPACE.sub("", payload)
    if not payload:
        raise ImageInputError("image is empty (no base64 data)")
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageInputError(f"image is larger than the limit of {max_bytes} bytes")
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("image is not valid base64 (standard alphabet A-Z a-z 0-9 + /)") from None


def preprocess_image(data: bytes | str, processor: ImagePreprocessor,
                     reserve: Callable[[int], AbstractContextManager[Any]] | None = None) -> PreparedImage:
    """Encoded image bytes (or base64 / a data URI) → PreparedImage; ImageInputError for anything
    that is not a PNG, JPEG, WebP or GIF image within ``processor.limits``.

    ``reserve(pixels)``, when given, is entered with the image's width × height (read from its
    header) before any pixel is decoded and left once the pixel tensor is made: the caller's bound on
    the pixels being decoded at once (what it raises propagates; the image is closed)."""
    limits = processor.limits
    if isinstance(data, str):
        data = decode_base64_image(data, limits.max_bytes)
    if not data:
        raise ImageInputError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    image = _open(data, limits)
    try:
        with reserve(image.width * image.height) if reserve else contextlib.nullcontext():
            rgb = _decode_rgb(image)
            image.close()  # the RGB copy is all that is needed from here on
            pixels = _resize_crop_normalize(rgb, processor)
    finally:
        image.close()
    return PreparedImage(pixels=pixels, tokens=processor.tokens_per_image, width=rgb.width, height=rgb.height,
                         format=image.format or "")


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Pillow's lazy open (header only) of a supported format, with the size checks done before any
    pixel is decoded."""
    try:
        # Pillow's own bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that)
        # runs here; the checks below are stricter and decide. (No warnings.catch_warnings around it:
        # that is not thread-safe, and this runs on executor threads.)
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageInputError(f"image has more than {limits.max_pixels} pixels (decompression bomb limit)") from None
    except UnidentifiedImageError:
        if _declares_no_pixels(data):
            raise ImageInputError("image is 0 pixels wide or high: it has no pixels") from None
        other = _other_format(data)
        if other:
            raise ImageInputError(f"image format {other} is not supported (supported: {_FORMAT_NAMES})") from None
        raise ImageInputError(f"data is not an image in a supported format ({_FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # header that a plugin recognised but rejects
        raise ImageInputError(f"image header is invalid ({_plain(exc)})") from None
    width, height = image.size
    problem = None
    if width <= 0 or height <= 0:
        problem = f"image is {width}×{height} pixels: it has no pixels"
    elif width * height > limits.max_pixels:
        problem = (f"image is {width}×{height} pixels, more than the limit of {limits.max_pixels} pixels "
                   "(decompression bomb limit)")
    elif max(width, height) / min(width, height) > limits.max_aspect_ratio:
        problem = (f"image is {width}×{height} pixels: an aspect ratio above {limits.max_aspect_ratio:g}:1 "
                   "is not supported")
    if problem:
        image.close()
        raise ImageInputError(problem)
    return image


def _declares_no_pixels(data: bytes) -> bool:
    """Whether a PNG or GIF header states a zero width or height (Pillow refuses to identify those)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width == 0 or height == 0
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width == 0 or height == 0
    return False


def _other_format(data: bytes) -> str | None:
    head = data[:16]
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12])
    stripped = data[:256].lstrip()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in data[:1024]):
        return "SVG"
    return None


def _decode_rgb(image: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, as 8-bit RGB (module docstring, step 1)."""
    try:
        image.seek(0)
        image.load()
        oriented = ImageOps.exif_transpose(image)
        if oriented.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            oriented = _sixteen_bit_to_l(oriented)
        return oriented.convert("RGB")
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:  # struct: malformed chunks
        raise ImageInputError(f"image data is truncated or corrupt ({_plain(exc)})") from None


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit greyscale (Pillow modes I;16* and I, the latter holding 16-bit PNG data) → 8-bit L by
    keeping the high byte; Pillow's own conversion would clip every value above 255 to white."""
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))


def _resize_crop_normalize(image: Image.Image, processor: ImagePreprocessor) -> torch.Tensor:
    """Steps 2-4 of the module docstring on an RGB image → [3, size, size] float32."""
    size = processor.size
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != (width, height):
        image = image.resize(new_size, processor.resample)
    width, height = image.size
    top = round((height - size) / 2.0)  # Python rounds half to even, as torchvision does
    left = round((width - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(processor.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(processor.std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def _plain(exc: BaseException) -> str:
    """An exception's message cut short, for an error that must not carry input bytes."""
    text = str(exc) or type(exc).__name__
    return text[:120]
