"""A small HTTP/1.1 server whose cost is bounded whatever its clients do (metrics.py's
transport; it knows nothing of metrics).

One thread serves every connection through a selector (epoll): no thread per client.
At most `max_connections` are open at once, so the endpoint holds at most that many file
descriptors plus the listening socket and the selector's. Each connection has a deadline
for the whole exchange, not per read: `request_deadline` seconds from accept to the end
of the request header, `response_deadline` seconds from accept to the last byte of the
answer. A client that sends one byte every few seconds is cut off at its deadline.

When every slot is taken, a new connection takes the slot of the oldest client still
sending its request EVICT_AFTER after its accept (the slowest one); until there is such a
client, new connections wait in the kernel's listen backlog, which costs the process no
descriptor.
A scraper that sends its request right after connecting (Prometheus does) is answered in
the round it is accepted, so a flood of slow clients delays it by the time the backlog
ahead of it takes to drain, and no flood can make the process run out of descriptors or
threads (docs/metrics.md has the figures).

Every connection gets one answer and is closed (`Connection: close`): a scrape every few
seconds gains nothing from keep-alive, and a held-open idle connection would be a slot.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8192  # request line and headers; a GET from a scraper needs < 1 KiB
RECV_CHUNK = 4096
SEND_CHUNK = 256 * 1024
ACCEPT_PAUSE = 0.5  # seconds without accepting after EMFILE/ENFILE, so the loop does not spin
# A client still sending its request this long after accept may lose its slot to a new
# one. A scraper's request is there at accept (it sends it right after connecting), so it
# is not at risk; the wait bounds how fast a flood makes the server churn: at most
# max_connections / EVICT_AFTER connections a second (benchmarks/metrics_flood.py: with
# 2,000 slow clients a scrape took 3.3-3.4 s at worst at 0.01 s, 7.6 s at 0.1 s).
EVICT_AFTER = 0.01
SELECT_TICK = 0.2  # seconds: the longest the loop sleeps before it checks deadlines and stop
METHODS = ("GET", "HEAD")
REFUSALS = ("deadline", "slot_taken", "bad_request")  # reasons in BoundedHttpServer.refused


@dataclass
class Request:
    """What the answer function gets: the method, the target (path and query) and the
    headers, names in lower case."""

    method: str
    target: str
    headers: dict[str, str]


@dataclass
class Answer:
    """What the answer function returns."""

    status: HTTPStatus
    headers: dict[str, str]
    body: bytes


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    accepted: float  # time.monotonic() of accept
    received: bytearray = field(default_factory=bytearray)
    outgoing: memoryview | None = None  # set once the request is complete
    sent: int = 0

    @property
    def answering(self) -> bool:
        return self.outgoing is not None


class BoundedHttpServer:
    """Serve `answer(request)` on `listen_socket` (bound and listening) from one thread.

    `start()` starts the thread (named `thread_name`); `close()` stops it, closes every
    connection and the listening socket. `refused` counts the connections closed without
    an answer or with an error, by reason: `deadline` (a deadline passed), `slot_taken`
    (a newer client took its slot), `bad_request` (a malformed, oversized or non-GET
    request); `open_connections` is how many are open now.
    """

    def __init__(
        self,
        listen_socket: socket.socket,
        answer: Callable[[Request], Answer],
        *,
        max_connections: int,
        request_deadline: float,
        response_deadline: float,
        thread_name: str,
    ):
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.listen_socket = listen_socket
        self.answer = answer
        self.max_connections = max_connections
        self.request_deadline = request_deadline
        self.response_deadline = response_deadline
        self.refused = dict.fromkeys(REFUSALS, 0)
        self._connections: dict[int, _Connection] = {}  # by fd, in accept order
        self._selector = selectors.DefaultSelector()
        self._accepting = False
        self._accept_paused_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        self.listen_socket.setblocking(False)
        self._set_accepting(True)
        self._thread.start()

    def close(self, timeout: float) -> None:
        """Stop serving: waits up to `timeout` seconds for the thread (an answer being
        built finishes first), then closes every connection and the listening socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for conn in list(self._connections.values()):
            self._drop(conn)
        self._selector.close()
        self.listen_socket.close()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception:  # a bug: keep serving the others, say so once per round
                log.exception("http: unexpected error in the server loop")
                time.sleep(SELECT_TICK)

    def _round(self) -> None:
        now = time.monotonic()
        if not self._accepting and now >= self._accept_paused_until:
            self._set_accepting(self._has_room_or_a_slow_client())
        for key, events in self._selector.select(self._next_timeout(now)):
            if key.fileobj is self.listen_socket:
                self._accept_some()
            else:
                conn = key.data
                if self._connections.get(key.fd) is conn:  # not closed earlier this round
                    self._serve(conn, readable=bool(events & selectors.EVENT_READ))
        self._expire(time.monotonic())

    def _next_timeout(self, now: float) -> float:
        timeout = SELECT_TICK
        full = len(self._connections) >= self.max_connections
        for conn in self._connections.values():
            timeout = min(timeout, max(0.0, self._deadline(conn) - now))
            if full and not conn.answering:  # when it may give up its slot
                timeout = min(timeout, max(0.0, conn.accepted + EVICT_AFTER - now))
        return timeout

    def _deadline(self, conn: _Connection) -> float:
        return conn.accepted + (self.response_deadline if conn.answering else self.request_deadline)

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        if on:
            self._selector.register(self.listen_socket, selectors.EVENT_READ)
        else:
            self._selector.unregister(self.listen_socket)
        self._accepting = on

    def _has_room_or_a_slow_client(self) -> bool:
        return len(self._connections) < self.max_connections or self._slowest() is not None

    def _slowest(self) -> _Connection | None:
        """The oldest client still sending its request after EVICT_AFTER, or None."""
        now = time.monotonic()
        for conn in self._connections.values():  # dicts keep accept order
            if not conn.answering:
                return conn if now - conn.accepted >= EVICT_AFTER else None
        return None

    def _accept_some(self) -> None:
        """Accept up to max_connections clients (then let the others' turn come)."""
        for _ in range(self.max_connections):
            if len(self._connections) >= self.max_connections and not self._evict_slowest():
                self._set_accepting(False)  # no slot to take yet: wait in the backlog
                return
            try:
                sock, address = self.listen_socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error(
                        "http: cannot accept a connection: %s; pausing for %g s",
                        exc.strerror,
                        ACCEPT_PAUSE,
                    )
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                    self._set_accepting(False)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client left before accept, or a firewall said no
                raise
            sock.setblocking(False)
            conn = _Connection(sock, str(address[0]), time.monotonic())
            self._connections[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            # a scraper's request is usually in the socket already: answer it now, before
            # the next accept could take its slot
            self._serve(conn, readable=True)

    def _evict_slowest(self) -> bool:
        """Close the slowest client (see _slowest); False if there is none."""
        conn = self._slowest()
        if conn is not None:
            self._refuse(conn, "slot_taken", "slot taken by a newer client")
        return conn is not None

    def _expire(self, now: float) -> None:
        for conn in list(self._connections.values()):
            if now >= self._deadline(conn):
                what = "its answer" if conn.answering else "its request"
                self._refuse(conn, "deadline", f"deadline for {what} passed")

    # ------------------------------------------------------------------ one connection
    def _serve(self, conn: _Connection, readable: bool) -> None:
        try:
            if not conn.answering and readable:
                self._read(conn)
            if conn.answering:
                self._write(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # reset by the client, broken pipe: its business
            log.debug("http: %s: %s", conn.peer, exc)
            self._drop(conn)

    def _read(self, conn: _Connection) -> None:
        while not conn.answering:
            chunk = conn.sock.recv(RECV_CHUNK)
            if not chunk:  # closed before the request was complete
                self._drop(conn)
                return
            conn.received += chunk
            end = conn.received.find(b"\r\n\r\n")
            if end < 0 and len(conn.received) > MAX_HEADER_BYTES:
                self._respond(conn, _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))
            elif end >= 0:
                self._respond(conn, self._answer(bytes(conn.received[:end])))

    def _answer(self, head: bytes) -> Answer:
        request = _parse(head)
        if request is None:
            return _error(HTTPStatus.BAD_REQUEST)
        if request.method not in METHODS:
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": ", ".join(METHODS)})
        try:
            answer = self.answer(request)
        except Exception:  # a bug in the answer: this client gets a 500, the rest is served
            log.exception("http: answering %s %s failed", request.method, request.target)
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR)
        if request.method == "HEAD":
            answer = Answer(
                answer.status, {**answer.headers, "Content-Length": str(len(answer.body))}, b""
            )
        return answer

    def _respond(self, conn: _Connection, answer: Answer) -> None:
        if HTTPStatus.BAD_REQUEST <= answer.status < HTTPStatus.INTERNAL_SERVER_ERROR:
            self.refused["bad_request"] += 1
        headers = {"Content-Length": str(len(answer.body)), **answer.headers, "Connection": "close"}
        head = f"HTTP/1.1 {answer.status.value} {answer.status.phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        conn.received.clear()
        conn.outgoing = memoryview(head.encode("latin-1") + b"\r\n" + answer.body)
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.outgoing is not None
        while conn.sent < len(conn.outgoing):
            conn.sent += conn.sock.send(conn.outgoing[conn.sent : conn.sent + SEND_CHUNK])
        with contextlib.suppress(OSError, KeyError, ValueError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._drop(conn)

    def _refuse(self, conn: _Connection, reason: str, why: str) -> None:
        self.refused[reason] += 1
        log.debug("http: closing the connection from %s: %s", conn.peer, why)
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._connections.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()


def _parse(head: bytes) -> Request | None:
    """The request line and headers (RFC 9112 section 3 and 5), or None if malformed."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1.") or not target:
        return None
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return Request(method, target, headers)


def _error(status: HTTPStatus, headers: dict[str, str] | None = None) -> Answer:
    return Answer(
        status,
        {"Content-Type": "text/plain; charset=utf-8", **(headers or {})},
        f"{status.value} {status.phrase}\n".encode(),
    )
