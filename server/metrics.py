"""Prometheus metrics. Labels carry metadata only (route, status, model), never request content."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

# 0.25 ms … ~60 s, ×2 per bucket
DURATION_BUCKETS_S = tuple(0.00025 * 2**i for i in range(18))
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(13))
BATCH_TOKEN_BUCKETS = tuple(2**i for i in range(4, 21))


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ... (Linux /proc)
        ProcessCollector(registry=r)
        # ``model``: the served model that answered ("" when none did, e.g. a request refused before
        # its model was resolved); never a name the client sent, which would be unbounded.
        self.requests = Counter(
            "infercore_requests", "HTTP requests by route, status and model", ["route", "status", "model"],
            registry=r,
        )
        self.request_duration = Histogram(
            "infercore_request_duration_seconds", "HTTP request duration by route", ["route"],
            buckets=DURATION_BUCKETS_S, registry=r,
        )
        self.inputs = Counter("infercore_inputs", "Inputs computed, by model", ["model"], registry=r)
        self.input_tokens = Counter("infercore_input_tokens", "Tokens computed, by model", ["model"], registry=r)
        self.tokenization_duration = Histogram(
            "infercore_tokenization_duration_seconds", "Time to tokenize a request", ["model"],
            buckets=DURATION_BUCKETS_S, registry=r,
        )
        self.queue_duration = Histogram(
            "infercore_queue_duration_seconds", "Time a request's inputs waited for a batch", ["model", "lane"],
            buckets=DURATION_BUCKETS_S, registry=r,
        )
        self.inference_duration = Histogram(
            "infercore_inference_duration_seconds", "Time of the batches that computed a request", ["model"],
            buckets=DURATION_BUCKETS_S, registry=r,
        )
        self.batch_duration = Histogram(
            "infercore_batch_duration_seconds", "Model time per batch", ["model"],
            buckets=DURATION_BUCKETS_S, registry=r,
        )
        self.batch_size = Histogram(
            "infercore_batch_size", "Inputs per batch", ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "infercore_batch_tokens", "Tokens per batch", ["model"], buckets=BATCH_TOKEN_BUCKETS, registry=r
        )

        self.dropped = Counter(
            "infercore_dropped_inputs", "Inputs dropped before computing, by reason (deadline, cancelled)",
            ["model", "reason"], registry=r,
        )
        self.rejected = Counter(
            "infercore_rejected_requests", "Requests refused at admission, by reason (queue_full, concurrency, "
            "draining)", ["reason"], registry=r,
        )
        self.oom_splits = Counter(
            "infercore_oom_batch_splits", "Batches split in halves after running out of device memory", ["model"],
            registry=r,
        )
        # Padded backends (onnx): token positions computed for padding, beside infercore_input_tokens.
        self.padding_tokens = Counter(
            "infercore_padding_tokens", "Padding token positions computed by padded backends, by model", ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "infercore_model_info", "1 per served model: the backend and precision it runs with",
            ["model", "backend", "precision", "device"], registry=r,
        )

    def watch_queues(self, depths: Callable[[], Iterable[tuple[str, str, int, int]]]) -> None:
        """Expose queue depth gauges read at scrape time from ``depths()`` → (model, lane, items, tokens)."""
        self.registry.register(_QueueDepthCollector(depths))

    def observe_request(self, route: str, status: int | str, duration_s: float, model: str) -> None:
        """One request: HTTP ``status`` is the code, gRPC's the status name; ``model`` is the model that
        answered it, "" when none did (an error before the model was resolved, a route without one)."""
        self.requests.labels(route, str(status), model).inc()
        self.request_duration.labels(route).observe(duration_s)

    def observe_padding(self, model: str, tokens: int) -> None:
        self.padding_tokens.labels(model).inc(tokens)

    def set_model_info(self, model: str, backend: str, precision: str, device: str) -> None:
        self.model_info.labels(model, backend, precision, device).set(1)

    def observe_batch(self, model: str, size: int, tokens: int, duration_s: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_tokens.labels(model).observe(tokens)
        self.batch_duration.labels(model).observe(duration_s)

    def observe_inference(
        self, model: str, lane: str, inputs: int, tokens: int, tokenization_s: float, queue_s: float,
        inference_s: float,
    ) -> None:
        self.inputs.labels(model).inc(inputs)
        self.input_tokens.labels(model).inc(tokens)
        self.tokenization_duration.labels(model).observe(tokenization_s)
        self.queue_duration.labels(model, lane).observe(queue_s)
        self.inference_duration.labels(model).observe(inference_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueDepthCollector(Collector):
    def __init__(self, depths: Callable[[], Iterable[tuple[str, str, int, int]]]):
        self._depths = depths

    def collect(self):
        items = GaugeMetricFamily("infercore_queue_items", "Inputs waiting for a batch", labels=["model", "lane"])
        tokens = GaugeMetricFamily("infercore_queue_tokens", "Tokens waiting for a batch", labels=["model", "lane"])
        for model, lane, n_items, n_tokens in self._depths():
            items.add_metric([model, lane], n_items)
            tokens.add_metric([model, lane], n_tokens)
        yield items
        yield tokens
