"""The end of a drain without dropped connections: stop accepting, then answer what was accepted.

A plain close of a listening socket resets every connection the kernel has already accepted into
its queue (the client's ``connect()`` succeeded; it then gets ``ECONNRESET``), and closing a
connection whose request bytes are already in its receive buffer resets it too. uvicorn does both at
shutdown, so under new-connection-per-request load the connections of a drain's last milliseconds
were reset without an answer. ``DrainingServer`` (server/app.py) ends a drain with these steps
instead:

1. ``stop_accepting``: the kernel stops starting handshakes on the listening sockets (a socket filter
   drops pure SYNs, Linux only; a client whose SYN was dropped retries and is refused once the socket
   is closed, so it never counts as connected), handshakes already under way complete and are
   accepted, and only when the accept queues stay empty are the listening sockets closed.
2. ``answer_accepted``: connections that have not sent a request yet get ``FRESH_CONNECTION_GRACE_S``
   to send it; it is answered (503, the engine is draining) with ``Connection: close``. Connections
   idle after an earlier response (keep-alive) are closed at once, as HTTP/1.1 allows; clients retry
   a request that races such a close on a new connection.
3. uvicorn's own shutdown then lets requests in progress finish (with ``Connection: close``) and
   closes whatever is left.

``CloseWhenDraining`` adds ``Connection: close`` to every response once the engine is draining, so no
connection goes back to idle keep-alive during a drain and clients reconnect (to another instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import select
import socket
import struct
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("infercore.shutdown")

# Handshakes the kernel started before the filter went on complete within a round trip (well under
# this on any network a server should be reached over); they are accepted before the socket closes.
HANDSHAKE_SETTLE_S = 0.25
# Upper bound on waiting for the accept queues to stay empty (a flood of completing handshakes).
ACCEPT_QUEUE_WAIT_S = 2.0
# How long a connection accepted at the end of a drain may take to send its request.
FRESH_CONNECTION_GRACE_S = 1.0
POLL_S = 0.01

# Classic BPF (linux/filter.h): load the TCP flags byte (offset 13 of the TCP header, where a TCP
# socket's filter sees the packet start), keep SYN|ACK, and drop the packet (return 0) when only SYN
# is set; keep everything else whole (return 0xFFFFFFFF): handshake ACKs and established traffic.
_SO_ATTACH_FILTER = 26
_BPF_LD_B_ABS, _BPF_ALU_AND_K, _BPF_JMP_JEQ_K, _BPF_RET_K = 0x30, 0x54, 0x15, 0x06
_TCP_FLAGS_OFFSET, _SYN, _SYN_ACK = 13, 0x02, 0x12
_DROP_PURE_SYN = (
    (_BPF_LD_B_ABS, 0, 0, _TCP_FLAGS_OFFSET),
    (_BPF_ALU_AND_K, 0, 0, _SYN_ACK),
    (_BPF_JMP_JEQ_K, 0, 1, _SYN),
    (_BPF_RET_K, 0, 0, 0),
    (_BPF_RET_K, 0, 0, 0xFFFFFFFF),
)


def refuse_new_handshakes(sock: Any) -> bool:
    """Make the kernel drop new connection attempts (SYNs) to the listening TCP socket ``sock``,
    leaving handshakes under way and accepted connections alone. False where this cannot be done
    (not Linux, not TCP): the caller then closes the socket without that guarantee."""
    if not sys.platform.startswith("linux") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _DROP_PURE_SYN))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, native layout
    fprog = struct.pack("HP", len(_DROP_PURE_SYN), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.warning("cannot filter new connections on %s (%s): closing it plainly", sock.getsockname(), exc)
        return False
    return True


async def stop_accepting(servers: Iterable[asyncio.AbstractServer]) -> None:
    """Stop new handshakes, accept the ones under way, then close the listening sockets."""
    servers = list(servers)
    listeners = [sock for server in servers for sock in (getattr(server, "sockets", None) or ())]
    if any([refuse_new_handshakes(sock) for sock in listeners]):
        await asyncio.sleep(HANDSHAKE_SETTLE_S)
    # The event loop accepts whatever is queued when it next polls; wait until no queue holds any.
    deadline = time.monotonic() + ACCEPT_QUEUE_WAIT_S
    while _pending_connections(listeners) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    for server in servers:
        server.close()


def _pending_connections(listeners: list[Any]) -> bool:
    """Whether a listening socket has connections waiting to be accepted (it polls readable)."""
    if not listeners:
        return False
    with contextlib.suppress(OSError, ValueError):
        readable, _, _ = select.select([sock.fileno() for sock in listeners], [], [], 0)
        return bool(readable)
    return False


async def answer_accepted(connections: set[Any], grace_s: float = FRESH_CONNECTION_GRACE_S) -> None:
    """Close idle keep-alive connections; give connections that have not sent a request yet
    ``grace_s`` to send it (it is then answered and the connection closed after the response)."""
    for connection in list(connections):
        if _idle_after_response(connection):
            connection.shutdown()
    deadline = time.monotonic() + grace_s
    while any(_awaiting_first_request(c) for c in connections) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    waiting = sum(_awaiting_first_request(c) for c in connections)
    if waiting:
        log.warning("closing %d connections that sent no request within %.1fs of the drain's end", waiting, grace_s)


def _awaiting_first_request(connection: Any) -> bool:
    # uvicorn's HTTP/1.1 protocols create a request cycle when a request's headers are complete.
    return getattr(connection, "cycle", False) is None


def _idle_after_response(connection: Any) -> bool:
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and cycle.response_complete and not getattr(connection, "pipeline", None)


class CloseWhenDraining:
    """ASGI middleware: once ``engine`` drains, every HTTP response says ``Connection: close`` (uvicorn
    then closes the connection after it)."""

    def __init__(self, app: Any, engine: Engine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: dict) -> None:
            if message["type"] == "http.response.start" and self.engine.state in ("draining", "stopped"):
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)
