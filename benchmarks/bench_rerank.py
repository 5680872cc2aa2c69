"""Cross-encoder reranking: infercore's engine against sentence-transformers' CrossEncoder on CPU, one run.

Model: a randomly initialised BERT-base-size ``BertForSequenceClassification`` with one label (hidden
768, 12 layers, 12 heads, FFN 3072, vocabulary 30522; ``--quick``: hidden 256, 4 layers), saved with
``save_pretrained`` as safetensors into a temporary folder next to the real MiniLM WordPiece
tokenizer (``tests.tiny_checkpoints``). Random weights time exactly like trained ones.

Pairs: ``--queries`` queries of 10-20 tokens (``corpus.query_pool``), each with its own ``--docs``
passages of 100-250 words (``corpus.passage_pool``; all distinct while the pool lasts). Every pair
fits the model's 512 tokens, so neither side truncates and both score identical token ids (checked:
token counts per request must match, and the sigmoid scores must agree within 1e-4).

- infercore: ``Engine(ServerConfig(models=[ModelSource("ce", path)], device="cpu"))`` in-process,
  served as a server request is: one ``RerankRequest(query, passages)`` per query, timed from the
  call to the ranked result (tokenization, scheduling, packing, forward, sigmoid, sort). Two modes:
  requests one after another (latency), and ``--in-flight`` requests at a time (throughput).
  Default engine config: one single-threaded main executor per core plus the search executor.
- sentence-transformers: ``CrossEncoder(path, device="cpu").predict(pairs, batch_size=...,
  activation_fn=Sigmoid())``: every query's pairs as one call of batch size ``--docs`` (latency),
  and all pairs in one call at batch sizes 16 and 32 (throughput; the best of the two counts). ST
  sorts pairs by length and pads each batch.

torch's intra-op threads (ST) and the tokenizers' Rayon pool are set to the machine's core count.
Every mode is warmed up, then the modes run in turn ``--repeats`` times (interleaved, so drift hits
all of them); the fastest repeat counts. Ratios are infercore / ST in pairs/s: above 1 infercore is
faster. Tokens/s counts real tokens of the pairs ([CLS] q [SEP] d [SEP], padding excluded).

BERT-base does a few hundred tokens/s on 2 cores, so the default run (5 modes x 2 repeats over
about 74k tokens) takes the better part of an hour there; ``--quick`` takes about a minute.

    python benchmarks/bench_rerank.py [--quick] [--repeats 2] [--queries 20] [--docs 16] [--in-flight 8]

Writes benchmarks/results/bench_rerank.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# BertConfig overrides on top of the tiny variant's shape keys (all of which they replace).
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BERT_QUICK = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
QUICK = {"queries": 8, "repeats": 2}
QUERY_TOKENS = (10, 20)  # without [CLS]/[SEP]
PASSAGE_MAX_WORDS = 250
ST_BATCH_SIZES = (16, 32)
MAX_SCORE_DIFF = 1e-4
NOISY_SPREAD = 1.3  # slowest / fastest repeat of one mode above this: the machine was not quiet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"4-layer hidden-256 model, {QUICK['queries']} queries, {QUICK['repeats']} repeats")
    parser.add_argument("--queries", type=int, default=20, help="queries, one rerank request each")
    parser.add_argument("--docs", type=int, default=16, help="passages per query")
    parser.add_argument("--in-flight", type=int, default=8, help="concurrent engine requests in the throughput mode")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (fastest counts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair draw and of the weights")
    args = parser.parse_args()
    if args.quick:
        args.queries = min(args.queries, QUICK["queries"])
        args.repeats = min(args.repeats, QUICK["repeats"])
    return args


def pick_queries(tokenizer, n: int, rng: random.Random) -> list[str]:
    """n distinct queries whose token count (specials excluded) is within QUERY_TOKENS."""
    import corpus

    pool = list(corpus.query_pool())
    lo, hi = QUERY_TOKENS
    lengths = [len(e.ids) for e in tokenizer.encode_batch(pool, add_special_tokens=False)]
    fitting = [q for q, n_tokens in zip(pool, lengths) if lo <= n_tokens <= hi]
    if len(fitting) < n:
        sys.exit(f"only {len(fitting)} corpus queries have {lo}-{hi} tokens; ask for fewer --queries")
    return rng.sample(fitting, n)


def pick_passages(n: int, rng: random.Random) -> list[str]:
    """n passages of at most PASSAGE_MAX_WORDS words, distinct while the pool lasts."""
    import corpus

    pool = [p for p in corpus.passage_pool() if len(p.split()) <= PASSAGE_MAX_WORDS]
    return rng.sample(pool, n) if n <= len(pool) else pool + rng.choices(pool, k=n - len(pool))


def main() -> int:
    args = parse_args()
    threads = os.cpu_count() or 1
    # Before tokenizers/torch start their pools.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import asyncio

    import numpy as np
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import CrossEncoder
    from tokenizers import Tokenizer

    from infercore.models.repository import ModelSource
    from infercore.server.canonical import RerankRequest
    from infercore.server.config import ServerConfig
    from infercore.server.engine import Engine

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from tests import tiny_checkpoints

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    shape = BERT_QUICK if args.quick else BERT_BASE
    workdir = tempfile.TemporaryDirectory(prefix="bench_rerank_")
    model_path = tiny_checkpoints.build_bert_with_head(
        Path(workdir.name) / "cross-encoder", "BertForSequenceClassification", "bert-tiny", args.seed,
        num_labels=1, **shape,
    )

    st_model = CrossEncoder(str(model_path), device="cpu")
    hf_tokenizer = st_model.tokenizer
    rng = random.Random(args.seed)
    # tokenizer.json ships MiniLM's padding and truncation at 128: count tokens without either.
    plain_tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    plain_tokenizer.no_padding()
    plain_tokenizer.no_truncation()
    queries = pick_queries(plain_tokenizer, args.queries, rng)
    passages = pick_passages(args.queries * args.docs, rng)
    requests = [(q, passages[i * args.docs : (i + 1) * args.docs]) for i, q in enumerate(queries)]
    pairs = [(q, d) for q, docs in requests for d in docs]
    pair_tokens = [len(ids) for ids in hf_tokenizer([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]]
    tokens = sum(pair_tokens)
    params = sum(p.numel() for p in st_model.model.parameters())

    engine = Engine(ServerConfig(models=[ModelSource("ce", model_path)], device="cpu"))
    engine.load()
    handle = engine.models["ce"]
    limit = handle.model.max_input_tokens
    if max(pair_tokens) > min(limit, st_model.max_seq_length):
        sys.exit(f"a pair has {max(pair_tokens)} tokens, more than the model's {limit} (ST: {st_model.max_seq_length})")

    # Batches the engine's executors take: (executor thread, inputs, tokens). _form_batch is looked up
    # on every attempt, so even an executor already waiting inside next_batch is recorded.
    batches: list[tuple[str, int, int]] = []
    form_batch = handle.scheduler._form_batch

    def recording_form_batch(*a, **kw):
        batch = form_batch(*a, **kw)
        if batch:
            name = threading.current_thread().name.removeprefix("executor-ce-")
            batches.append((name, len(batch), sum(item.num_tokens for item in batch)))
        return batch

    handle.scheduler._form_batch = recording_form_batch

    async def engine_rerank(limit_in_flight: int, chosen: list[tuple[str, list[str]]]):
        """All of ``chosen``, at most ``limit_in_flight`` requests awaiting the engine at a time."""
        gate = asyncio.Semaphore(limit_in_flight)
        latencies = [0.0] * len(chosen)

        async def one(i: int, query: str, docs: list[str]):
            async with gate:
                started = time.perf_counter()
                result = await engine.rerank(RerankRequest(query, docs))
                latencies[i] = time.perf_counter() - started
                return result

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i, q, docs) for i, (q, docs) in enumerate(chosen)))
        elapsed = time.perf_counter() - started
        scores = np.zeros(sum(len(docs) for _, docs in chosen))
        offset = 0
        for (_, docs), result in zip(chosen, results):
            for ranked in result.ranked:
                scores[offset + ranked.index] = ranked.score
            offset += len(docs)
        return elapsed, latencies, scores, [r.input_tokens for r in results]

    def st_predict(chosen_pairs: list[tuple[str, str]], batch_size: int) -> np.ndarray:
        return st_model.predict(chosen_pairs, batch_size=batch_size, activation_fn=torch.nn.Sigmoid(),
                                show_progress_bar=False)

    def st_per_request(chosen: list[tuple[str, list[str]]]):
        latencies, scores = [], []
        started = time.perf_counter()
        for query, docs in chosen:
            t0 = time.perf_counter()
            scores.append(st_predict([(query, d) for d in docs], args.docs))
            latencies.append(time.perf_counter() - t0)
        return time.perf_counter() - started, latencies, np.concatenate(scores)

    def st_all(chosen: list[tuple[str, list[str]]], batch_size: int):
        chosen_pairs = [(query, d) for query, docs in chosen for d in docs]
        started = time.perf_counter()
        scores = st_predict(chosen_pairs, batch_size)
        return time.perf_counter() - started, [], scores

    sequential = "infercore, 1 request at a time"
    in_flight = f"infercore, {args.in_flight} requests in flight"
    st_request = f"ST, 1 request at a time (bs {args.docs})"
    st_bulk = {bs: f"ST, all pairs in one call (bs {bs})" for bs in ST_BATCH_SIZES}
    modes = {
        sequential: lambda chosen: asyncio.run(engine_rerank(1, chosen)),
        in_flight: lambda chosen: asyncio.run(engine_rerank(args.in_flight, chosen)),
        st_request: st_per_request,
        **{name: (lambda chosen, bs=bs: st_all(chosen, bs)) for bs, name in st_bulk.items()},
    }

    def check_same_inputs(engine_tokens: list[int]) -> None:
        expected = [sum(pair_tokens[i * args.docs : (i + 1) * args.docs]) for i in range(len(engine_tokens))]
        if engine_tokens != expected:
            sys.exit(f"FAIL: the sides tokenize differently (tokens per request: infercore {engine_tokens}, "
                     f"ST {expected})")

    # Warm-up (not timed): two requests through every mode. A mismatch stops the run here, before the
    # long part: the comparison would mean nothing.
    warm = requests[:2]
    warm_runs = {name: run(warm) for name, run in modes.items()}
    check_same_inputs(warm_runs[sequential][3])
    warm_diff = max(float(np.abs(warm_runs[e][2] - warm_runs[s][2]).max()) for e in (sequential, in_flight)
                    for s in (st_request, *st_bulk.values()))
    if warm_diff > MAX_SCORE_DIFF:
        sys.exit(f"FAIL: infercore and ST scores differ by up to {warm_diff:.2e} on the warm-up requests")

    times: dict[str, list[float]] = {name: [] for name in modes}
    latencies: dict[str, list[list[float]]] = {name: [] for name in modes}
    scores: dict[str, np.ndarray] = {}
    batches_by_mode: dict[str, list[tuple[str, int, int]]] = {}
    # Interleave the modes so drift (thermal, other load) hits all of them alike.
    for _ in range(args.repeats):
        for name, run in modes.items():
            batches.clear()
            elapsed, request_latencies, mode_scores, *engine_tokens = run(requests)
            if engine_tokens:
                check_same_inputs(engine_tokens[0])
            times[name].append(elapsed)
            latencies[name].append(request_latencies)
            scores[name] = mode_scores
            batches_by_mode[name] = list(batches)
    engine.shutdown()
    workdir.cleanup()

    max_diff = max(float(np.abs(scores[e] - scores[s]).max()) for e in (sequential, in_flight)
                   for s in (st_request, *st_bulk.values()))

    sides = {}
    for name in modes:
        best = min(range(args.repeats), key=lambda r: times[name][r])
        side = {
            "times_s": times[name],
            "best_s": times[name][best],
            "pairs_per_s": len(pairs) / times[name][best],
            "tokens_per_s": tokens / times[name][best],
        }
        if latencies[name][best]:
            p50s = [statistics.median(run) for run in latencies[name]]
            side["request_latency_p50_ms"] = 1000 * min(p50s)
            side["request_latency_p50_ms_per_repeat"] = [1000 * p for p in p50s]
        sides[name] = side
    best_bulk = max(st_bulk.values(), key=lambda name: sides[name]["pairs_per_s"])
    throughput_ratio = sides[in_flight]["pairs_per_s"] / sides[best_bulk]["pairs_per_s"]
    latency_ratio = sides[sequential]["pairs_per_s"] / sides[st_request]["pairs_per_s"]

    query_tokens = [len(e.ids) for e in plain_tokenizer.encode_batch(queries, add_special_tokens=False)]
    words = [len(p.split()) for p in passages]
    size = "BERT-quick" if args.quick else "BERT-base"
    print(f"{size} cross-encoder (random weights, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
          f"{params / 1e6:.0f}M parameters) on CPU, threads={threads}, repeats={args.repeats} (fastest counts)")
    print(f"{len(requests)} queries ({min(query_tokens)}-{max(query_tokens)} tokens) x {args.docs} passages "
          f"({min(words)}-{max(words)} words) = {len(pairs)} pairs, {tokens} tokens, "
          f"{tokens / len(pairs):.0f} tokens per pair (mean, max {max(pair_tokens)})")
    print(f"{'mode':<42} {'best s':>7} {'pairs/s':>8} {'tokens/s':>9} {'p50 ms/req':>10}   runs (s)")
    for name, side in sides.items():
        p50 = f"{side['request_latency_p50_ms']:>10.0f}" if "request_latency_p50_ms" in side else f"{'':>10}"
        runs = ", ".join(f"{t:.2f}" for t in side["times_s"])
        print(f"{name:<42} {side['best_s']:>7.2f} {side['pairs_per_s']:>8.1f} {side['tokens_per_s']:>9.0f} "
              f"{p50}   {runs}")
    print(f"ratio infercore/ST, throughput ({args.in_flight} in flight vs {best_bulk}): {throughput_ratio:.2f}x")
    print(f"ratio infercore/ST, one request at a time ({args.docs} pairs each): {latency_ratio:.2f}x")
    for name in (sequential, in_flight):
        taken: dict[str, list[int]] = {}
        for executor, _, n_tokens in batches_by_mode[name]:
            taken.setdefault(executor, []).append(n_tokens)
        summary = ", ".join(f"{e} {len(t)} batches / {sum(t)} tokens" for e, t in sorted(taken.items()))
        print(f"engine batches ({name}, last run): {summary}")
    all_scores = scores[best_bulk]
    status = "ok" if max_diff <= MAX_SCORE_DIFF else f"FAIL (> {MAX_SCORE_DIFF})"
    print(f"max |sigmoid score difference| infercore vs ST: {max_diff:.2e} {status} "
          f"(scores span {all_scores.min():.4f}-{all_scores.max():.4f})")
    from machine import report_quietness

    spread = max(max(side["times_s"]) / min(side["times_s"]) for side in sides.values())
    load = report_quietness(spread, NOISY_SPREAD, "mode")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_rerank.json"
    out.write_text(json.dumps({
        "benchmark": "bench_rerank",
        "model": {"kind": f"random {size} BertForSequenceClassification, num_labels 1", "parameters": params,
                  "vocab_size": 30522, **shape},
        "queries": len(requests),
        "docs_per_query": args.docs,
        "pairs": len(pairs),
        "tokens": tokens,
        "tokens_per_pair_mean": tokens / len(pairs),
        "pair_tokens_max": max(pair_tokens),
        "query_tokens": [min(query_tokens), max(query_tokens)],
        "passage_words": [min(words), max(words)],
        "in_flight": args.in_flight,
        "threads": threads,
        "repeats": args.repeats,
        "seed": args.seed,
        "sides": sides,
        "ratio_infercore_over_st_throughput": throughput_ratio,
        "ratio_infercore_over_st_one_request": latency_ratio,
        "st_best_bulk": best_bulk,
        "max_score_diff": max_diff,
        "engine_batches": {
            name: [{"executor": e, "inputs": n, "tokens": t} for e, n, t in batches_by_mode[name]]
            for name in (sequential, in_flight)
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
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
    return 0 if max_diff <= MAX_SCORE_DIFF else 1


if __name__ == "__main__":
    sys.exit(main())
