"""Several devices in one process: ``--device`` lists (``resolve_devices``), and an engine that loads a
replica of each model per device, all replicas taking batches from the model's one queue.

There is no GPU here: the parser runs against a pretend CUDA runtime (``torch.cuda`` monkeypatched),
and the engine test builds its two replicas on the CPU under two names of it (``cpu`` and ``cpu:0``:
executors are named after their replica's device, and the real parser refuses a device twice).
"""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest
import torch

from infercore.models.checkpoint import CheckpointError
from infercore.models.devices import DeviceError, resolve_device, resolve_devices, resolve_dtype
from infercore.server import cli
from infercore.server import engine as engine_module
from infercore.server.canonical import EmbedRequest
from infercore.server.dialects.grpc import model_info_message
from tests.engine_harness import make_engine

CUDA = [torch.device("cuda", 0), torch.device("cuda", 1)]
GATE_TIMEOUT_S = 10.0
TEXTS = [f"replica test sentence number {i}" for i in range(12)]


@pytest.fixture
def two_gpus(monkeypatch):
    """A CUDA runtime that reports two devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---- resolve_devices ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", CUDA),
        ("cuda:all", CUDA),
        ("cuda", CUDA[:1]),
        ("cuda:1", CUDA[1:]),
        ("cuda:0,cuda:1", CUDA),
        (" cuda:1 , cuda:0 ", CUDA[::-1]),
        ("cpu", [torch.device("cpu")]),
    ],
)
def test_device_specs_name_the_visible_gpus(two_gpus, spec, expected):
    assert resolve_devices(spec) == expected


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("cuda:0,cuda:0", ["cuda:0", "twice"]),
        ("cuda,cuda:0", ["cuda:0", "twice"]),
        ("cpu,cuda:0", ["cpu", "cannot be combined"]),
        ("cuda:1,cpu", ["cpu", "cannot be combined"]),
        ("cuda:5", ["cuda:5", "only 2 CUDA devices"]),
        ("cuda:0,cuda:2", ["cuda:2", "only 2 CUDA devices"]),
        ("gpu0", ["unknown device", "gpu0"]),
        ("mps", ["'mps'", "not supported"]),
        ("cuda:all,cuda:1", ["cuda:all", "nothing beside it"]),
        ("auto,cuda:1", ["auto", "cannot be combined"]),
        ("cuda:0,,cuda:1", ["empty entry"]),
    ],
)
def test_a_bad_device_spec_is_refused_naming_the_problem(two_gpus, spec, words):
    with pytest.raises(CheckpointError) as refused:
        resolve_devices(spec)
    for word in words:
        assert word in str(refused.value)


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused(no_gpu):
    assert resolve_devices("auto") == [torch.device("cpu")]
    for spec in ("cuda", "cuda:all", "cuda:0,cuda:1"):
        with pytest.raises(CheckpointError, match="no CUDA device is available"):
            resolve_devices(spec)


@pytest.mark.parametrize(
    ("dtype", "device", "words"),
    [
        ("float64", "cpu", ["unknown dtype", "'float64'", "bfloat16"]),
        ("float16", "cpu", ["float16 is not supported on CPU"]),
    ],
)
def test_a_bad_dtype_is_refused_naming_the_problem(dtype, device, words):
    with pytest.raises(DeviceError) as refused:
        resolve_dtype(dtype, torch.device(device), torch.bfloat16)
    for word in words:
        assert word in str(refused.value)


def test_dtype_auto_is_the_family_dtype_on_cuda_and_float32_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu"), torch.bfloat16) == torch.float32


def test_a_single_bad_device_is_a_device_error_that_loaders_report_as_a_checkpoint_error(no_gpu):
    for device, words in (("gpu0", ["unknown device", "gpu0"]), ("cuda", ["no CUDA device is available"])):
        with pytest.raises(DeviceError) as refused:
            resolve_device(device)
        assert isinstance(refused.value, CheckpointError)
        for word in words:
            assert word in str(refused.value)


def test_serve_refuses_a_bad_device_list_before_starting(capsys, monkeypatch, two_gpus, tiny_bert_dir):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # keep the test process's logging
    monkeypatch.setattr("uvicorn.Server.run", lambda self: pytest.fail("serve started a server"))
    capsys.readouterr()
    code = cli.main(["serve", "--port", "0", "--model", f"tiny={tiny_bert_dir}", "--device", "cuda:1,cuda:1"])
    assert code == 2
    assert "cuda:1 twice" in capsys.readouterr().err


# ---- an engine with two replicas ----------------------------------------------------------------


class ReplicaGate:
    """Wraps each replica's ``runner.run``: counts the batches each replica computes, and holds the
    first batch of one replica until the other replica has computed one, so both must take part."""

    def __init__(self, replicas):
        self.batches = {i: 0 for i in range(len(replicas))}
        self._first = None
        self._lock = threading.Lock()
        self._other_ran = threading.Event()
        self._restore = []
        for i, replica in enumerate(replicas):
            original = replica.runner.run
            replica.runner.run = self._wrap(i, original)
            self._restore.append(replica.runner)

    def _wrap(self, index, original):
        def run(batch, options):
            with self._lock:
                self.batches[index] += 1
                if self._first is None:
                    self._first = index
                first = self._first == index
                if not first:
                    self._other_ran.set()
            if first and not self._other_ran.wait(GATE_TIMEOUT_S):
                raise RuntimeError("the other replica never computed a batch")
            return original(batch, options)

        return run

    def close(self) -> None:
        self._other_ran.set()
        for runner in self._restore:
            del runner.run


@pytest.fixture
def two_replica_engine(monkeypatch, tiny_bert_dir):
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "resolve_devices", lambda spec: [torch.device("cpu"), torch.device("cpu:0")])
        # Two CPU "devices" stand in for two GPUs (the CPU is never listed twice: models/devices.py).
        # Executors on every core's threads: no idle executor's cores are lent to a lone CPU batch
        # (server/executor.py), which GPU replicas never do either.
        engine = make_engine("tiny", tiny_bert_dir, cpu_threads=os.cpu_count() or 1)
    yield engine
    engine.shutdown()


def embed_concurrently(engine, texts: list[str]) -> list[np.ndarray]:
    """Every text as its own ingest request, all at once."""

    async def all_at_once():
        requests = [engine.embed(EmbedRequest([text], priority="ingest")) for text in texts]
        return [result.vectors[0] for result in await asyncio.gather(*requests)]

    return asyncio.run(all_at_once())


def test_each_device_gets_its_own_replica_and_executors(two_replica_engine):
    handle = two_replica_engine.models["tiny"]
    assert handle.devices == ["cpu", "cpu:0"]
    first, second = handle.replicas
    assert handle.model is first and first.runner is not second.runner
    # make_engine: one main executor per replica, plus each replica's search executor
    assert sorted(e.name for e in handle.executors) == ["cpu/main0", "cpu/search", "cpu:0/main0", "cpu:0/search"]
    assert {e.name: e.model for e in handle.executors}["cpu:0/search"] is second
    info = two_replica_engine.info().model("tiny")
    assert info.devices == ("cpu", "cpu:0") and info.device == "cpu"
    assert model_info_message(info).device == "cpu,cpu:0"
    budget = handle.scheduler.max_batch_tokens
    assert handle.scheduler.max_queued_tokens == two_replica_engine.config.queued_token_limit("cpu", budget) * 2


def test_replicas_share_the_queue_and_give_the_single_replica_results(two_replica_engine, tiny_bert_dir):
    handle = two_replica_engine.models["tiny"]
    gate = ReplicaGate(handle.replicas)
    try:
        vectors = embed_concurrently(two_replica_engine, TEXTS)
    finally:
        gate.close()
    assert all(gate.batches.values()), gate.batches
    # Both main executors drained the shared queue, each under its own name.
    assert set(handle.scheduler._drain_rates) == {"cpu/main0", "cpu:0/main0"}
    assert asyncio.run(two_replica_engine.check_health()) is None

    single = make_engine("tiny", tiny_bert_dir)
    try:
        assert single.models["tiny"].devices == ["cpu"]
        expected = embed_concurrently(single, TEXTS)
    finally:
        single.shutdown()
    np.testing.assert_allclose(np.array(vectors), np.array(expected), rtol=1e-5, atol=1e-6)


def test_a_broken_replica_is_probed_on_its_own_device(two_replica_engine):
    """/health must not be answered for a broken replica by its healthy sibling: the probe runs on
    the replica whose executors failed, and only its own success clears them."""
    handle = two_replica_engine.models["tiny"]
    first, second = handle.replicas
    calls = {"first": 0, "second": 0}
    original_first, original_second = first.runner.run, second.runner.run

    def first_run(batch, options):
        calls["first"] += 1
        return original_first(batch, options)

    def broken(batch, options):
        calls["second"] += 1
        raise RuntimeError("device lost")

    first.runner.run, second.runner.run = first_run, broken
    try:
        for executor in handle.executors:
            executor.healthy = executor.model is first  # the second replica's last batch failed
        reason = asyncio.run(two_replica_engine.check_health())
        assert reason == "model 'tiny' cannot compute a forward pass on cpu:0"
        assert calls == {"first": 0, "second": 1}  # probed where it failed, not through the queue
        assert not any(e.healthy for e in handle.executors if e.model is second)

        second.runner.run = original_second  # the fault is gone
        assert asyncio.run(two_replica_engine.check_health()) is None
        assert all(e.healthy for e in handle.executors)
    finally:
        del first.runner.run
        if "run" in vars(second.runner):
            del second.runner.run
