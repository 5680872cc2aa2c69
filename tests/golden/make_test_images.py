"""Writes the image test set (tests/golden/images/): one small image per format and mode the image
preprocessing must handle, drawn deterministically.

The files are committed (about 100 KB in all) because encoders differ between Pillow and libjpeg /
libwebp builds: the golden pixels (make_clip_golden.py) belong to these exact bytes. Rerun only to
change the set, then regenerate the goldens:

    .venv/bin/python tests/golden/make_test_images.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "images"
ORIENTATION = 0x0112


def _rgb(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients, a disc and some noise: content every resampling filter treats differently."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin((x + 2 * y) / 5.0)
    disc = (x - width / 3) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2
    img = np.stack([r, g, b], axis=-1)
    img[disc] = [250, 30, 60]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _alpha(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 255 // max(width - 1, 1)) ^ (y * 7 % 256)).astype(np.uint8)


def build() -> dict[str, bytes]:
    files: dict[str, bytes] = {}

    def save(name: str, image: Image.Image, fmt: str, **kwargs) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        files[name] = buffer.getvalue()

    save("png_rgb.png", Image.fromarray(_rgb(97, 61, 1)), "PNG")
    rgba = np.dstack([_rgb(64, 80, 2), _alpha(64, 80)])
    save("png_rgba.png", Image.fromarray(rgba), "PNG")
    la = np.dstack([_rgb(50, 70, 3)[..., 0], _alpha(50, 70)])
    save("png_la.png", Image.fromarray(la), "PNG")
    save("png_l.png", Image.fromarray(_rgb(73, 73, 4)[..., 1]), "PNG")
    palette = Image.fromarray(_rgb(80, 50, 5)).quantize(colors=16, dither=Image.Dither.NONE)
    save("png_palette.png", palette, "PNG", transparency=0)
    sixteen = (_rgb(66, 90, 6)[..., 0].astype(np.uint16) * 257 + np.arange(66, dtype=np.uint16)[None, :])
    save("png_16bit.png", Image.fromarray(sixteen.astype(np.uint16)), "PNG")
    save("png_1bit.png", Image.fromarray(_rgb(40, 40, 7)[..., 2] > 128).convert("1"), "PNG")
    save("png_tiny.png", Image.fromarray(_rgb(5, 3, 8)), "PNG")
    save("png_exact.png", Image.fromarray(_rgb(60, 60, 9)), "PNG")
    save("jpeg_rgb.jpg", Image.fromarray(_rgb(120, 72, 10)), "JPEG", quality=90)
    save("jpeg_gray.jpg", Image.fromarray(_rgb(61, 97, 11)[..., 0]), "JPEG", quality=90)
    save("jpeg_cmyk.jpg", Image.fromarray(_rgb(70, 70, 12)).convert("CMYK"), "JPEG", quality=90)
    rotated = Image.fromarray(_rgb(90, 60, 13))
    exif = rotated.getexif()
    exif[ORIENTATION] = 6  # viewers rotate it 90° clockwise: 60 × 90 as shown
    save("jpeg_exif_orientation6.jpg", rotated, "JPEG", quality=90, exif=exif.tobytes())
    save("webp_rgb.webp", Image.fromarray(_rgb(81, 59, 14)), "WEBP", quality=90)
    save("webp_rgba.webp", Image.fromarray(np.dstack([_rgb(59, 81, 15), _alpha(59, 81)])), "WEBP",
         lossless=True)
    first = Image.fromarray(_rgb(64, 48, 16)).quantize(colors=32, dither=Image.Dither.NONE)
    second = Image.fromarray(255 - _rgb(64, 48, 17)).quantize(colors=32, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    files["gif_animated.gif"] = buffer.getvalue()
    return files


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(build().items()):
        (OUT / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
