"""Server settings, filled from the command line (every flag also reads ``INFERCORE_<FLAG>``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..models.repository import ModelSource

# Per-device default token budget of a batch. On CPU, bigger batches buy nothing (the matmuls are
# already at the cores' peak) and cost page faults for >32 MiB activations: 4096 measured ~1.2x
# faster than 16384 on the 2-core machine (benchmarks/bench_engine_cpu.py --max-batch-tokens).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
# Default admission bound: this many full batches may wait per model and per device it runs on (each
# replica drains the queue as fast, so the wait the bound stands for stays the same). On CPU 8
# batches are about 5 s of work for MiniLM on 2 cores; a deeper queue only makes admitted requests
# wait longer under overload (benchmarks/bench_load.py: p50 24 s with 32) instead of telling clients
# to come back.
QUEUED_BATCHES_DEFAULT = {"cpu": 8, "cuda": 32}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    models: list[ModelSource] = field(default_factory=list)
    models_dir: Path | None = None
    # One device or several: each model is loaded once per device (models/loader.py resolve_devices);
    # auto = every visible GPU, else the CPU.
    device: str = "auto"
    dtype: str = "auto"
    # What computes the models (torch | onnx) and onnx's weights (none | int8); a model's own
    # infercore.json overrides both (models/loader.py resolve_backend).
    backend: str = "torch"
    quantize: str = "none"
    api_key: str | None = None
    # Largest batch the scheduler hands a model, in tokens (padding-free count). None: the device's
    # default. A model's budget is never below its own input limit, so one input always fits.
    max_batch_tokens: int | None = None
    # Optional cap on sequences per batch.
    max_batch_requests: int | None = None
    # Admission bound per model, in queued tokens; None: QUEUED_BATCHES_DEFAULT batches' worth per
    # device the model runs on. Beyond it: 429.
    max_queued_tokens: int | None = None
    # Requests being tokenized, queued or computed at once; beyond it: 429.
    max_concurrent_requests: int = 512
    # Deadline of a request that does not send X-Request-Timeout, in seconds.
    request_timeout_s: float = 60.0
    # After SIGTERM: how long admitted requests may take to finish before the process exits anyway.
    drain_timeout_s: float = 30.0
    # Inputs per request; more gets 413 (Elasticsearch's openai service sends up to 2048).
    max_client_batch_size: int = 2048
    # Lowers every model's own token limit when set.
    max_input_tokens: int | None = None
    # Default for requests that do not say whether to truncate over-long inputs.
    auto_truncate: bool = False
    # Largest request body accepted, in bytes.
    payload_limit_bytes: int = 8 * 1024 * 1024
    tokenization_workers: int = max(1, (os.cpu_count() or 2) - 1)
    # CPU models run data-parallel: this many main executors per model (None: one per core), each
    # with ``cpu_threads`` intra-op threads. On the 2-core machine, two single-threaded workers gave
    # 1.1x the batch throughput of one two-threaded worker when idle and 2.3x next to another busy
    # process (benchmarks/bench_cpu_threads.py).
    cpu_workers: int | None = None
    cpu_threads: int = 1
    log_level: str = "info"
    # gRPC front end (server/grpc_server.py) on --host: off unless a port is given (0: a free port).
    grpc_port: int | None = None
    # Requests of one gRPC stream in progress at once (computing or waiting to be written); the
    # server stops reading the stream beyond it.
    grpc_stream_max_in_flight: int = 32
    # TLS of the gRPC port: certificate chain and key (PEM); with a client CA, clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    def batch_token_budget(self, device_type: str, max_input_tokens: int) -> int:
        return max(self.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS[device_type], max_input_tokens)

    def main_executors(self, device_type: str) -> int:
        if device_type != "cpu":
            return 1
        return self.cpu_workers or os.cpu_count() or 1

    def queued_token_limit(self, device_type: str, batch_token_budget: int, replicas: int = 1) -> int:
        return self.max_queued_tokens or QUEUED_BATCHES_DEFAULT[device_type] * batch_token_budget * replicas
