"""The control server: newline-delimited JSON-RPC 2.0 on a Unix stream socket.

One JSON-RPC request (or batch) per line in, one response line per request out
(jsonrpc.org/specification; the protocol and ixyd's methods are in docs/control.md). The
socket is `/run/ixyd/<instance>.sock`, or the listening socket systemd hands over under
the name `control` (socket activation, sd_listen_fds_with_names(3)).

The service plugs in through a registry: `register(name, handler, params_schema=...,
mutating=...)`. Parameters are checked against the declarative schema before the handler
runs, the peer is authorised from SO_PEERCRED (socket(7)), and every failure becomes a
JSON-RPC error (`ErrorCode`); a traceback is logged, never sent.

Threads: the server runs an asyncio loop in its own thread, `ixyd-control`. Handlers are
called on that thread, one at a time, so they need no locking against each other, but
they block every other client while they run: keep them quick (read published counters,
flip a flag in shared memory) and never wait on a data-path worker. Data-path workers
never wait on the server. The clients' work takes turns on that thread (_FairTurns): one
step (a line's decoding, one request) at a time, root and the daemon's user first, then
round-robin by uid; connections, batches and unread replies are capped per client
(docs/control.md "Framing and limits", "Fairness").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import grp
import json
import logging
import math
import os
import pwd
import re
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from . import activation
from .errors import ConfigError, IxydError

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/run/ixyd"
RUN_DIR_ENV = "IXYD_RUN_DIR"  # overrides DEFAULT_RUN_DIR for the daemon and ixyd-ctl alike
RUN_DIR_MODE = 0o755  # like DirectoryMode=0755 in ixyd@.socket: anyone may find the socket
SOCKET_MODE = 0o660  # like SocketMode=0660: the owner and the socket's group may connect
ACTIVATION_FD_NAME = "control"  # FileDescriptorName= in ixyd@.socket

MAX_LINE = 64 * 1024  # bytes per request line, newline included
MAX_BATCH = 32  # requests in one batch line; a longer batch is refused whole (-32600)
MAX_CLIENTS = 64  # concurrent connections in all; more are refused with BUSY
RESERVED_CLIENTS = 8  # of MAX_CLIENTS, kept for root and the daemon's own uid
MAX_CLIENTS_PER_UID = 16  # connections one uid other than root and the daemon's may hold
MAX_UNSENT = 256 * 1024  # bytes of replies a client leaves unread before its lines wait
LOG_BURST = 10  # log records about one uid's refused requests and connections ...
LOG_INTERVAL = 10.0  # ... per this many seconds; the rest are counted, then summed up
IDLE_TIMEOUT = 60.0  # seconds a client may take to send a complete line or read a reply
LISTEN_BACKLOG = socket.SOMAXCONN
STALE_PROBE_TIMEOUT = 1.0  # seconds to wait on connect() when probing an existing socket
DISCARD_TIMEOUT = 1.0  # seconds to swallow the rest of an oversized request before closing
DISCARD_LIMIT = 1024 * 1024  # bytes swallowed at most
CLOSE_TIMEOUT = 2.0  # seconds close() waits for connections to finish
STREAM_END_TIMEOUT = 5.0  # seconds a stream asked to stop may take to send its end

ROOT_UID = 0
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}, socket(7)
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9_@:.-]+")


class ErrorCode(enum.IntEnum):
    """JSON-RPC error codes: the standard ones (specification §5.1) and ixyd's own, in the
    range -32000..-32099 that the specification leaves to the server."""

    PARSE_ERROR = -32700  # the line is not UTF-8 or not JSON
    INVALID_REQUEST = -32600  # JSON, but not a request object (or an empty batch)
    METHOD_NOT_FOUND = -32601  # no method of that name is registered
    INVALID_PARAMS = -32602  # missing, unknown or mistyped parameter, or a refused value
    INTERNAL_ERROR = -32603  # a bug in ixyd; the traceback is in its log, not on the wire
    UNAUTHORIZED = -32001  # the peer (SO_PEERCRED) may not call this method
    DEVICE_ERROR = -32002  # the NIC, its DMA memory or its binding failed
    BUSY = -32003  # a conflicting operation is in progress, or too many clients
    NOT_FOUND = -32004  # no such port (or other named object)
    REQUEST_TOO_LARGE = -32005  # a line longer than the limit; the connection is closed


class ControlError(IxydError):
    """The control socket could not be set up (path in use, not a socket, permissions)."""


class RpcError(Exception):
    """Raise from a handler to answer with a specific error, e.g.
    `raise RpcError(ErrorCode.NOT_FOUND, "no port 'eth9'; ports: demo.0, demo.1")`.
    `data` (any JSON value) travels in the error object's `data` member."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.data = data


