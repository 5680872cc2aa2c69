"""Drain under a rolling update, simulated on one host: two ``infercore serve`` processes behind the
round-robin proxy of tests/replica_proxy.py, a client sending bounded load through it, and SIGTERM to
one replica in the middle — what a Deployment's rolling update does to a pod.

The promise: no request fails that the proxy could have re-sent. The draining replica finishes what
it admitted (a request it dropped would reach the client as a 502: the proxy never re-sends after a
broken exchange) and refuses new work with 503, which the proxy re-sends to the other replica; once
it has exited, its port refuses connections, re-sent likewise. The proxy's counters prove the drain
was actually crossed (503s or refusals seen), so a run where the signal came too late cannot pass.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.replica_proxy import RoundRobinProxy
from tests.server_process import start_server

CLIENTS = 4
TEXTS = [f"rolling update {i}: " + "replica " * (8 + i) for i in range(16)]
# Load is bounded in count and time; the test needs far less than either.
MAX_REQUESTS = 2000
LOAD_TIMEOUT_S = 25.0
ANSWERS_BEFORE_SIGNAL = 8  # per replica, so both are in the rotation with work in flight
ANSWERS_AFTER_EXIT = 12
EXIT_TIMEOUT_S = 20.0


def replica_args(model_dir) -> list[str]:
    return ["--model", f"tiny={model_dir}", "--cpu-workers", "1", "--tokenization-workers", "1",
            "--drain-timeout", "20"]


@pytest.mark.slow
def test_sigterm_to_one_of_two_replicas_under_load_fails_no_request(tiny_bert_dir, tmp_path):
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_server, replica_args(tiny_bert_dir), tmp_path, name) for name in ("a", "b")]
        old, other = [f.result() for f in starts]
    results: list[tuple[int, float, bool]] = []  # (status, time answered, vectors equal the reference)
    stop = threading.Event()
    try:
        reference = np.array(httpx.post(old.url + "/embed", json={"inputs": TEXTS}, trust_env=False).json())
        with RoundRobinProxy([old.url, other.url]) as proxy:

            def client() -> None:
                with httpx.Client(base_url=proxy.url, timeout=60.0, trust_env=False) as http:
                    while not stop.is_set() and len(results) < MAX_REQUESTS:
                        response = http.post("/embed", json={"inputs": TEXTS})
                        same = response.status_code == 200 and np.allclose(
                            np.array(response.json()), reference, rtol=0, atol=1e-6)
                        results.append((response.status_code, time.monotonic(), same))

            deadline = time.monotonic() + LOAD_TIMEOUT_S

            def wait(predicate, what: str) -> None:
                while not predicate():
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{what}: not reached within {LOAD_TIMEOUT_S:.0f}s of load")
                    time.sleep(0.01)

            with ThreadPoolExecutor(CLIENTS) as clients:
                futures = [clients.submit(client) for _ in range(CLIENTS)]
                try:
                    wait(lambda: min(proxy.answered[u] for u in (old.url, other.url)) >= ANSWERS_BEFORE_SIGNAL,
                         "both replicas answering")
                    old.proc.send_signal(signal.SIGTERM)
                    exit_code = old.proc.wait(timeout=EXIT_TIMEOUT_S)
                    exited_at = time.monotonic()
                    wait(lambda: sum(t > exited_at for _, t, _ in results) >= ANSWERS_AFTER_EXIT,
                         "answers after the old replica exited")
                finally:
                    stop.set()
                    for f in futures:
                        f.result(timeout=60.0)
            resent = dict(proxy.resent)
            answered = dict(proxy.answered)
    finally:
        stop.set()
        old.stop()
        other.stop()

    failed = [status for status, _, _ in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: statuses {sorted(set(failed))}"
    assert all(same for _, _, same in results), "an answer's vectors differ from the reference"
    assert exit_code == 0, old.log()[-3000:]
    assert not old.killed
    # The drain was crossed: the proxy met the draining or exited replica and re-sent.
    assert resent.get("503", 0) + resent.get("refused", 0) > 0, (resent, answered)
    # Both were in the rotation before the signal; afterwards the other one took all the load.
    assert answered[old.url] >= ANSWERS_BEFORE_SIGNAL
    assert answered[other.url] >= ANSWERS_BEFORE_SIGNAL + ANSWERS_AFTER_EXIT
