"""In-process engines for scheduling and fault tests.

- ``RunnerSpy`` replaces a model's ``runner.run``: it records every batch that reaches the model (which
  executor thread ran it, the token ids of each input), can hold chosen executors inside the model
  call until released, and can inject a fault. Holding the executors is what makes queueing
  deterministic: work piles up behind a held batch for exactly as long as the test decides.
- ``InProcessServer`` is a real HTTP server (uvicorn on 127.0.0.1, a kernel-picked port) in a thread,
  serving ``create_app`` over an ``Engine`` the test owns, so HTTP tests can hold the engine too.

Every wait here is bounded; a condition that is never reached fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from infercore.models.packing import PackedBatch
from infercore.models.repository import ModelSource
from infercore.models.tokenizer import TokenizedInput
from infercore.server.app import create_app
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from infercore.server.scheduler import WorkItem

WAIT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.005
HTTP_TIMEOUT_S = 60.0


def make_engine(model_id: str, path: Path, **config) -> Engine:
    """A loaded engine serving one model; one main executor and one tokenizer thread unless told."""
    config.setdefault("cpu_workers", 1)
    config.setdefault("tokenization_workers", 1)
    engine = Engine(ServerConfig(models=[ModelSource(model_id, path)], **config))
    engine.load()
    assert engine.state == "ready"
    return engine


def wait_for(predicate: Callable[[], bool], what: str = "condition", timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Block the calling thread until ``predicate()`` holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:.0f}s")
        time.sleep(POLL_INTERVAL_S)


async def async_wait_for(predicate: Callable[[], bool], what: str = "condition",
                         timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """``wait_for`` for code running on an event loop: yields to the loop while it waits."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:.0f}s")
        await asyncio.sleep(POLL_INTERVAL_S)


def is_search_executor(thread_name: str) -> bool:
    """Executor threads are named ``executor-<model>-<device>/<name>``; the priority one is ``search``."""
    return thread_name.endswith("/search")


def is_main_executor(thread_name: str) -> bool:
    return thread_name.startswith("executor-") and not is_search_executor(thread_name)


def token_ids(engine: Engine, model_id: str, text: str) -> tuple[int, ...]:
    """The ids the model computes for ``text`` (special tokens included, truncated to the limit)."""
    return tuple(engine.models[model_id].model.tokenizer.encode_batch([text], truncate=True)[0].ids)


def text_of_tokens(engine: Engine, model_id: str, n: int, word: str = "word") -> str:
    """A text that tokenizes to exactly ``n`` tokens, special tokens included."""
    special = engine.models[model_id].model.tokenizer.num_special_tokens
    text = " ".join([word] * (n - special))
    assert len(token_ids(engine, model_id, text)) == n, f"{word!r} is not one token"
    return text


def work_items(loop: asyncio.AbstractEventLoop, sizes: Sequence[int], lane: str = "ingest", tag: str = "",
               deadline: float = float("inf")) -> list[WorkItem]:
    """Scheduler work items of ``sizes`` tokens; ``options`` carries ``tag + index`` to check order."""
    return [
        WorkItem(
            tokens=TokenizedInput(ids=list(range(n)), type_ids=[0] * n, truncated=False),
            options=f"{tag}{i}",
            future=loop.create_future(),
            loop=loop,
            enqueued_at=0.0,
            deadline=deadline,
            lane=lane,
        )
        for i, n in enumerate(sizes)
    ]


def batch_names(batch: Sequence[WorkItem] | None) -> list[str]:
    return [item.options for item in batch or ()]


@dataclass(frozen=True)
class ComputedBatch:
    """One call of the model: the executor thread that made it and each input's token ids."""

    executor: str
    inputs: tuple[tuple[int, ...], ...]


class RunnerSpy:
    """Stands in for ``runner.run`` of one model while the ``with`` block lasts.

    ``holds(thread_name)`` picks the executors to hold inside the model call until ``release`` is
    set (none by default; ``holds=is_main_executor`` keeps the search executor free). ``fault(batch,
    options)`` runs before the real model and may raise. Leaving the block releases everything.
    """

    def __init__(self, engine: Engine, model_id: str, holds: Callable[[str], bool] = lambda name: False,
                 fault: Callable[[PackedBatch, Sequence], None] | None = None):
        self.runner = engine.models[model_id].model.runner
        self.original = self.runner.run
        self.holds = holds
        self.fault = fault
        self.release = threading.Event()
        self.batches: list[ComputedBatch] = []
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        """Model calls waiting at the gate right now."""
        with self._lock:
            return self._held

    def computed_inputs(self) -> list[tuple[int, ...]]:
        with self._lock:
            return [ids for batch in self.batches for ids in batch.inputs]

    def batches_of(self, predicate: Callable[[str], bool]) -> list[ComputedBatch]:
        with self._lock:
            return [batch for batch in self.batches if predicate(batch.executor)]

    def __call__(self, batch: PackedBatch, options: Sequence):
        thread = threading.current_thread().name
        flat = batch.input_ids.tolist()
        bounds = batch.cu_seqlens.tolist()
        inputs = tuple(tuple(flat[bounds[i]:bounds[i + 1]]) for i in range(len(options)))
        with self._lock:
            self.batches.append(ComputedBatch(thread, inputs))
        if self.holds(thread) and not self.release.is_set():
            with self._lock:
                self._held += 1
            try:
                if not self.release.wait(timeout=WAIT_TIMEOUT_S * 2):
                    raise RuntimeError("the test never released the held executor")
            finally:
                with self._lock:
                    self._held -= 1
        if self.fault is not None:
            self.fault(batch, options)
        return self.original(batch, options)

    def __enter__(self) -> RunnerSpy:
        self.runner.run = self
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        del self.runner.run


class InProcessServer:
    """uvicorn serving ``create_app(engine)`` on 127.0.0.1 in a background thread.

    The engine stays the caller's: the app neither loads it nor shuts it down (no lifespan).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        app = create_app(engine, load=False)
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        # Bound here, before the thread starts: the port is known and nobody can take it meanwhile.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="in-process-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InProcessServer:
        self._thread.start()
        wait_for(lambda: self._server.started or not self._thread.is_alive(), "in-process server start")
        assert self._server.started, "the in-process server failed to start"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=WAIT_TIMEOUT_S)
        self._socket.close()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S, trust_env=False, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        """One request on its own connection (safe to call from several threads at once)."""
        with self.client() as client:
            return client.post(path, **kwargs)

    def open_raw_request(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> socket.socket:
        """Send a whole HTTP/1.1 POST on a fresh socket and return the socket without reading the answer,
        so the test can close it (a client that goes away) while the request is in progress."""
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)
        return sock


def sample(engine: Engine, name: str, **labels: str) -> float:
    """A metric sample's current value in the engine's registry (0 when it was never set)."""
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def scrape(server: InProcessServer | str, name: str) -> dict[frozenset, float]:
    """Every sample called ``name`` that ``GET /metrics`` exposes: frozenset(labels.items()) → value.

    ``server`` is an ``InProcessServer`` or a base URL.
    """
    url = server if isinstance(server, str) else server.url
    response = httpx.get(url + "/metrics", timeout=HTTP_TIMEOUT_S, trust_env=False)
    assert response.status_code == 200, response.text
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.name == name
    }
