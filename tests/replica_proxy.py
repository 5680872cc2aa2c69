"""A small round-robin HTTP reverse proxy over several ``infercore serve`` processes, standing in for
what sits in front of replicas on a cluster (a Service's load balancer, an ingress, a gateway).

It runs on 127.0.0.1 in a background thread (uvicorn + its own event loop) and sends each request
to the next upstream in turn. It re-sends a request to the next upstream only when that upstream
certainly did no work for it:

- the connection was refused (the process is gone or not yet listening);
- the answer was 503 (the server is draining or still loading: it refused the request at admission).

Anything else — another status, a connection that broke after the request was sent, a timeout — is
passed back to the client as it is (502 / 504 for the transport failures), because the upstream may
have computed it. Counters say how many requests each upstream answered and how many attempts were
re-sent and why, so a test can tell "no failure" from "no drain happened".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

START_TIMEOUT_S = 30.0
UPSTREAM_TIMEOUT_S = 120.0
# After every upstream refused a request once, wait this long before the next round (a replica may
# be between its old process and its new one).
ROUND_BACKOFF_S = 0.05
# Headers that describe one connection, not the message (RFC 9110 section 7.6.1), plus the ones the
# proxy recomputes.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "host", "content-length",
}


class RoundRobinProxy:
    """Round-robin over ``upstreams`` (base URLs); ``rounds`` bounds the re-sends of one request to
    ``rounds × len(upstreams)`` attempts."""

    def __init__(self, upstreams: list[str], rounds: int = 20):
        if not upstreams:
            raise ValueError("at least one upstream")
        self.upstreams = list(upstreams)
        self.rounds = rounds
        self._next = 0
        # upstream → requests it answered (any status but a re-sent 503)
        self.answered: collections.Counter[str] = collections.Counter()
        # "refused" / "503" → attempts re-sent to the next upstream
        self.resent: collections.Counter[str] = collections.Counter()
        self._client: httpx.AsyncClient | None = None
        app = Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST", "PUT", "DELETE"])],
                        lifespan=self._lifespan)
        config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="replica-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RoundRobinProxy:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)
        self._socket.close()

    def __enter__(self) -> RoundRobinProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # On the proxy's own loop: keep-alive connections to every upstream, closed at stop.
        async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S, trust_env=False,
                                     limits=httpx.Limits(max_connections=256)) as client:
            self._client = client
            yield

    def _pick(self) -> str:
        upstream = self.upstreams[self._next % len(self.upstreams)]
        self._next += 1
        return upstream

    async def _forward(self, request: Request) -> Response:
        assert self._client is not None
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        last_503: httpx.Response | None = None
        for attempt in range(self.rounds * len(self.upstreams)):
            if attempt and attempt % len(self.upstreams) == 0:
                await asyncio.sleep(ROUND_BACKOFF_S)
            upstream = self._pick()
            try:
                answer = await self._client.request(request.method, upstream + target, content=body, headers=headers)
            except httpx.ConnectError:
                self.resent["refused"] += 1
                continue
            except httpx.TimeoutException:
                return Response(b"upstream timed out", status_code=504)
            except httpx.TransportError as exc:
                return Response(f"upstream connection failed: {type(exc).__name__}".encode(), status_code=502)
            if answer.status_code == 503:
                self.resent["503"] += 1
                last_503 = answer
                continue
            self.answered[upstream] += 1
            return self._relay(answer)
        if last_503 is not None:
            return self._relay(last_503)
        return Response(b"no upstream accepted the connection", status_code=502)

    @staticmethod
    def _relay(answer: httpx.Response) -> Response:
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return Response(answer.content, status_code=answer.status_code, headers=headers)