class Stream:
    """A result that goes on after its response: what a method registered with
    streaming=True returns (`capture`).

    The server sends `result` as the response, then, as JSON-RPC notifications
    (`{"jsonrpc": "2.0", "method": ..., "params": ...}`), what the producer hands to
    `send` from any thread, in order, until `end`; then it closes the connection. `send`
    blocks while `max_pending` notifications are unsent (a slow reader holds the producer
    back). The client sends nothing meanwhile: a line from it asks the producer to stop
    (on_close runs; the stream still ends with the producer's `end`), its EOF, a write
    that fails or takes longer than the idle timeout, or the server closing, end the stream
    at once (on_close runs too). on_close runs on the server thread, once: it must not block.
    """

    def __init__(self, result: Any, *, on_close: Callable[[], None], max_pending: int = 16):
        self.result = result
        self._on_close = on_close
        self._room = threading.Semaphore(max_pending)
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._ended = False
        self._closed = threading.Event()
        self._stopping = False
        self._wake: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        """Whether the stream was ended early (nobody takes notifications any more)."""
        return self._closed.is_set()

    def send(self, method: str, params: Any) -> bool:
        """Queue notification `method` with `params`; False once the stream is closed."""
        while not self._room.acquire(timeout=0.05):
            if self._closed.is_set():
                return False
        if self._closed.is_set():
            self._room.release()
            return False
        self._queue({"jsonrpc": "2.0", "method": method, "params": params})
        return True

    def end(self, method: str, params: Any) -> None:
        """Queue the last notification; the server sends it and closes the connection."""
        self._queue({"jsonrpc": "2.0", "method": method, "params": params}, last=True)

    def _queue(self, message: dict, last: bool = False) -> None:
        with self._lock:
            if self._ended:
                return
            self._pending.append(message)
            self._ended = last
            wake = self._wake
        if wake is not None:
            wake()

    # -- the server's side (its thread)
    def _attach(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wake = wake

    def _take(self) -> tuple[list[dict], bool]:
        """The queued notifications, and whether the last one is among them."""
        with self._lock:
            pending, self._pending = self._pending, []
            return pending, self._ended

    def _sent(self, count: int) -> None:
        for _ in range(count):
            self._room.release()

    def _stop(self) -> None:
        """Ask the producer to stop: on_close, once."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._on_close()
        except Exception:
            log.exception("control: closing a stream failed")

    def _close(self) -> None:
        """Nobody reads any more: stop the producer and release it if it waits in send."""
        self._closed.set()
        self._stop()


# ---------------------------------------------------------------------------- parameters
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "an object",
}


def _is_type(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _show(value: Any, limit: int = 40) -> str:
    """A value as JSON text for a message, cut to `limit` characters."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a number beyond ±1.8e308"  # what 1e999 decodes to: JSON has no infinity
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        return "(a value nested too deeply to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_non_finite(value: Any) -> bool:
    """Whether a decoded JSON value holds a number that overflowed to ±inf (1e999) anywhere.
    Iterative: a decoded line may nest as deep as the decoder's recursion limit."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its JSON type (str, int, float, bool, list or dict;
    float accepts integers, int refuses booleans and 2.0), whether it must be present,
    and optionally the allowed values and, for numbers, the inclusive bounds."""

    type: type
    required: bool = True
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"Param type must be one of {sorted(t.__name__ for t in _TYPE_NAMES)}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if (self.minimum is not None or self.maximum is not None) and self.type not in (
            int,
            float,
        ):
            raise TypeError("minimum/maximum apply to int and float parameters only")

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ("must be an integer, got \"x\""), or None."""
        if not _is_type(value, self.type):
            return f"must be {_TYPE_NAMES[self.type]}, got {_show(value)}"
        if _has_non_finite(value):  # nothing a handler could do with it, nor send back
            kind = _TYPE_NAMES[self.type]
            what = "a finite number" if self.type is float else f"{kind} of finite numbers"
            return f"must be {what}, got {_show(value)}"
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(_show(c) for c in self.choices)
            return f"must be one of {allowed}, got {_show(value)}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum}, got {_show(value)}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum}, got {_show(value)}"
        return None


def validate_params(method: str, schema: Mapping[str, Param], params: Mapping[str, Any]) -> dict:
    """Check `params` against `schema`; return them as a new dict. Raises RpcError
    INVALID_PARAMS naming the method and the parameter (also in `data.param`)."""

    def invalid(name: str, message: str) -> RpcError:
        return RpcError(
            ErrorCode.INVALID_PARAMS,
            f"invalid params for '{method}': {message}",
            {"param": name},
        )

    for name in params:
        if name not in schema:
            known = f"parameters: {', '.join(schema)}" if schema else "it takes none"
            raise invalid(name, f"unknown parameter '{name}' ({known})")
    for name, spec in schema.items():
        if name not in params:
            if spec.required:
                raise invalid(name, f"missing parameter '{name}' ({_TYPE_NAMES[spec.type]})")
            continue
        problem = spec.problem(params[name])
        if problem:
            raise invalid(name, f"'{name}' {problem}")
    return dict(params)


# ---------------------------------------------------------------------------- peers
@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as of its connect() (SO_PEERCRED).
    `groups` holds the primary gid and the supplementary groups from /proc/<pid>/status."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of a connected Unix socket's peer. Raises OSError if unavailable."""
    return _peer(*_credentials(sock))


def _credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected Unix socket's peer; OSError if unavailable."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def _peer(pid: int, uid: int, gid: int) -> Peer:
    return Peer(pid, uid, gid, frozenset({gid}) | _supplementary_groups(pid, uid))


def _supplementary_groups(pid: int, uid: int) -> frozenset[int]:
    """The `Groups:` of /proc/<pid>/status, if that process still has effective uid `uid`.

    SO_PEERCRED carries only the primary gid. The pid may have exited (or, rarely, been
    reused) since connect(): then the uid check fails and only the primary gid counts.
    """
    if pid <= 0:  # a peer in a pid namespace we cannot see
        return frozenset()
    fields = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value.split()
    except OSError:
        return frozenset()
    uids = fields.get("Uid", [])  # real, effective, saved, filesystem
    if len(uids) < 2 or uids[1] != str(uid):
        return frozenset()
    return frozenset(int(g) for g in fields.get("Groups", []) if g.isdigit())


# Cached: refusals name users and groups, and a name service lookup (NSS: LDAP, sssd) on
# the server thread for every refused request would let a client stall it.
@functools.lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


@functools.lru_cache(maxsize=256)
def _group_name(gid: int) -> str:
    try:
        return f"'{grp.getgrgid(gid).gr_name}' (gid {gid})"
    except KeyError:
        return f"gid {gid}"


