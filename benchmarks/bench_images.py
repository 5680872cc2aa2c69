"""Image embedding on CPU: images/s of jina-clip-v2's vision side, with decoding (bytes → pixels,
``models/images.py``) and the tower (pixels → vectors, ``models/eva_vision.py``) timed apart.

Two towers, random weights:

- tiny: the test suite's tiny jina-clip-v2 (tests/tiny_clip.py: 60 px, 2 blocks, width 32), loaded
  through ``load_model`` like a served model;
- real size: EVA02-L/14 at 512 px (24 blocks, width 1024, 16 heads, SwiGLU 2730; 1297 tokens per
  image), built from in-memory random weights in the published layout. One image costs about
  0.8 TFLOP, i.e. seconds on a small CPU, so this part is short by default (``--real-batch 1
  --real-repeats 2``); ``--skip-real`` leaves it out.

Decoding is timed per image for the committed test set (small images of every format) and for two
photo-sized images (1920 × 1080 JPEG and PNG) at each tower's size. Model time is the median of
``--repeats`` forward passes of one batch; images/s = batch / model time. End-to-end images/s on one
thread = 1 / (decode + model time per image).

    python benchmarks/bench_images.py [--threads N] [--tiny-batch 32] [--repeats 5] [--skip-real]

Writes benchmarks/results/bench_images.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "tests" / "golden" / "images"
NOISY_SPREAD = 1.5
REAL_SIZE = dict(embed_dim=1024, width=1024, image_size=512, layers=24, head_width=64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed tiny forward passes / decodes (median)")
    parser.add_argument("--tiny-batch", type=int, default=32)
    parser.add_argument("--real-batch", type=int, default=1)
    parser.add_argument("--real-repeats", type=int, default=2)
    parser.add_argument("--skip-real", action="store_true", help="tiny tower only")
    return parser.parse_args()


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def photo_images() -> dict[str, bytes]:
    """1920 × 1080 photo-like content (gradients + noise) as JPEG and PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1080, 0:1920].astype(np.float32)
    rgb = np.stack([x / 1920 * 255, y / 1080 * 255, 128 + 127 * np.sin(x / 40 + y / 70)], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    out = {}
    for fmt, name in (("JPEG", "photo_1920x1080.jpg"), ("PNG", "photo_1920x1080.png")):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out[name] = buffer.getvalue()
    return out


def bench_decode(processor, files: dict[str, bytes], repeats: int) -> dict[str, dict[str, float]]:
    from infercore.models.images import preprocess_image

    results = {}
    for name, data in files.items():
        times = timed(lambda d=data: preprocess_image(d, processor), repeats)
        results[name] = {"bytes": len(data), "ms": 1000 * statistics.median(times),
                         "spread": max(times) / min(times)}
    return results


def bench_model(images_model, batch: int, repeats: int) -> dict[str, float]:
    import torch

    from infercore.models.embedding import EmbedOptions

    size = images_model.tower.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    options = [EmbedOptions()] * batch
    images_model.embed_images(pixels, options)  # warm-up
    times = timed(lambda: images_model.embed_images(pixels, options), repeats)
    median = statistics.median(times)
    return {"batch": batch, "repeats": repeats, "ms_per_batch": 1000 * median, "images_per_s": batch / median,
            "spread": max(times) / min(times)}


def real_size_model():
    import torch

    from infercore.models.eva_vision import EvaVisionTower, ImageEmbeddingModel
    from infercore.models.layers import WeightReader
    from tests import tiny_clip

    config = {"model_type": "jina_clip", "vision_config": tiny_clip.vision_config(**REAL_SIZE)}
    weights = tiny_clip.vision_weights(config["vision_config"])
    reader = WeightReader(weights, torch.device("cpu"), torch.float32)
    tower = EvaVisionTower.from_checkpoint(config, reader)
    params = sum(p.numel() for p in tower.parameters())
    return ImageEmbeddingModel(tower), params


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from infercore.models.images import ImagePreprocessor
    from infercore.models.loader import load_model
    from tests import tiny_jina

    torch.set_num_threads(args.threads)
    test_set = {p.name: p.read_bytes() for p in sorted(IMAGES.iterdir())}
    photos = photo_images()
    report: dict = {"benchmark": "bench_images", "threads": args.threads}
    spreads = []

    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_model("jina-clip-v2", tiny_jina.build_jina_clip_v2(Path(tmp) / "clip"), device="cpu")
    decode = bench_decode(tiny.image_processor, {**test_set, **photos}, args.repeats)
    model = bench_model(tiny.images, args.tiny_batch, args.repeats)
    report["tiny"] = {"image_size": tiny.images.tower.image_size, "tokens_per_image": tiny.images.tokens_per_image,
                      "decode": decode, "model": model}
    spreads += [model["spread"], *(d["spread"] for d in decode.values())]
    print(f"tiny ({tiny.images.tower.image_size} px): model {model['images_per_s']:.0f} images/s "
          f"(batch {model['batch']}, {model['ms_per_batch']:.1f} ms)")
    for name, d in decode.items():
        print(f"  decode {name} ({d['bytes']} bytes): {d['ms']:.2f} ms")

    if not args.skip_real:
        start = time.perf_counter()
        real, params = real_size_model()
        build_s = time.perf_counter() - start
        processor = ImagePreprocessor(size=real.tower.image_size, patch_size=real.tower.config.patch_size)
        decode = bench_decode(processor, {"jpeg_rgb.jpg": test_set["jpeg_rgb.jpg"], **photos}, args.repeats)
        model = bench_model(real, args.real_batch, args.real_repeats)
        per_image_decode = statistics.mean(d["ms"] for n, d in decode.items() if n.startswith("photo"))
        end_to_end = 1000 / (per_image_decode + model["ms_per_batch"] / model["batch"])
        report["real_size"] = {"image_size": real.tower.image_size, "tokens_per_image": real.tokens_per_image,
                               "parameters": params, "build_s": build_s, "decode": decode, "model": model,
                               "end_to_end_images_per_s_one_thread_photo": end_to_end}
        spreads.append(model["spread"])
        print(f"real size EVA02-L/14 ({params / 1e6:.0f}M parameters, {real.tower.image_size} px, "
              f"{real.tokens_per_image} tokens): model {model['images_per_s']:.3f} images/s "
              f"({model['ms_per_batch'] / model['batch']:.0f} ms per image, batch {model['batch']})")
        for name, d in decode.items():
            print(f"  decode {name} ({d['bytes']} bytes): {d['ms']:.2f} ms")
        print(f"  end to end, photo-sized input: {end_to_end:.3f} images/s")

    from machine import report_quietness

    load = report_quietness(max(spreads), NOISY_SPREAD, "case")
    report.update({
        "worst_repeat_spread": max(spreads),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_end": load},
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_images.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
