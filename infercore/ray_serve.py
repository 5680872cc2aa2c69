"""infercore as a Ray Serve application: each replica is one engine (its models loaded and warmed up
before the replica reports ready) behind the server's own ASGI app, so every HTTP dialect (TEI,
OpenAI, Jina/Cohere rerank, Elasticsearch ``_inference``, the Elastic Inference Service protocol,
``/metrics``) is served through Ray Serve's proxy unchanged. The gRPC front end is not: Ray Serve's
gRPC proxy routes only to servicers registered with it, and the replicas open no ports of their own.

Ray is an optional extra (``pip install 'infercore[ray]'``), never imported by the server itself.

    serve run deploy/ray/serve_config.yaml          # a local or KubeRay cluster
    serve run infercore.ray_serve:build_app serve_flags="--model m=/models/m --device cpu"

``build_app`` takes the same flags as ``infercore serve`` (``--host``, ``--port``, ``--grpc-port``
and the TLS files are Ray's business here and refused). Replica count, autoscaling on ongoing
requests and the CPU/GPU each replica reserves are Ray Serve deployment options, set in the config
file's ``deployments`` section (:func:`deployment_options` gives the defaults). Needs Ray Serve with
late-bound ASGI ingress (``@serve.ingress()`` + ``__serve_build_asgi_app__``): ray[serve] 2.60.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from typing import Any

from ray import serve
from ray.serve import Application

from .server.app import create_app
from .server.cli import build_parser, config_from_args
from .server.config import ServerConfig
from .server.engine import Engine

log = logging.getLogger("infercore.ray_serve")

# Requests one replica takes at once. The engine batches across requests (token budget), so a replica
# wants many in flight; Ray's default of 5 would starve the batcher. Beyond it Ray queues at its
# router, where the autoscaler sees them.
MAX_ONGOING_REQUESTS = 64
# Autoscaling target: requests in progress per replica. Below MAX_ONGOING_REQUESTS so that new
# replicas are asked for while the existing ones still accept work.
TARGET_ONGOING_REQUESTS = 16
# Response header naming the replica that answered (see ReplicaHeader).
REPLICA_HEADER = "x-infercore-replica"
# Flags that describe the process's own listeners; under Ray the proxy owns the ports.
RAY_OWNED_FLAGS = ("--host", "--port", "--grpc-port", "--tls-cert", "--tls-key", "--tls-client-ca")


def server_config(serve_flags: str | list[str]) -> ServerConfig:
    """The engine settings from ``infercore serve`` flags (a string is split like a shell would)."""
    flags = shlex.split(serve_flags) if isinstance(serve_flags, str) else list(serve_flags)
    for flag in flags:
        if flag.split("=", 1)[0] in RAY_OWNED_FLAGS:
            raise ValueError(f"{flag.split('=', 1)[0]} is not used under Ray Serve: its proxy owns the listeners")
    return config_from_args(build_parser().parse_args(["serve", *flags]))


def deployment_options(device: str) -> dict[str, Any]:
    """Ray Serve deployment options for one replica per GPU (``cuda``) or per 2-core CPU slot."""
    resources = {"num_gpus": 1, "num_cpus": 4} if device.startswith("cuda") else {"num_cpus": 2}
    return {
        "ray_actor_options": resources,
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 8,
            "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
            # Add replicas after 30 s above target, remove them after 5 minutes below: a burst
            # that ended does not shrink the deployment at once.
            "upscale_delay_s": 30,
            "downscale_delay_s": 300,
        },
        # Ray stops routing to a replica it removes, then waits for its ongoing requests this long.
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": 60,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }


@serve.deployment(name="infercore")
@serve.ingress()
class InfercoreReplica:
    """One engine per replica; Ray Serve hands each HTTP request to the server's own ASGI app, which
    ``__serve_build_asgi_app__`` builds once the engine is loaded. At the replica's end, Ray stops
    routing to it, waits for its requests in progress (``graceful_shutdown_timeout_s``), then runs the
    app's shutdown, which stops the engine."""

    async def __init__(self, config: ServerConfig):
        self.engine = Engine(config)
        # Off the replica's event loop; Ray routes to the replica only once this returns.
        await asyncio.to_thread(self.engine.load)
        if self.engine.state != "ready":
            raise RuntimeError(f"model loading failed: {self.engine.failure}")
        log.info("replica ready: serving %s", ", ".join(self.engine.models))

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine, load=False)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)
        return app

    async def check_health(self) -> None:
        """Ray's health check: raising restarts the replica (a model that cannot compute)."""
        problem = await self.engine.check_health()
        if problem is not None:
            raise RuntimeError(problem)


class ReplicaHeader:
    """ASGI middleware: every HTTP answer names the replica that computed it (``x-infercore-replica``),
    so an operator (or a test) can see how requests spread and which replica answered a bad one."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_app(args: dict[str, Any]) -> Application:
    """``serve run`` / ``serve deploy`` entry point. ``args``: ``serve_flags`` (the ``infercore serve``
    flags, one string or a list) and optionally ``options`` (Ray Serve deployment options that replace
    the defaults of :func:`deployment_options`; a config file's ``deployments`` section does the same)."""
    config = server_config(args.get("serve_flags", ""))
    options = {**deployment_options(config.device), **args.get("options", {})}
    return InfercoreReplica.options(**options).bind(config)
