"""The same workload over HTTP, gRPC unary and gRPC streaming, against one ``infercore serve`` process.

The server: ``infercore serve --grpc-port P`` with its defaults (starter all-MiniLM-L6-v2 on CPU).
Two workloads (``corpus.py``, deterministic), each closed-loop at a fixed concurrency:

- queries:   one short query per request (the search lane), ``--query-concurrency`` clients;
- passages:  16 corpus passages per request (ingest), ``--passage-concurrency`` clients; passages
  longer than the model's 256 tokens are truncated (``truncate: true``).

Three transports per workload, one after the other in one run:

- http:        ``POST /embed`` (JSON), sent by ``loadgen.py`` (raw asyncio HTTP/1.1, keep-alive);
- grpc-unary:  ``InferenceService/Embed``, one ``grpc.aio`` channel per worker process, concurrent calls;
- grpc-stream: ``InferenceService/EmbedStream``, one bidirectional stream per worker process with the
  clients' share of requests in flight on it.

Every client runs in ``--workers`` spawned processes; neither client parses the vectors (loadgen reads
the body; the gRPC clients read the bytes, the stream's only to tell a response from an error).
Reported per phase: inputs/s, requests/s, p50/p99 latency, mean answer bytes, and each gRPC figure's
ratio to HTTP's in the same run. First the vectors of a few inputs are checked equal over both.

    python benchmarks/bench_grpc.py [--quick]

Writes benchmarks/results/bench_grpc.json (``make bench-grpc``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus
import loadgen
import peers

RESULTS = Path(__file__).resolve().parent / "results"
SERVICE = "/infercore.v1.InferenceService"
PASSAGES_PER_REQUEST = 16
CALL_TIMEOUT_S = 120.0
START_GRACE_S = 30.0
TRANSPORTS = ("http", "grpc-unary", "grpc-stream")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (about a minute in all)")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 20, quick 6)")
    parser.add_argument("--warmup", type=float, help="seconds left out at the start of a phase (default 3, quick 1)")
    parser.add_argument("--query-concurrency", type=int, default=8)
    parser.add_argument("--passage-concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="client processes per phase")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_grpc.json")
    args = parser.parse_args()
    args.duration = args.duration or (6.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:4.2f}] {message}", flush=True)


# ---- the gRPC client, one process per worker --------------------------------------------------

def _grpc_worker(address: str, transport: str, payloads: list[bytes], concurrency: int, duration_s: float,
                 conn) -> None:
    """Closed loop against ``address`` from the common start the parent sends; reports records."""
    try:
        import grpc.aio

        from infercore.proto.v1 import inference_pb2 as pb

        async def main() -> list[tuple]:
            records: list[tuple] = []
            async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as ch:
                await ch.channel_ready()
                conn.send("ready")
                t0 = conn.recv()
                await asyncio.sleep(max(0.0, t0 - time.monotonic()))
                end = t0 + duration_s
                if transport == "grpc-unary":
                    call = ch.unary_unary(f"{SERVICE}/Embed")  # bytes in, bytes out

                    async def client(index: int) -> None:
                        while time.monotonic() < end:
                            payload = payloads[index % len(payloads)]
                            started = time.monotonic()
                            try:
                                answer = await call(payload, timeout=CALL_TIMEOUT_S)
                                records.append((index, started - t0, time.monotonic() - started, 200, "ok",
                                                len(answer)))
                            except grpc.aio.AioRpcError as exc:
                                records.append((index, started - t0, time.monotonic() - started, 0,
                                                exc.code().name, 0))
                            index += concurrency

                    await asyncio.gather(*(client(c) for c in range(concurrency)))
                else:
                    stream = ch.stream_stream(f"{SERVICE}/EmbedStream")(timeout=duration_s + CALL_TIMEOUT_S)
                    window = asyncio.Semaphore(concurrency)
                    sent: collections.deque = collections.deque()

                    async def write() -> None:
                        index = 0
                        while time.monotonic() < end:
                            await window.acquire()
                            sent.append((index, time.monotonic()))
                            await stream.write(payloads[index % len(payloads)])
                            index += 1
                        await stream.done_writing()

                    async def read() -> None:
                        while (answer := await stream.read()) is not grpc.aio.EOF:
                            index, started = sent.popleft()
                            latency = time.monotonic() - started
                            error = pb.EmbedStreamResponse.FromString(answer).WhichOneof("result") == "error"
                            records.append((index, started - t0, latency, 0 if error else 200,
                                            "error" if error else "ok", len(answer)))
                            window.release()

                    await asyncio.gather(write(), read())
            return records

        cpu_before = _cpu_s()
        records = asyncio.run(main())
        conn.send(("done", records, _cpu_s() - cpu_before))
    except Exception as exc:  # reported to the parent, which fails the phase
        conn.send(("failed", f"{type(exc).__name__}: {exc}", 0.0))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_grpc(address: str, transport: str, payloads: list[bytes], concurrency: int, duration_s: float,
             workers: int) -> tuple[list[loadgen.Record], float, list[str]]:
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for w in range(workers):
        share = concurrency // workers + (1 if w < concurrency % workers else 0)
        if share == 0:
            continue
        parent, child = context.Pipe()
        mine = payloads[w::workers] or payloads
        process = context.Process(target=_grpc_worker, args=(address, transport, mine, share, duration_s, child),
                                  daemon=True, name=f"grpc-client-{w}")
        process.start()
        child.close()
        pipes.append(parent)
        processes.append(process)
    records, errors, cpu_s = [], [], 0.0
    try:
        for pipe in pipes:
            if not pipe.poll(START_GRACE_S):
                raise RuntimeError("a gRPC client process did not start")
            pipe.recv()
        t0 = time.monotonic() + 0.2
        for pipe in pipes:
            pipe.send(t0)
        for pipe in pipes:
            if not pipe.poll(duration_s + CALL_TIMEOUT_S + START_GRACE_S):
                errors.append("a gRPC client process did not finish in time")
                continue
            kind, payload, worker_cpu_s = pipe.recv()
            if kind == "failed":
                errors.append(payload)
                continue
            cpu_s += worker_cpu_s
            for tag, start_s, latency_s, status, outcome, size in payload:
                records.append(loadgen.Record("grpc", tag, start_s, latency_s, status, None,
                                              "ok" if outcome == "ok" else outcome, size))
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    records.sort(key=lambda r: r.start_s)
    return records, cpu_s, errors


# ---- phases -------------------------------------------------------------------------------------

def workloads() -> dict[str, list[list[str]]]:
    """name → the inputs of each request (cycled)."""
    passages = corpus.passages(PASSAGES_PER_REQUEST * 64)
    return {
        "queries": [[q] for q in corpus.queries(500)],
        "passages": [passages[i:i + PASSAGES_PER_REQUEST] for i in range(0, len(passages), PASSAGES_PER_REQUEST)],
    }


def run_phase(transport: str, requests: list[list[str]], concurrency: int, args, http_port: int,
              grpc_address: str) -> dict:
    from infercore.proto.v1 import inference_pb2 as pb

    window = (args.warmup, args.duration)
    if transport == "http":
        bodies = tuple(loadgen.json_request("/embed", {"inputs": inputs, "truncate": True}, tag=i)
                       for i, inputs in enumerate(requests))
        stream = loadgen.Stream("http", bodies, concurrency=concurrency)
        result = loadgen.run("127.0.0.1", http_port, [stream], args.duration, timeout_s=CALL_TIMEOUT_S,
                             workers=args.workers)
        records, cpu_s, errors = result.records, result.client_cpu_s, result.errors
    else:
        payloads = [pb.EmbedRequest(inputs=inputs, truncate=True).SerializeToString() for inputs in requests]
        records, cpu_s, errors = run_grpc(grpc_address, transport, payloads, concurrency, args.duration,
                                          args.workers)
    summary = loadgen.summarize(records, window)
    inputs_per_request = len(requests[0])
    answered = [r for r in records if r.status == 200]
    return {
        "transport": transport,
        "concurrency": concurrency,
        "requests_measured": summary["requests"],
        "requests_per_s": summary["ok_per_s"],
        "inputs_per_s": summary["ok_per_s"] * inputs_per_request,
        "p50_ms": _ms(summary["p50_s"]),
        "p99_ms": _ms(summary["p99_s"]),
        "statuses": summary["statuses"],
        "answer_bytes_mean": sum(r.response_bytes for r in answered) / len(answered) if answered else None,
        "client_cpu_s": cpu_s,
        "errors": errors,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def check_vectors(http_port: int, grpc_address: str) -> bool:
    """The same inputs give bit-identical float32 vectors over both transports."""
    import numpy as np

    from infercore.client import Client

    texts = corpus.queries(4) + corpus.passages(2)
    with Client(f"http://127.0.0.1:{http_port}") as http, Client(f"grpc://{grpc_address}") as grpc_client:
        return bool(np.array_equal(http.embed(texts, truncate=True), grpc_client.embed(texts, truncate=True)))


def print_table(results: dict) -> None:
    header = (f"{'workload':<9} {'transport':<12} {'inputs/s':>9} {'x http':>7} {'req/s':>8} {'p50 ms':>8} "
              f"{'x http':>7} {'p99 ms':>8} {'x http':>7} {'bytes/answer':>12} {'n':>5}")
    print(header)
    print("-" * len(header))
    for workload, phases in results.items():
        http = phases["http"]
        for transport in TRANSPORTS:
            p = phases[transport]

            def ratio(key: str, p=p, http=http) -> str:
                return f"{p[key] / http[key]:6.2f}x" if p[key] and http[key] else "     -"

            print(f"{workload:<9} {transport:<12} {p['inputs_per_s']:9.1f} {ratio('inputs_per_s'):>7} "
                  f"{p['requests_per_s']:8.1f} {p['p50_ms'] or 0:8.1f} {ratio('p50_ms'):>7} "
                  f"{p['p99_ms'] or 0:8.1f} {ratio('p99_ms'):>7} {p['answer_bytes_mean'] or 0:12.0f} "
                  f"{p['requests_measured']:5d}")
    print("n: requests started inside the measured window (after the warm-up); with few, p99 is the maximum")


def main() -> int:
    args = parse_args()
    http_port, grpc_port = peers.free_port(), peers.free_port()
    grpc_address = f"127.0.0.1:{grpc_port}"
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; the machine may be shared: "
        "compare the transports within this run only")
    server = peers.infercore_server(http_port, RESULTS / "logs" / "bench_grpc_server.log",
                                    ["--grpc-port", str(grpc_port)])
    results: dict[str, dict] = {}
    with peers.running(server, 600):
        equal = check_vectors(http_port, grpc_address)
        log(f"vectors over HTTP and gRPC bit-identical: {equal}")
        concurrency = {"queries": args.query_concurrency, "passages": args.passage_concurrency}
        for workload, requests in workloads().items():
            results[workload] = {}
            for transport in TRANSPORTS:
                log(f"{workload} over {transport}: {args.duration:.0f}s at concurrency {concurrency[workload]}")
                phase = run_phase(transport, requests, concurrency[workload], args, http_port, grpc_address)
                if phase["errors"]:
                    log(f"  client errors: {phase['errors']}")
                results[workload][transport] = phase
    print()
    print_table(results)
    report = {
        "benchmark": "bench_grpc",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_end": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vectors_bit_identical": equal,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    return 0 if equal and not any(p["errors"] for w in results.values() for p in w.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
