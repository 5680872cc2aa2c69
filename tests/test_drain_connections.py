"""SIGTERM on a real ``infercore serve`` process under new-connection-per-request load: every
connection the server accepted gets an HTTP response (never a TCP reset, never a silent close), the
listening socket is closed before the process exits (late clients are refused, not accepted and
dropped), and the process exits 0.

Each client thread opens a fresh connection per request, as Elasticsearch's pooled-but-short-lived
clients and health checkers do, and classifies what happened to it from the client's side:

- ``refused``: the connection was never established (the server had stopped listening);
- ``answered``: a complete HTTP response came back (any status; 503 while draining);
- ``reset``: established, then reset (``ECONNRESET`` / ``EPIPE``) with no response;
- ``unanswered``: established, then closed by the server before a complete response.

The last two are what a drain must never produce. A keep-alive client sees ``Connection: close`` on
its first response of the drain. A long request admitted before the signal keeps
the drain going for a while, so connections arrive during the drain as well as at its very end.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.engine_harness import scrape
from tests.server_process import start_server
from tests.test_drain import drain_server_args

CLIENT_THREADS = 8
LONG_INPUTS = 256
TEXT = "lantern " * 200  # cut to the tiny model's 128 tokens (--auto-truncate)
LOAD_BEFORE_SIGNAL_S = 1.0
LOAD_AFTER_EXIT_S = 1.0
LOAD_DEADLINE_S = 60.0
SOCKET_TIMEOUT_S = 10.0
REFUSED_PAUSE_S = 0.01
EXIT_TIMEOUT_S = 60.0


def one_request(port: int, body: bytes) -> tuple[str, int | None]:
    """One POST /embed on a new connection: (outcome, HTTP status or None)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
    except (ConnectionRefusedError, TimeoutError, OSError):
        return "refused", None
    request = (
        f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("ascii") + body
    received = b""
    try:
        with sock:
            sock.sendall(request)
            while not _complete(received):
                chunk = sock.recv(65536)
                if not chunk:
                    return "unanswered", None
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return "reset", None
    except TimeoutError:
        return "unanswered", None
    return "answered", int(received.split(b" ", 2)[1])


def _complete(response: bytes) -> bool:
    head, separator, body = response.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


@pytest.mark.slow
def test_sigterm_under_new_connection_load_answers_every_accepted_connection_and_exits_0(tiny_bert_dir, tmp_path):
    server = start_server(drain_server_args(tiny_bert_dir), tmp_path, "drain-connections")
    body = json.dumps({"inputs": "a short query"}).encode()
    outcomes: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    exited_at: list[float] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + LOAD_DEADLINE_S
        while not stop.is_set() and time.monotonic() < deadline:
            outcome, status = one_request(server.port, body)
            if outcome == "refused":
                time.sleep(REFUSED_PAUSE_S)  # a closed port answers at once: do not spin on it
            with lock:
                outcomes[outcome] += 1
                if status is not None:
                    statuses[status] += 1
            if exited_at and time.monotonic() > exited_at[0] + LOAD_AFTER_EXIT_S:
                return

    try:
        long_call = ThreadPoolExecutor(1).submit(
            httpx.post, server.url + "/embed", json={"inputs": [TEXT] * LONG_INPUTS}, timeout=120.0,
            trust_env=False,
        )
        deadline = time.monotonic() + 30.0
        while sum(scrape(server.url, "infercore_queue_items").values()) == 0 and not long_call.done():
            assert time.monotonic() < deadline, "the long request was never queued"
            time.sleep(0.02)
        keep_alive = httpx.Client(base_url=server.url, timeout=30.0, trust_env=False)
        assert keep_alive.get("/health").status_code == 200
        assert "close" not in keep_alive.get("/health").headers.get("connection", "")
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            clients = [pool.submit(client) for _ in range(CLIENT_THREADS)]
            time.sleep(LOAD_BEFORE_SIGNAL_S)
            server.proc.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            deadline = time.monotonic() + 15.0
            while (during_drain := keep_alive.get("/health")).status_code != 503:
                assert time.monotonic() < deadline, "the drain never began"
                time.sleep(0.02)
            keep_alive.close()
            exit_code = server.proc.wait(timeout=EXIT_TIMEOUT_S)
            exited_at.append(time.monotonic())
            for future in clients:
                future.result(timeout=LOAD_DEADLINE_S)
        long_answer = long_call.result(timeout=10)
        timeline = f"drain took {exited_at[0] - signalled_at:.2f}s"
    finally:
        stop.set()
        server.stop()

    print(f"{timeline}; outcomes {dict(outcomes)}, statuses {dict(statuses)}")
    assert outcomes["reset"] == 0, f"accepted connections reset without a response: {dict(outcomes)}"
    assert outcomes["unanswered"] == 0, f"accepted connections closed without a response: {dict(outcomes)}"
    assert long_answer.status_code == 200, long_answer.text
    # a keep-alive connection is told to go away by the first response of the drain
    assert during_drain.headers.get("connection") == "close", during_drain.headers
    assert statuses[503] > 0, f"no request was answered 503 during the drain: {dict(statuses)}"
    assert outcomes["refused"] > 0, "the load never reached the end of the drain"
    assert exit_code == 0, server.log()[-3000:]
