"""An HTTP/1.1 load generator that is not the bottleneck: several processes, raw asyncio streams.

Python HTTP clients such as httpx top out near 270 requests/s on a 2-core machine, which is below
what an embedding server answers for short queries. This client spends its CPU on little more than
writing pre-encoded request bytes and reading status lines: each worker process runs an asyncio
event loop (uvloop when installed) with keep-alive connections on plain ``asyncio`` streams.
``python benchmarks/loadgen.py --self-test`` measures its ceiling, and the CPU it spends per request,
against a trivial server; the same client implemented with ``http.client`` in threads is measured
beside it for comparison (it costs more CPU per request).

Two modes, mixed freely in one run (one ``Stream`` each, all sharing the same clock):

- closed loop: ``concurrency`` clients, each sends its next request when the previous one was
  answered (throughput at a given concurrency);
- open loop: requests arrive at ``rate_per_s`` whatever the server does (overload); latency counts
  from the scheduled arrival, so a slow server cannot hide its queue (no coordinated omission).
  At most ``concurrency`` requests of the stream are in flight; arrivals beyond it are counted as
  ``skipped`` (the client's limit, reported, never silent).

Every request is recorded: stream, the caller's tag (e.g. an index into a table of token counts),
scheduled start, latency, status, ``Retry-After``, outcome (``ok`` = an HTTP answer of any status,
``timeout``, ``error`` = connection failure, ``skipped``). Runs are bounded in time (``duration_s``,
then at most ``timeout_s`` for the answers still due) and optionally in count (``max_requests``).
Only loopback addresses are allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Time given to the worker processes to start, connect and wait for the common start.
_START_GRACE_S = 20.0


@dataclass(frozen=True)
class HttpRequest:
    """One request, encoded once before the run; ``tag`` is carried into its record."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    tag: int = 0

    def encode(self, host: str, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{port}"]
        if self.body or self.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(self.body)}")
            lines.append("Content-Type: application/json")
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def json_request(path: str, body: object, headers: dict[str, str] | None = None, tag: int = 0) -> HttpRequest:
    return HttpRequest("POST", path, json.dumps(body).encode(), tuple((headers or {}).items()), tag)


@dataclass(frozen=True)
class Stream:
    """A sequence of requests sent closed-loop (``rate_per_s`` None) or open-loop at a fixed rate.

    Closed loop: client ``c`` of ``concurrency`` sends requests ``c, c + concurrency, ...`` of the
    (cycled) list. Open loop: arrival ``k`` is request ``k`` of the cycled list, at ``k / rate``.
    """

    name: str
    requests: tuple[HttpRequest, ...]
    concurrency: int = 1
    rate_per_s: float | None = None
    max_requests: int | None = None
    start_s: float = 0.0  # offset from the common start
    duration_s: float | None = None  # None: the run's duration

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"stream {self.name!r} has no requests")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")


@dataclass(frozen=True)
class Record:
    stream: str
    tag: int
    start_s: float  # scheduled start, seconds after the common start
    latency_s: float
    status: int  # 0 when there was no answer
    retry_after: str | None
    outcome: str  # ok | timeout | error | skipped
    response_bytes: int = 0

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_s


@dataclass
class LoadResult:
    records: list[Record]
    duration_s: float  # the send window
    wall_s: float  # until the last answer
    client_cpu_s: float  # user + system CPU of all worker processes during the run
    workers: int
    errors: list[str] = field(default_factory=list)

    def of(self, stream: str) -> list[Record]:
        return [r for r in self.records if r.stream == stream]

    @property
    def client_cpu_cores(self) -> float:
        return self.client_cpu_s / self.wall_s if self.wall_s else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def window_share(record: Record, window: tuple[float, float]) -> float:
    """The fraction of ``record``'s time in flight that falls inside ``window``.

    Summed over the answered requests of a closed-loop run, this counts the work done inside the
    window without rounding to whole requests: with a few long requests per window (16 passages
    take most of a second on a CPU), counting completions alone would swing by a whole request.
    """
    lo, hi = window
    if record.latency_s <= 0:
        return 1.0 if lo <= record.start_s < hi else 0.0
    overlap = min(hi, record.end_s) - max(lo, record.start_s)
    return max(0.0, overlap) / record.latency_s


