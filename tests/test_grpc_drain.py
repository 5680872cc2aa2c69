"""SIGTERM on a real ``infercore serve --grpc-port`` process: gRPC health turns NOT_SERVING at once,
new calls get UNAVAILABLE, a call admitted before the signal is answered in full, and the process
exits 0. The admitted call is made long (thousands of maximum-length inputs on one single-threaded
worker) and is proven still running when the drain is observed."""

from __future__ import annotations

import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infercore.proto.v1 import inference_pb2 as pb
from infercore.proto.v1 import inference_pb2_grpc as pb_grpc
from tests.engine_harness import scrape
from tests.server_process import free_port, start_server
from tests.test_drain import drain_server_args

LONG_INPUTS = 2048
TEXT = "lantern " * 200  # cut to the tiny model's 128 tokens (--auto-truncate)
EXIT_TIMEOUT_S = 120.0
SIGNAL_EFFECT_TIMEOUT_S = 15.0
SERVICE = "infercore.v1.InferenceService"


def poll(predicate, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:.0f}s")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_turns_grpc_health_not_serving_finishes_admitted_calls_and_exits_0(tiny_bert_dir, tmp_path):
    grpc_port = free_port()
    server = start_server([*drain_server_args(tiny_bert_dir), "--grpc-port", str(grpc_port)], tmp_path, "grpc-drain")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        stub = pb_grpc.InferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status

        poll(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "SERVING", 30.0)
        reference = stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=60).embeddings

        long_call = stub.Embed.future(pb.EmbedRequest(inputs=[TEXT] * LONG_INPUTS), timeout=300)
        poll(lambda: _queued_inputs(server.url) > 0 or long_call.done(), "long call queued", 60.0)
        assert not long_call.done(), "the long call ended before the signal"

        server.proc.send_signal(signal.SIGTERM)
        poll(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING after SIGTERM",
             SIGNAL_EFFECT_TIMEOUT_S)
        still_running = not long_call.done()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(inputs=["new work"]), timeout=10)

        answer = long_call.result(timeout=EXIT_TIMEOUT_S)
        exit_code = server.proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        channel.close()
        server.stop()

    assert still_running, "the drain was observed only after the admitted call had finished"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()
    assert answer.embeddings.count == LONG_INPUTS
    vectors = np.frombuffer(answer.embeddings.data, "<f4").reshape(LONG_INPUTS, -1)
    expected = np.frombuffer(reference.data, "<f4")
    np.testing.assert_allclose(vectors, np.broadcast_to(expected, vectors.shape), rtol=0, atol=1e-6)
    assert exit_code == 0, server.log()[-3000:]
    assert not server.killed


def _queued_inputs(url: str) -> float:
    return sum(scrape(url, "infercore_queue_items").values())