# ---------------------------------------------------------------------------- socket activation
def activated_socket(name: str = ACTIVATION_FD_NAME) -> socket.socket | None:
    """The listening socket systemd handed over under `name`, or None. Raises
    ActivationError (an IxydError) if that fd is not a listening Unix stream socket."""
    return activation.activated_socket(
        name,
        (socket.AF_UNIX,),
        "a Unix stream socket",
        "use ListenStream=/run/ixyd/%i.sock in the socket unit",
    )


def socket_path(instance: str, run_dir: str | None = None) -> str:
    """Where instance `instance` listens: <run_dir>/<instance>.sock, run_dir defaulting to
    $IXYD_RUN_DIR, else /run/ixyd. Raises ConfigError for a name that is not a plain file
    name (letters, digits and _ @ : . -, not starting with a dot)."""
    if not _INSTANCE_NAME.fullmatch(instance) or instance.startswith("."):
        raise ConfigError(
            f"instance name {instance!r} is not valid: use letters, digits and _ @ : . - "
            "(e.g. 'demo' or a PCI address like 0000:03:00.0)"
        )
    if run_dir is None:
        run_dir = os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR
    return os.path.join(run_dir, f"{instance}.sock")


# ---------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class _Method:
    name: str
    handler: Callable[..., Any]
    params_schema: dict[str, Param]
    mutating: bool
    streaming: bool = False


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict:
    error = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _encode(message: Any) -> bytes:
    return (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode()


class _NotJson(ValueError):
    """What the decoder's hooks raise: the message is for the client as it is."""


def _reject_constant(name: str) -> None:
    raise _NotJson(f"{name} is not JSON")


def _decode(text: str) -> Any:
    """A request line's JSON value. Raises _NotJson with a message for the client, naming
    the problem in JSON's terms, never the decoder's internals."""
    if text.startswith("\ufeff"):  # json.loads would suggest a Python codec
        raise _NotJson("it starts with a byte order mark (U+FEFF); send UTF-8 without one")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _NotJson("it is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise _NotJson(f"{exc.msg} at character {exc.pos}") from None
    except _NotJson:
        raise
    except ValueError:  # int() refused a literal over Python's digit cap (CVE-2020-10735)
        limit = sys.get_int_max_str_digits()
        raise _NotJson(f"an integer has more than {limit} digits") from None


def _valid_id(request_id: Any) -> bool:
    if isinstance(request_id, float):  # 1e999 decodes to inf, which no reply can carry
        return math.isfinite(request_id)
    return request_id is None or (
        isinstance(request_id, str | int) and not isinstance(request_id, bool)
    )


class _LogBudget:
    """Log records about what clients did (refused connections and requests, lines over
    the limit), at most LOG_BURST per client uid every LOG_INTERVAL seconds: one line of a
    batch used to log a warning per request in it. What is held back is counted and said
    in one record once the interval is over. Used on the server thread only."""

    def __init__(self, burst: int = LOG_BURST, interval: float = LOG_INTERVAL):
        self.burst, self.interval = burst, interval
        self._windows: dict[int, list] = {}  # uid -> [start (monotonic), logged, held back]

    def log(self, uid: int, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        window = self._windows.get(uid)
        if window is None or now - window[0] >= self.interval:
            if window is not None:
                self._sum_up(uid, window)
            window = self._windows[uid] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            log.log(level, message, *args)
            return
        window[2] += 1
        if window[2] == 1:  # say it when the interval is over, even if the client stops
            with contextlib.suppress(RuntimeError):  # no loop here (answer() in a test)
                asyncio.get_running_loop().call_later(self.interval - (now - window[0]), self.flush)

    def flush(self) -> None:
        """Sum up the windows that are over; forget them."""
        now = time.monotonic()
        for uid, window in list(self._windows.items()):
            if now - window[0] >= self.interval:
                del self._windows[uid]
                self._sum_up(uid, window)

    def _sum_up(self, uid: int, window: list) -> None:
        if window[2]:
            log.warning(
                "control: %d more records about uid %d not logged (at most %d per %g s)",
                window[2],
                uid,
                self.burst,
                self.interval,
            )


class _Job:
    """The work one line of one connection asks for: `steps` does one unit per next() and
    returns the reply; `done` gets it."""

    __slots__ = ("steps", "done")

    def __init__(self, steps: Generator[None, None, Any], done: asyncio.Future):
        self.steps, self.done = steps, done

    def step(self) -> bool:
        """One unit of work; True when the job is finished (`done` is set)."""
        try:
            next(self.steps)
        except StopIteration as end:
            self.done.set_result(end.value)
            return True
        except BaseException as exc:  # a bug: the connection logs it and closes, the
            self.done.set_exception(exc)  # turns go on for the others
            return True
        return False


class _FairTurns:
    """Runs the connections' work on the server thread, one step at a time and fairly:
    the uids in `first` (root and the daemon's own: the operators) before the others,
    round-robin over the uids that have work waiting, and for each uid over its
    connections in turn. A step is one unit (decoding a line, one request of a batch);
    after each, the loop goes back to its I/O. So an operator's request waits for at most
    the step in progress, anyone else's for at most one step of every other uid with work
    waiting; never for a whole batch, nor for the many connections one user may hold.
    `steps`, `longest_step` (seconds, wall clock: includes time the thread was preempted)
    and `longest_step_cpu` (the thread's CPU time: the work itself) tell what it did."""

    def __init__(self, first: frozenset[int] = frozenset()) -> None:
        self._first = first
        self._waiting: dict[int, deque[_Job]] = {}  # uid -> its jobs, in turn order
        self._wake = asyncio.Event()
        self.steps = 0
        self.longest_step = 0.0
        self.longest_step_cpu = 0.0

    async def run(self, uid: int, steps: Generator[None, None, Any]) -> Any:
        """Run `steps` to its end in uid's turns; its return value. If the caller is
        cancelled, the rest of the work is dropped."""
        job = _Job(steps, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(uid, deque()).append(job)
        self._wake.set()
        try:
            return await job.done
        finally:
            if not job.done.done() or job.done.cancelled():
                steps.close()  # skipped from now on: its future is done

    async def serve(self) -> None:
        """Take turns until cancelled (the server closing)."""
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            # an operator's, else the uid whose turn came longest ago
            uid = next((u for u in self._waiting if u in self._first), None)
            if uid is None:
                uid = next(iter(self._waiting))
            jobs = self._waiting.pop(uid)
            job = jobs.popleft()
            if not job.done.done():  # else: cancelled while waiting
                started, started_cpu = time.perf_counter(), time.thread_time()
                finished = job.step()
                self.longest_step = max(self.longest_step, time.perf_counter() - started)
                cpu = time.thread_time() - started_cpu
                self.longest_step_cpu = max(self.longest_step_cpu, cpu)
                self.steps += 1
                if not finished:
                    jobs.append(job)  # after this uid's other connections
            if jobs:
                self._waiting[uid] = jobs  # re-inserted: last in the rotation
            await asyncio.sleep(0)  # let the loop read and write between steps


class ControlServer:
    """A JSON-RPC 2.0 server on a Unix stream socket, serving the methods registered on it.

    Give either `path` (the server creates the socket there, its directory with mode 0755
    if missing, and removes it on close) or `listen_socket` (an already listening socket,
    e.g. from socket activation; it is never unlinked). `socket_mode` and `socket_group`
    (name or gid) apply to a socket the server creates. Authorization: methods registered
    with mutating=False may be called by root, the daemon's own uid and members of the
    socket file's group; mutating ones by root and the daemon's own uid only.

        with ControlServer(socket_path("demo")) as server:
            server.register("stats", stats, params_schema={"port": Param(str, required=False)},
                            mutating=False)
            server.serve()
            ...

    Limits (docs/control.md "Framing and limits", "Fairness"): `max_line` bytes per
    request line, newline included (longer: REQUEST_TOO_LARGE, then the connection is
    closed); `max_batch` requests per batch (more: INVALID_REQUEST); `max_clients`
    connections, of which `reserved_clients` only root and the daemon's own uid may use,
    and `max_clients_per_uid` for any other uid (more are answered BUSY and closed);
    `max_unsent` bytes of unread replies per client before its next line waits;
    `idle_timeout` seconds to send a complete line or to take a reply (then closed).
    The connections' work is done in turns (_FairTurns), one request at a time.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        listen_socket: socket.socket | None = None,
        socket_mode: int = SOCKET_MODE,
        socket_group: int | str | None = None,
        max_line: int = MAX_LINE,
        max_batch: int = MAX_BATCH,
        max_clients: int = MAX_CLIENTS,
        reserved_clients: int = RESERVED_CLIENTS,
        max_clients_per_uid: int = MAX_CLIENTS_PER_UID,
        max_unsent: int = MAX_UNSENT,
        idle_timeout: float = IDLE_TIMEOUT,
    ):
        if (path is None) == (listen_socket is None):
            raise ValueError("give exactly one of path and listen_socket")
        self._listen_socket = listen_socket
        self.activated = listen_socket is not None
        self.path = path if path is not None else self._socket_file(listen_socket)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        if not 0 <= reserved_clients < max_clients:
            raise ValueError("reserved_clients must leave room for others in max_clients")
        self.max_line = max_line
        self.max_batch = max_batch
        self.max_clients = max_clients
        self.reserved_clients = reserved_clients
        self.max_clients_per_uid = max_clients_per_uid
        self.max_unsent = max_unsent
        self.idle_timeout = idle_timeout
        #: the gid whose members may call read-only methods (the socket file's group)
        self.socket_gid: int | None = None
        self._owner_uid = os.geteuid()
        self._methods: dict[str, _Method] = {}
        self._created: tuple[int, int] | None = None  # (st_dev, st_ino) of a socket we bound
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}  # all, refused too
        self._clients: dict[asyncio.Task, int] = {}  # the connections being served: uid
        self._clients_of: dict[int, int] = {}  # uid -> its connections being served
        self._turns: _FairTurns | None = None  # made on the server thread's loop
        self._log_budget = _LogBudget()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False

    @classmethod
    def for_instance(cls, instance: str, *, run_dir: str | None = None, **options: Any) -> Self:
        """The server for ixyd instance `instance`: the socket systemd handed over as
        `control` if there is one, else <run_dir>/<instance>.sock (see socket_path)."""
        sock = activated_socket(ACTIVATION_FD_NAME)
        if sock is not None:
            log.info("control: using the socket-activated fd %d", sock.fileno())
            return cls(listen_socket=sock, **options)
        return cls(socket_path(instance, run_dir), **options)

    @staticmethod
    def _socket_file(sock: socket.socket) -> str | None:
        name = sock.getsockname()
        return name if isinstance(name, str) and name.startswith("/") else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ registry
    def register(
        self,
        name: str,
        handler: Callable[..., Any],
        *,
        params_schema: Mapping[str, Param],
        mutating: bool,
        streaming: bool = False,
    ) -> None:
        """Serve method `name`: `handler(**params)` is called on the server thread with the
        validated parameters (absent optional ones are left out) and returns the JSON
        result. It may raise RpcError for a specific error; ConfigError becomes
        INVALID_PARAMS, other IxydErrors DEVICE_ERROR, anything else INTERNAL_ERROR
        (logged with its traceback). `mutating` methods change the daemon and are for
        root and the daemon's own uid only. A `streaming` method returns a `Stream`; it
        cannot be called in a batch or as a notification (-32600). Raises ValueError for a
        reserved or taken name.
        """
        if not isinstance(name, str) or not name or name.startswith("rpc."):
            raise ValueError(f"method name {name!r} is empty or reserved (rpc.*)")
        if name in self._methods:
            raise ValueError(f"method '{name}' is already registered")
        if not callable(handler):
            raise TypeError(f"the handler of '{name}' is not callable")
        for param, spec in params_schema.items():
            if not isinstance(spec, Param):
                raise TypeError(f"'{name}' parameter '{param}': give a Param, not {spec!r}")
        self._methods[name] = _Method(
            name, handler, dict(params_schema), bool(mutating), bool(streaming)
        )

    # ------------------------------------------------------------------ answering
    def answer(self, line: bytes, peer: Peer) -> bytes | None:
        """The response line (newline included) to one request line from `peer`, or None
        when nothing is to be sent (notifications, blank lines). Never raises. A streaming
        method's stream is closed at once: there is no connection to stream on."""
        streams: list[Stream] = []
        steps = self._answer_steps(line, peer, streams)
        try:
            while True:
                next(steps)
        except StopIteration as end:
            return end.value
        finally:
            for stream in streams:
                stream._close()

    def _answer_steps(
        self, line: bytes, peer: Peer, streams: list[Stream]
    ) -> Generator[None, None, bytes | None]:
        """answer(), one unit of work per step (for _FairTurns): decoding the line (and
        answering it if it is a single request), then each request of a batch; returns the
        response line. A streaming method's Stream is
        appended to `streams`."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _encode(
                _error(
                    None,
                    ErrorCode.PARSE_ERROR,
                    f"the request is not valid UTF-8 (byte {exc.start})",
                )
            )
        if not text.strip():
            return None
        try:
            message = _decode(text)
        except _NotJson as exc:
            return _encode(
                _error(None, ErrorCode.PARSE_ERROR, f"the request is not valid JSON: {exc}")
            )
        if not isinstance(message, list):
            return self._encode_reply(self._answer_safely(message, peer, streams))
        if not message:
            return _encode(_error(None, ErrorCode.INVALID_REQUEST, "the batch is empty"))
        if len(message) > self.max_batch:
            return _encode(
                _error(
                    None,
                    ErrorCode.INVALID_REQUEST,
                    f"a batch of {len(message)} requests; at most {self.max_batch} in one "
                    "line: send the rest in another",
                )
            )
        replies = []
        for request in message:
            yield  # decoding was a step; so is each request
            reply = self._answer_safely(request, peer, None)
            if reply is not None:
                replies.append(reply)
        return self._encode_reply(replies or None)

    def _answer_safely(self, request: Any, peer: Peer, streams: list[Stream] | None) -> dict | None:
        """_answer_one, with a bug in it turned into INTERNAL_ERROR rather than a lost
        connection and an unanswered client."""
        try:
            return self._answer_one(request, peer, streams)
        except Exception:
            log.exception("control: answering a request of %s failed", peer)
            return _error(
                None, ErrorCode.INTERNAL_ERROR, "internal error; the ixyd log has the details"
            )

    @staticmethod
    def _encode_reply(reply: Any) -> bytes | None:
        if reply is None:
            return None
        try:
            return _encode(reply)
        except (TypeError, ValueError, RecursionError):  # checked before: a bug if it happens
            log.exception("control: a reply could not be encoded")
            return _encode(
                _error(
                    None, ErrorCode.INTERNAL_ERROR, "internal error; the ixyd log has the details"
                )
            )

    def _answer_one(
        self, request: Any, peer: Peer, streams: list[Stream] | None = None
    ) -> dict | None:
        """The response to one request; streams: where a streaming method's Stream goes
        (None: in a batch, where streaming methods are refused)."""
        if not isinstance(request, dict):
            return _error(None, ErrorCode.INVALID_REQUEST, "a request must be a JSON object")
        request_id = request.get("id")
        if not _valid_id(request_id):
            return _error(
                None, ErrorCode.INVALID_REQUEST, "'id' must be a string, a finite number or null"
            )
        if request.get("jsonrpc") != "2.0":
            return _error(request_id, ErrorCode.INVALID_REQUEST, "'jsonrpc' must be \"2.0\"")
        method = request.get("method")
        if not isinstance(method, str):
            return _error(request_id, ErrorCode.INVALID_REQUEST, "'method' must be a string")
        params = request.get("params", {})
        if not isinstance(params, dict | list):
            return _error(
                request_id, ErrorCode.INVALID_REQUEST, "'params' must be an object or an array"
            )
        notification = "id" not in request
        try:
            result = self._call(method, params, peer, None if notification else streams)
        except RpcError as exc:
            if notification:
                self._log_budget.log(
                    peer.uid,
                    logging.INFO,
                    "control: notification %s from %s failed: %s",
                    _show(method),
                    peer,
                    exc,
                )
                return None
            data = exc.data
            try:
                json.dumps(data, allow_nan=False)
            except (TypeError, ValueError):
                log.error("control: '%s' raised an RpcError whose data is not JSON", method)
                data = None
            return _error(request_id, exc.code, str(exc.message), data)
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    def _call(
        self, name: str, params: dict | list, peer: Peer, streams: list[Stream] | None = None
    ) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise RpcError(
                ErrorCode.METHOD_NOT_FOUND,
                f"no method '{name}' (methods: {', '.join(sorted(self._methods))})",
            )
        self._authorize(method, peer)
        if method.streaming and streams is None:
            raise RpcError(
                ErrorCode.INVALID_REQUEST,
                f"'{name}' streams its result: send it alone with an id, not in a batch "
                "or as a notification",
            )
        if isinstance(params, list):
            if params:
                raise RpcError(
                    ErrorCode.INVALID_PARAMS,
                    f"'{name}' takes named parameters (a JSON object), not an array",
                )
            params = {}
        kwargs = validate_params(name, method.params_schema, params)
        if method.mutating:
            log.info("control: %s %s by %s", name, _show(kwargs, 200), peer)
        try:
            result = method.handler(**kwargs)
        except RpcError:
            raise
        except ConfigError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        except IxydError as exc:
            raise RpcError(ErrorCode.DEVICE_ERROR, str(exc)) from None
        except Exception:
            log.exception("control: method '%s' failed", name)
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"internal error in '{name}'; the ixyd log has the details",
            ) from None
        stream = result if isinstance(result, Stream) else None
        if stream is not None:
            result = stream.result
        try:
            if method.streaming != (stream is not None):
                raise TypeError("a streaming method returns a Stream, no other method does")
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            if stream is not None:
                stream._close()
            log.error("control: method '%s' returned a result that is not JSON: %s", name, exc)
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"internal error in '{name}'; the ixyd log has the details",
            ) from None
        if stream is not None:
            streams.append(stream)
        return result

    def _authorize(self, method: _Method, peer: Peer) -> None:
        if peer.uid in (ROOT_UID, self._owner_uid):
            return
        owner = _user_name(self._owner_uid)
        if method.mutating:
            message = (
                f"permission denied: '{method.name}' changes the daemon; only root and "
                f"{owner} (the user ixyd runs as) may call it; you are {_user_name(peer.uid)}"
            )
        elif self.socket_gid is not None and self.socket_gid in peer.groups:
            return
        else:
            group = (
                f"members of group {_group_name(self.socket_gid)} (the control socket's group)"
                if self.socket_gid is not None
                else "nobody else (the control socket has no group)"
            )
            message = (
                f"permission denied: '{method.name}' is for root, {owner} and {group}; "
                f"you are {_user_name(peer.uid)}, groups {sorted(peer.groups)}"
            )
        self._log_budget.log(
            peer.uid, logging.WARNING, "control: refused '%s' to %s", method.name, peer
        )
        raise RpcError(ErrorCode.UNAUTHORIZED, message)

    # ------------------------------------------------------------------ life cycle
    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def client_count(self) -> int:
        """Connections being served now."""
        return len(self._clients)

    @property
    def longest_step(self) -> tuple[float, float]:
        """The longest one unit of a client's work (decoding a line, one request) has
        held the server thread since start: (wall-clock seconds, the thread's CPU
        seconds). What another client may wait per uid with work waiting (_FairTurns)."""
        if self._turns is None:
            return 0.0, 0.0
        return self._turns.longest_step, self._turns.longest_step_cpu

    def serve(self) -> None:
        """Start serving on the server thread; return once the socket accepts connections.
        Raises ControlError if the socket cannot be set up (another ixyd listens on the
        path, the path is not a socket, permissions)."""
        if self._closed or self._thread is not None:
            raise RuntimeError("a ControlServer serves once: make a new one")
        if self._listen_socket is None:
            self._listen_socket = self._bind()
        self.socket_gid = self._socket_file_gid()
        self._thread = threading.Thread(target=self._run, name="ixyd-control", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            self._closed = True
            raise ControlError(
                f"control server on {self.path}: {self._startup_error}"
            ) from self._startup_error
        log.info(
            "control: serving on %s%s", self.path, " (socket-activated)" if self.activated else ""
        )

    def close(self) -> None:
        """Stop serving: close every connection and the socket, remove the socket file if
        this server created it. Idempotent. May be called from a handler (the shutdown
        method): the server thread then ends after the handler's reply is sent."""
        self._closed = True
        thread, loop = self._thread, self._loop
        if thread is None:
            self._release_socket()
            return
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(self._request_close)
        if threading.current_thread() is thread:
            return
        thread.join(CLOSE_TIMEOUT + 1.0)
        if thread.is_alive():
            log.warning("control: the server thread did not stop within %g s", CLOSE_TIMEOUT)
        self._thread = None

    def _request_close(self) -> None:
        if self._closing is not None:
            self._closing.set()

    def check_not_running(self) -> None:
        """ControlError if another process listens on this server's socket path (its
        instance is running); a stale socket file is removed. For a daemon to call before
        it touches its devices; serve() checks again. Nothing to do for a socket systemd
        handed over."""
        if self.activated:
            return
        try:
            self._remove_stale_socket()
        except OSError as exc:
            raise ControlError(f"cannot check the control socket {self.path}: {exc}") from exc

    def _bind(self) -> socket.socket:
        assert self.path is not None
        directory = os.path.dirname(self.path) or "."
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=RUN_DIR_MODE, exist_ok=True)
                os.chmod(directory, RUN_DIR_MODE)  # makedirs' mode is subject to the umask
            self._remove_stale_socket()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ControlError(f"cannot create the control socket at {self.path}: {exc}") from exc
        try:
            sock.bind(self.path)
            st = os.stat(self.path)
            self._created = (st.st_dev, st.st_ino)
            # connect() fails until listen(), so nobody gets in before the mode is right
            os.chmod(self.path, self.socket_mode)
            if self.socket_group is not None:
                os.chown(self.path, -1, self._resolve_group(self.socket_group))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            self._unlink_created()
            raise ControlError(f"cannot create the control socket at {self.path}: {exc}") from exc
        return sock

    @staticmethod
    def _resolve_group(group: int | str) -> int:
        if isinstance(group, int):
            return group
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ControlError(f"socket group '{group}' does not exist (groupadd it)") from None

    def _remove_stale_socket(self) -> None:
        """Remove a socket file nobody listens on (left by a killed ixyd); refuse to touch
        anything else."""
        assert self.path is not None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket: remove it or move it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(STALE_PROBE_TIMEOUT)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            log.info("control: removing the stale socket %s (nothing listens on it)", self.path)
            os.unlink(self.path)
            return
        except TimeoutError:  # a listener whose backlog is full: alive
            raise ControlError(
                f"{self.path} is in use by a process that is not accepting; is another ixyd "
                "instance of this name running?"
            ) from None
        else:
            holder = peer_of(probe).pid
            raise ControlError(
                f"another process (pid {holder}) is listening on {self.path}: this ixyd "
                "instance is already running; stop it first"
            )
        finally:
            probe.close()

    def _socket_file_gid(self) -> int | None:
        if self.path is None:
            return None
        try:
            return os.stat(self.path).st_gid
        except OSError:
            return None

    def _unlink_created(self) -> None:
        """Remove the socket file if it is still the one this server bound."""
        if self._created is None or self.path is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._created:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._created = None

    def _release_socket(self) -> None:
        if self._listen_socket is not None:
            self._listen_socket.close()
        self._unlink_created()

    # ------------------------------------------------------------------ the server thread
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve_until_closed())
        except BaseException as exc:
            if self._ready.is_set():
                log.exception("control: the server stopped on an unexpected error")
            else:
                self._startup_error = exc
        finally:
            self._ready.set()
            loop.close()
            self._release_socket()

    async def _serve_until_closed(self) -> None:
        self._closing = asyncio.Event()
        if self._closed:  # close() came before the loop ran
            return
        self._turns = _FairTurns(first=frozenset({ROOT_UID, self._owner_uid}))
        turns = asyncio.ensure_future(self._turns.serve())
        server = await asyncio.start_unix_server(
            self._client_connected,
            sock=self._listen_socket,
            # readline() takes a separator found at index `limit` (a line of limit + 1
            # bytes): one less makes max_line the whole line's bytes, newline included
            limit=self.max_line - 1,
            backlog=LISTEN_BACKLOG,
        )
        self._ready.set()
        try:
            await self._closing.wait()
        finally:
            server.close()
            await self._end_connections()
            turns.cancel()
            self._log_budget.flush()

    async def _end_connections(self) -> None:
        """Cancel every connection; abort those still open after CLOSE_TIMEOUT."""
        connections = dict(self._connections)
        if not connections:
            return
        for task in connections:
            task.cancel()
        _, pending = await asyncio.wait(connections, timeout=CLOSE_TIMEOUT)
        for task in pending:
            connections[task].transport.abort()
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)

    async def _client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            try:
                pid, uid, gid = _credentials(writer.get_extra_info("socket"))
            except OSError as exc:
                self._log_budget.log(
                    -1, logging.INFO, "control: dropping a connection without credentials: %s", exc
                )
                return
            refusal = self._admission_refusal(uid)
            if refusal is not None:
                self._log_budget.log(
                    uid,
                    logging.WARNING,
                    "control: refused a connection of pid %d uid %d: %s",
                    pid,
                    uid,
                    refusal,
                )
                writer.write(_encode(_error(None, ErrorCode.BUSY, f"{refusal}; try again later")))
                return
            self._clients[task] = uid
            self._clients_of[uid] = self._clients_of.get(uid, 0) + 1
            await self._converse(reader, writer, _peer(pid, uid, gid))
        except asyncio.CancelledError:
            pass  # the server is closing
        except Exception:
            log.exception("control: a connection failed")
        finally:
            uid = self._clients.pop(task, None)
            if uid is not None:
                self._clients_of[uid] -= 1
                if not self._clients_of[uid]:
                    del self._clients_of[uid]
            await self._close_connection(writer)
            del self._connections[task]

    def _admission_refusal(self, uid: int) -> str | None:
        """Why a new connection of `uid` is refused, or None. Root and the daemon's own
        uid may use every slot; the others share all but `reserved_clients` of them, at
        most `max_clients_per_uid` each, so that no group member can lock root out."""
        total = len(self._clients)
        if total >= self.max_clients:
            return f"too many clients ({total} connected, the limit)"
        if uid in (ROOT_UID, self._owner_uid):
            return None
        others = sum(n for u, n in self._clients_of.items() if u not in (ROOT_UID, self._owner_uid))
        shared = self.max_clients - self.reserved_clients
        if others >= shared:
            return (
                f"too many clients ({others} connections of users other than root and the "
                f"daemon's, the limit)"
            )
        mine = self._clients_of.get(uid, 0)
        if mine >= self.max_clients_per_uid:
            return f"too many connections of uid {uid} ({mine}, the limit per user)"
        return None

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
        # that arrives as its inner task finishes (gh-86296), and close() would hang.
        # drain() waits while more than max_unsent bytes of replies are unsent (and until
        # a quarter of that is left): only then is the client's next line read and worked on
        writer.transport.set_write_buffer_limits(high=self.max_unsent)
        assert self._turns is not None
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    line = await reader.readline()
            except TimeoutError:
                self._log_budget.log(
                    peer.uid,
                    logging.INFO,
                    "control: closing the connection of %s: idle %g s",
                    peer,
                    self.idle_timeout,
                )
                return
            except ValueError:  # the line outgrew the StreamReader limit
                self._log_budget.log(
                    peer.uid,
                    logging.WARNING,
                    "control: %s sent a line over %d bytes; closing",
                    peer,
                    self.max_line,
                )
                await self._refuse_oversized(reader, writer)
                return
            except OSError:  # reset by the peer
                return
            if not line:
                return
            streams: list[Stream] = []
            try:
                reply = await self._turns.run(peer.uid, self._answer_steps(line, peer, streams))
                if reply is not None:
                    writer.write(reply)
                    try:
                        async with asyncio.timeout(self.idle_timeout):
                            await writer.drain()
                    except TimeoutError:
                        self._log_budget.log(
                            peer.uid,
                            logging.INFO,
                            "control: closing the connection of %s: it reads no replies",
                            peer,
                        )
                        writer.transport.abort()  # its unread replies would never drain
                        return
                    except OSError:
                        return
                if streams:  # the stream is the rest of this connection
                    await self._stream(streams[0], reader, writer, peer)
                    return
            finally:
                for stream in streams:
                    stream._close()
            if not line.endswith(b"\n"):  # the peer shut down its side mid-line
                return

    async def _stream(
        self, stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer
    ) -> None:
        """Send a Stream's notifications until its end; see Stream for what ends it early."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def wake_up() -> None:  # from the producer's thread
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(wake.set)

        stream._attach(wake_up)
        listener: asyncio.Future | None = asyncio.ensure_future(reader.read(1))
        waiter: asyncio.Future | None = None
        try:
            while True:
                wake.clear()
                messages, last = stream._take()
                if messages:
                    writer.write(b"".join(_encode(m) for m in messages))
                    try:
                        async with asyncio.timeout(self.idle_timeout):
                            await writer.drain()
                    except TimeoutError:
                        log.info("control: closing the stream to %s: it reads nothing", peer)
                        writer.transport.abort()
                        return
                    except OSError:
                        return
                    stream._sent(len(messages))
                if last:
                    return
                if listener is None:  # asked to stop: the producer's end comes soon
                    async with asyncio.timeout(STREAM_END_TIMEOUT):
                        await wake.wait()
                    continue
                waiter = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait(
                    {listener, waiter}, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                waiter = None
                if listener in done:
                    try:
                        data = listener.result()
                    except (OSError, ValueError):
                        data = b""
                    listener = None
                    if not data:  # EOF: the client is gone
                        return
                    log.info("control: %s asked to stop its stream", peer)
                    stream._stop()
        except TimeoutError:
            log.warning("control: a stream to %s did not end within %g s", peer, STREAM_END_TIMEOUT)
        finally:  # also when the server closes and cancels this connection
            for pending in (listener, waiter):
                if pending is not None:
                    pending.cancel()

    async def _refuse_oversized(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer REQUEST_TOO_LARGE, then swallow what the client is still sending: closing
        with unread data would reset the connection and lose the answer."""
        writer.write(
            _encode(
                _error(
                    None,
                    ErrorCode.REQUEST_TOO_LARGE,
                    f"request line longer than {self.max_line} bytes; closing the connection",
                )
            )
        )
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(DISCARD_TIMEOUT):
                await writer.drain()
                writer.write_eof()
                swallowed = 0
                while swallowed < DISCARD_LIMIT:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    swallowed += len(chunk)

    @staticmethod
    async def _close_connection(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
        except (TimeoutError, asyncio.CancelledError):
            # a peer that reads nothing keeps the buffer full; at shutdown the server
            # cancels connection tasks, also while they wait here: abort, don't re-raise
            writer.transport.abort()
        except Exception:  # already reset by the peer
            pass


# ---------------------------------------------------------------------------- ixyd's methods
FORWARD_MODES = ("port", "reflect", "drop", "tap", "generate")
MIN_FRAME = 60  # bytes without the FCS: the Ethernet minimum of 64 on the wire
MAX_FRAME = 1514  # bytes without the FCS: no jumbo frames in the data path

_PORT_FILTER = {"port": Param(str, required=False)}
CAPTURE_MIN_SNAPLEN = 14  # an Ethernet header
CAPTURE_MAX_SNAPLEN = 2048  # a capture slot holds a whole receive buffer (IXYD_CAPTURE_DATA)


@dataclass(frozen=True)
class MethodSpec:
    """The parameters and the mutating flag of one method of ixyd's control API;
    streaming methods answer with a Stream (register(..., streaming=True))."""

    params: dict[str, Param]
    mutating: bool
    streaming: bool = False


#: ixyd's control API (docs/control.md): what `ixyd-ctl` sends. The service registers
#: its handler for each: server.register(name, handler, params_schema=spec.params,
#: mutating=spec.mutating). Cross-parameter rules (set_forward's per-mode parameters)
#: are the handler's to check.
IXYD_METHODS: dict[str, MethodSpec] = {
    "status": MethodSpec({}, mutating=False),
    "ports": MethodSpec({}, mutating=False),
    "stats": MethodSpec(_PORT_FILTER, mutating=False),
    "link": MethodSpec(_PORT_FILTER, mutating=False),
    "get_forward": MethodSpec(_PORT_FILTER, mutating=False),
    "set_forward": MethodSpec(
        {
            "port": Param(str),
            "mode": Param(str, choices=FORWARD_MODES),
            "to": Param(str, required=False),
            "swap_mac": Param(bool, required=False),
            "ifname": Param(str, required=False),
            "netns": Param(str, required=False),
            "addresses": Param(list, required=False),
            "mtu": Param(int, required=False),
            "size": Param(int, required=False, minimum=MIN_FRAME, maximum=MAX_FRAME),
            "rate": Param(int, required=False, minimum=0),
            "count": Param(int, required=False, minimum=0),
        },
        mutating=True,
    ),
    "reset_stats": MethodSpec(_PORT_FILTER, mutating=True),
    "set_promisc": MethodSpec({"port": Param(str), "on": Param(bool)}, mutating=True),
    "shutdown": MethodSpec({}, mutating=True),
    "reload": MethodSpec({}, mutating=True),  # re-read the configuration file (SIGHUP)
    # mutating: it hands out the traffic's content, which group members may not read
    "capture": MethodSpec(
        {
            "port": Param(str),
            "count": Param(int, required=False, minimum=0),
            "duration": Param(float, required=False, minimum=0),
            "snaplen": Param(
                int, required=False, minimum=CAPTURE_MIN_SNAPLEN, maximum=CAPTURE_MAX_SNAPLEN
            ),
        },
        mutating=True,
        streaming=True,
    ),
    # A test aid, not for production: make a worker hang (`stall`: its loop spins without
    # polling), so that the systemd watchdog kills and restarts the instance.
    "inject_fault": MethodSpec(
        {
            "fault": Param(str, choices=("stall", "remove")),
            "worker": Param(int, required=False, minimum=0),  # stall: which worker
            "port": Param(str, required=False),  # remove: which model port
        },
        mutating=True,
    ),
}