def summarize(records: Sequence[Record], window: tuple[float, float] | None = None) -> dict:
    """Counts, answered-200 throughput and latency percentiles of ``records``.

    With ``window`` (start, end) in seconds after the common start, latency covers the requests
    that started inside it, and throughput is the 200 answers' work inside it (``window_share``),
    so a closed-loop run's warm-up and tail stay out of the numbers. ``ok_shares`` pairs each 200
    answer's tag with its share, for callers that weigh requests (by tokens, say).
    """
    if window is not None:
        lo, hi = window
        started = [r for r in records if lo <= r.start_s < hi]
        ok_shares = [(r.tag, window_share(r, window)) for r in records if r.status == 200]
        span = hi - lo
    else:
        started = list(records)
        ok_shares = [(r.tag, 1.0) for r in records if r.status == 200]
        span = max((r.end_s for r in records), default=0.0) - min((r.start_s for r in records), default=0.0)
    ok_shares = [(tag, share) for tag, share in ok_shares if share > 0]
    ok_latencies = [r.latency_s for r in started if r.status == 200]
    statuses: dict[str, int] = {}
    for r in started:
        key = str(r.status) if r.outcome == "ok" else r.outcome
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(started),
        "statuses": dict(sorted(statuses.items())),
        "ok_per_s": sum(share for _, share in ok_shares) / span if span > 0 else 0.0,
        "ok_shares": ok_shares,
        "p50_s": percentile(ok_latencies, 50),
        "p90_s": percentile(ok_latencies, 90),
        "p99_s": percentile(ok_latencies, 99),
        "max_s": max(ok_latencies, default=None),
        "mean_s": statistics.fmean(ok_latencies) if ok_latencies else None,
    }


# ---- the client, one process per worker --------------------------------------------------------


class _Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.used = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, payload: bytes) -> tuple[int, str | None, int]:
        """Send one request, read one response: (status, Retry-After, body bytes)."""
        if self.writer is None:
            await self.open()
        reused = self.used
        self.used = True
        try:
            self.writer.write(payload)
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
            # A keep-alive connection the server closed while idle: once more on a fresh one.
            self.close()
            await self.open()
            self.used = True
            self.writer.write(payload)
            head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            size = int(headers["content-length"])
            await self.reader.readexactly(size)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            size = await self._read_chunked()
        else:  # the body runs until the server closes the connection
            size = len(await self.reader.read())
            self.close()
            return status, headers.get("retry-after"), size
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers.get("retry-after"), size

    async def _read_chunked(self) -> int:
        size = 0
        while True:
            chunk_size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if chunk_size == 0:
                await self.reader.readuntil(b"\r\n")
                return size
            await self.reader.readexactly(chunk_size + 2)
            size += chunk_size


@dataclass(frozen=True)
class _WorkerPlan:
    host: str
    port: int
    streams: tuple[Stream, ...]
    index: int
    workers: int
    duration_s: float
    timeout_s: float


async def _timed_exchange(conn: _Connection, payload: bytes, timeout_s: float):
    try:
        status, retry_after, size = await asyncio.wait_for(conn.exchange(payload), timeout_s)
        return status, retry_after, size, "ok"
    except asyncio.TimeoutError:
        conn.close()
        return 0, None, 0, "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
        conn.close()
        return 0, None, 0, "error"


async def _closed_client(plan: _WorkerPlan, stream: Stream, client: int, t0: float, out: list, budget: list) -> None:
    conn = _Connection(plan.host, plan.port)
    with contextlib.suppress(OSError):
        await conn.open()  # before the clock starts
    payloads = [r.encode(plan.host, plan.port) for r in stream.requests]
    n = len(payloads)
    end = t0 + stream.start_s + (stream.duration_s or plan.duration_s)
    await asyncio.sleep(max(0.0, t0 + stream.start_s - time.monotonic()))
    k = client
    while time.monotonic() < end and budget[0] > 0:
        budget[0] -= 1
        request = stream.requests[k % n]
        started = time.monotonic()
        status, retry_after, size, outcome = await _timed_exchange(conn, payloads[k % n], plan.timeout_s)
        latency = time.monotonic() - started
        out.append((stream.name, request.tag, started - t0, latency, status, retry_after, outcome, size))
        if outcome == "error":
            await asyncio.sleep(0.05)  # the server refused the connection: do not spin
        k += stream.concurrency
    conn.close()


