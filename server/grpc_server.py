"""The gRPC front end: a ``grpc.aio`` server on the HTTP server's event loop and engine.

Serves ``infercore.v1.InferenceService`` (the gRPC dialect, server/dialects/grpc.py), the Open Inference
Protocol's ``inference.GRPCInferenceService`` (server/dialects/oip.py), the standard ``grpc.health.v1``
health service and server reflection (``grpc.reflection.v1alpha`` and ``v1``, server/grpc_reflection_v1.py),
on ``--host``:``--grpc-port``, with TLS or mutual TLS when
``--tls-cert``/``--tls-key`` (and ``--tls-client-ca``) are given.

Health: ``""`` (the whole server) and ``infercore.v1.InferenceService`` are NOT_SERVING while models
load, SERVING once the engine is ready and ``Engine.check_health`` finds every model able to compute,
and NOT_SERVING for good from the moment a drain begins (the state is read every
``STATE_POLL_S``). Health and reflection need no API key, as HTTP's ``/health`` needs none: load
balancers probe without credentials, and the schema is public (proto/).

Lifecycle (server/app.py's lifespan): ``start()`` when the app starts; on SIGTERM the engine drains
(new requests UNAVAILABLE, admitted ones finish), then ``stop()`` ends what is left (idle streams,
health watches) after a short grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..proto.v1 import inference_pb2_grpc as pb_grpc
from .config import ServerConfig
from .dialects import oip
from .dialects.grpc import SERVICE_NAME, InferenceService
from .engine import Engine
from .grpc_limits import BoundedRequests
from .grpc_reflection_v1 import enable_reflection

log = logging.getLogger("infercore.grpc")

# How often the health watcher reads the engine's state, and how often it runs the engine's
# health check (which probes a model whose last batch failed) while the server is ready.
STATE_POLL_S = 0.05
HEALTH_CHECK_INTERVAL_S = 1.0
HEALTH_SERVICES = ("", SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_credentials(cert: bytes, key: bytes, client_ca: bytes | None) -> grpc.ServerCredentials:
    """TLS with ``cert``/``key``; with ``client_ca``, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class GrpcServer:
    """One ``grpc.aio`` server over ``engine``. Settings (host, grpc_port, TLS files, api_key,
    grpc_stream_max_in_flight, payload_limit_bytes) come from ``config``, by default the engine's.
    Create and use it on the event loop that serves the engine's requests."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None):
        self.engine = engine
        self.config = config = config or engine.config
        if config.grpc_port is None:
            raise ValueError("the gRPC server needs a port (--grpc-port)")
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", config.payload_limit_bytes),
            ("grpc.max_send_message_length", -1),
            # A port already taken must fail the start, not be shared with another process.
            ("grpc.so_reuseport", 0),
        ], interceptors=[BoundedRequests(config.json_max_elements, (SERVICE_NAME, oip.GRPC_SERVICE_NAME))])
        pb_grpc.add_InferenceServiceServicer_to_server(
            InferenceService(engine, config.grpc_stream_max_in_flight, config.api_key), self.server
        )
        oip.pb_grpc.add_GRPCInferenceServiceServicer_to_server(oip.OpenInferenceService(engine, config.api_key),
                                                               self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # v1alpha and v1; the reflection services add themselves.
        enable_reflection((SERVICE_NAME, oip.GRPC_SERVICE_NAME, health.SERVICE_NAME), self.server)
        self._watcher: asyncio.Task | None = None

    @property
    def tls(self) -> bool:
        return self.config.tls_cert is not None

    async def start(self) -> int:
        """Bind, start serving and watching health; returns the bound port."""
        config = self.config
        address = f"{config.host}:{config.grpc_port}"
        try:
            if self.tls:
                credentials = server_credentials(
                    config.tls_cert.read_bytes(), config.tls_key.read_bytes(),
                    config.tls_client_ca.read_bytes() if config.tls_client_ca else None,
                )
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:  # grpcio raises, or with older versions answers 0
            raise RuntimeError(f"gRPC: cannot listen on {address} (--grpc-port): the port is taken or not allowed")
        for service in HEALTH_SERVICES:
            await self.health.set(service, NOT_SERVING)
        await self.server.start()
        self._watcher = asyncio.ensure_future(self._watch_health())
        security = "mutual TLS" if config.tls_client_ca else "TLS" if self.tls else "plaintext"
        log.info("gRPC (%s) on %s:%d", security, config.host, self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then stop: RPCs still running get ``grace_s`` to finish before they are cancelled."""
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.server.stop(grace_s)

    async def _watch_health(self) -> None:
        serving = False
        published = None
        last_check = float("-inf")
        while True:
            state = self.engine.state
            if state in ("draining", "stopped"):
                # Permanent: later set() calls are ignored.
                await self.health.enter_graceful_shutdown()
                return
            if state != "ready":
                serving = False
            elif time.monotonic() - last_check >= HEALTH_CHECK_INTERVAL_S:
                last_check = time.monotonic()
                serving = await self.engine.check_health() is None
            if serving != published:
                status = SERVING if serving else NOT_SERVING
                for service in HEALTH_SERVICES:
                    await self.health.set(service, status)
                published = serving
            await asyncio.sleep(STATE_POLL_S)