async def _open_stream(plan: _WorkerPlan, stream: Stream, t0: float, out: list) -> None:
    """This worker's share of an open-loop stream: arrivals k with k % workers == index."""
    payloads = [r.encode(plan.host, plan.port) for r in stream.requests]
    n = len(payloads)
    rate = stream.rate_per_s
    window = stream.duration_s or plan.duration_s
    total = int(window * rate)
    if stream.max_requests is not None:
        total = min(total, stream.max_requests)
    cap = max(1, stream.concurrency // plan.workers + (plan.index < stream.concurrency % plan.workers))
    idle: list[_Connection] = []
    in_flight = 0
    tasks = set()

    async def send(k: int, scheduled: float) -> None:
        nonlocal in_flight
        conn = idle.pop() if idle else _Connection(plan.host, plan.port)
        status, retry_after, size, outcome = await _timed_exchange(conn, payloads[k % n], plan.timeout_s)
        latency = time.monotonic() - scheduled
        out.append((stream.name, stream.requests[k % n].tag, scheduled - t0, latency, status, retry_after,
                    outcome, size))
        in_flight -= 1
        if conn.writer is not None:
            idle.append(conn)

    for k in range(plan.index, total, plan.workers):
        scheduled = t0 + stream.start_s + k / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= cap:
            out.append((stream.name, stream.requests[k % n].tag, scheduled - t0, 0.0, 0, None, "skipped", 0))
            continue
        in_flight += 1
        task = asyncio.ensure_future(send(k, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    for conn in idle:
        conn.close()


async def _worker_main(plan: _WorkerPlan, t0: float) -> list:
    out: list = []
    coroutines = []
    for stream in plan.streams:
        if stream.rate_per_s is not None:
            coroutines.append(_open_stream(plan, stream, t0, out))
            continue
        budget = [stream.max_requests if stream.max_requests is not None else 1 << 62]
        for client in range(plan.index, stream.concurrency, plan.workers):
            coroutines.append(_closed_client(plan, stream, client, t0, out, budget))
    await asyncio.gather(*coroutines)
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_entry(plan: _WorkerPlan, conn, client: str) -> None:
    try:
        with contextlib.suppress(ImportError):
            if client == "asyncio":
                import uvloop

                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        conn.send("ready")
        t0 = conn.recv()
        cpu_before = _cpu_s()
        if client == "threads":
            records = _thread_worker_main(plan, t0)
        else:
            records = asyncio.run(_worker_main(plan, t0))
        conn.send(("done", records, _cpu_s() - cpu_before))
    except Exception as exc:  # report, never hang the parent
        conn.send(("failed", f"{type(exc).__name__}: {exc}", 0.0))
    finally:
        conn.close()


# ---- the same client on http.client in threads (closed loop only), for the ceiling comparison --


def _thread_worker_main(plan: _WorkerPlan, t0: float) -> list:
    out: list = []
    lock = threading.Lock()

    def client_loop(stream: Stream, client: int) -> None:
        conn = http.client.HTTPConnection(plan.host, plan.port, timeout=plan.timeout_s)
        n = len(stream.requests)
        end = t0 + stream.start_s + (stream.duration_s or plan.duration_s)
        time.sleep(max(0.0, t0 + stream.start_s - time.monotonic()))
        k = client
        local = []
        while time.monotonic() < end:
            request = stream.requests[k % n]
            started = time.monotonic()
            try:
                conn.request(request.method, request.path, body=request.body or None,
                             headers={"Content-Type": "application/json", **dict(request.headers)})
                response = conn.getresponse()
                size = len(response.read())
                local.append((stream.name, request.tag, started - t0, time.monotonic() - started, response.status,
                              response.getheader("retry-after"), "ok", size))
            except TimeoutError:
                conn.close()
                local.append((stream.name, request.tag, started - t0, time.monotonic() - started, 0, None,
                              "timeout", 0))
            except OSError:
                conn.close()
                local.append((stream.name, request.tag, started - t0, time.monotonic() - started, 0, None,
                              "error", 0))
            k += stream.concurrency
        conn.close()
        with lock:
            out.extend(local)

    threads = [
        threading.Thread(target=client_loop, args=(stream, client))
        for stream in plan.streams
        for client in range(plan.index, stream.concurrency, plan.workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


# ---- the parent ---------------------------------------------------------------------------------


def run(
    host: str,
    port: int,
    streams: Sequence[Stream],
    duration_s: float,
    timeout_s: float = 60.0,
    workers: int = 2,
    client: str = "asyncio",
) -> LoadResult:
    """Run ``streams`` against ``host:port`` for ``duration_s`` from a common start.

    Blocks until every worker reported, at most ``duration_s + timeout_s`` plus start-up grace.
    """
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only talks to loopback addresses, not {host!r}")
    if client not in ("asyncio", "threads"):
        raise ValueError(f"unknown client {client!r}")
    if client == "threads" and any(s.rate_per_s is not None for s in streams):
        raise ValueError("the thread client runs closed-loop streams only")
    # spawn: workers start clean (no torch, no inherited threads) whatever the parent imported.
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for index in range(workers):
        parent_end, child_end = context.Pipe()
        plan = _WorkerPlan(host, port, tuple(streams), index, workers, duration_s, timeout_s)
        process = context.Process(target=_worker_entry, args=(plan, child_end, client), daemon=True,
                                  name=f"loadgen-{index}")
        process.start()
        child_end.close()
        pipes.append(parent_end)
        processes.append(process)
    records: list[Record] = []
    errors: list[str] = []
    cpu_s = 0.0
    try:
        for pipe in pipes:
            if not pipe.poll(_START_GRACE_S):
                raise RuntimeError("a load generator worker did not start")
            pipe.recv()
        t0 = time.monotonic() + 0.2  # every worker has its connections open by then
        for pipe in pipes:
            pipe.send(t0)
        last_stream_end = max(s.start_s + (s.duration_s or duration_s) for s in streams)
        hard_deadline = t0 + last_stream_end + timeout_s + _START_GRACE_S
        for pipe in pipes:
            if not pipe.poll(max(0.0, hard_deadline - time.monotonic())):
                errors.append("a load generator worker did not finish in time")
                continue
            kind, payload, worker_cpu_s = pipe.recv()
            if kind == "failed":
                errors.append(payload)
                continue
            records.extend(Record(*row) for row in payload)
            cpu_s += worker_cpu_s
        wall_s = time.monotonic() - t0
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    records.sort(key=lambda r: r.start_s)
    return LoadResult(records, last_stream_end, wall_s, cpu_s, workers, errors)


def measure_ceiling(
    host: str, port: int, path: str = "/health", duration_s: float = 5.0, concurrency: int = 64,
    workers: int = 2, client: str = "asyncio",
) -> dict:
    """Closed-loop GETs of a trivial route: requests/s and the client's CPU per request."""
    stream = Stream("ceiling", (HttpRequest("GET", path),), concurrency=concurrency)
    result = run(host, port, [stream], duration_s, timeout_s=10.0, workers=workers, client=client)
    summary = summarize(result.records, (0.5, duration_s))
    answered = sum(r.outcome == "ok" for r in result.records)
    return {
        "client": client,
        "path": path,
        "concurrency": concurrency,
        "workers": workers,
        "requests_per_s": summary["ok_per_s"],
        "statuses": summary["statuses"],
        "p50_ms": (summary["p50_s"] or 0) * 1e3,
        "client_cpu_us_per_request": result.client_cpu_s / answered * 1e6 if answered else None,
        "client_cpu_cores": result.client_cpu_cores,
        "errors": result.errors,
    }


# ---- self-test: a trivial server and both clients ---------------------------------------------


def _trivial_server(port_pipe) -> None:
    """Answers every request with 200 and a 15-byte JSON body, keep-alive, one asyncio loop."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                writer.write(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_pipe.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def self_test(duration_s: float, concurrency: int, workers: int) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    server = context.Process(target=_trivial_server, args=(child_end,), daemon=True, name="trivial-server")
    server.start()
    try:
        port = parent_end.recv()
        return [
            measure_ceiling("127.0.0.1", port, "/", duration_s, concurrency, workers, client)
            for client in ("asyncio", "threads")
        ]
    finally:
        server.kill()
        server.join(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description="closed-loop GET load against a loopback URL, or --self-test")
    parser.add_argument("--self-test", action="store_true", help="ceiling against a trivial built-in server")
    parser.add_argument("--port", type=int, help="GET http://127.0.0.1:PORT/PATH closed-loop")
    parser.add_argument("--path", default="/health")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--client", choices=["asyncio", "threads"], default="asyncio")
    args = parser.parse_args()
    if args.self_test:
        rows = self_test(args.duration, args.concurrency, args.workers)
    elif args.port:
        rows = [measure_ceiling("127.0.0.1", args.port, args.path, args.duration, args.concurrency, args.workers,
                                args.client)]
    else:
        parser.error("give --port or --self-test")
    print(f"{'client':<8} {'req/s':>8} {'p50 ms':>7} {'client CPU us/req':>18} {'client cores':>13}  statuses")
    for row in rows:
        cpu = row["client_cpu_us_per_request"]
        print(f"{row['client']:<8} {row['requests_per_s']:>8.0f} {row['p50_ms']:>7.2f} "
              f"{cpu if cpu is not None else float('nan'):>18.1f} {row['client_cpu_cores']:>13.2f}  "
              f"{row['statuses']} {' '.join(row['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
