"""The daemon's face to systemd: readiness, status, start-timeout extension and a watchdog
that is fed only while the data path makes progress (sd_notify(3), systemd.service(5)).

    notifier = Notifier.from_environment()      # a no-op unless $NOTIFY_SOCKET is set
    notifier.extend_timeout(15)                 # a link wait may take this long
    notifier.ready(status_text(ports))          # once the workers poll and control serves
    watchdog = ProgressWatchdog(notifier, lambda: instance.workers)
    ... every main-loop round: notifier.status(...); watchdog.check()
    notifier.stopping()

The watchdog ping is sent from the main thread, but only when every running worker's
loop counter (`iterations`, published by the native loop in shared memory) advanced since
the previous ping: a worker stuck in its loop, or a main thread that hangs, stops the
pings and systemd kills and restarts the instance (WatchdogSec=, Restart=on-abnormal).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

USEC_PER_S = 1_000_000
SEND_TIMEOUT = 1.0  # seconds a notification may wait for room at systemd's end


class Notifier:
    """Sends sd_notify messages through `send` (NotifySocket.send); with send=None every
    method does nothing, which is what a daemon not started by systemd gets. A message
    that cannot be sent is logged as an error (once until one gets through again)."""

    def __init__(self, send: Callable[[str], Any] | None, watchdog_usec: int | None = None):
        self._send = send
        self.watchdog_usec = watchdog_usec
        self._failed: set[str] = set()  # keys of messages that failed since the last success
        self._failure = ""  # why the last one failed

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for: enabled when $NOTIFY_SOCKET is set (Type=notify),
        with the watchdog period from $WATCHDOG_USEC when $WATCHDOG_PID is ours or unset."""
        path = environ.get("NOTIFY_SOCKET")
        if not path:
            return cls(None)
        try:
            sender = NotifySocket(path)
        except OSError as exc:
            log.error("cannot open systemd's notify socket %s: %s; sending nothing", path, exc)
            return cls(None)
        return cls(sender.send, watchdog_usec(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self._send is not None

    @property
    def watchdog_period(self) -> float | None:
        """Seconds within which systemd wants a WATCHDOG=1, None without a watchdog."""
        return self.watchdog_usec / USEC_PER_S if self.watchdog_usec else None

    def notify(self, **fields: object) -> None:
        """Send one message of KEY=value lines (values must not contain newlines)."""
        if self._send is None:
            return
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            self._send(message)
        except OSError as exc:
            # Not debug: a lost WATCHDOG=1 gets the instance killed after WatchdogSec=, and
            # a lost READY=1 fails its start. Once per kind of message while sending
            # fails, not every second.
            if not fields.keys() <= self._failed:
                log.error(
                    "sd_notify %s failed: %s%s",
                    ", ".join(fields),
                    exc.strerror or exc,
                    "; without WATCHDOG=1 systemd kills the instance" * ("WATCHDOG" in fields),
                )
            self._failed |= fields.keys()
            self._failure = str(exc)
            return
        if self._failed:
            log.info("sd_notify works again (it failed with: %s)", self._failure)
            self._failed = set()

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def reloading(self) -> None:
        self.notify(RELOADING=1, STATUS="reloading the configuration")

    def stopping(self) -> None:
        self.notify(STOPPING=1, STATUS="stopping")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start (or stop) timeout fires."""
        self.notify(EXTEND_TIMEOUT_USEC=int(seconds * USEC_PER_S))

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)


class NotifySocket:
    """The datagram socket to systemd's $NOTIFY_SOCKET, opened once at start and kept.

    sd_notify(3) opens a socket per message, so a process that has run out of file
    descriptors cannot ping the watchdog (and systemd kills it for a hang it does not
    have). Opened once, the ping needs no descriptor. The protocol is sd_notify(3)'s: one
    datagram of newline-separated KEY=value assignments to the AF_UNIX socket the
    variable names, a leading '@' meaning the abstract namespace; systemd learns the
    sender from the credentials the kernel attaches (NotifyAccess=main)."""

    def __init__(self, path: str):
        if path.startswith("@"):
            self.address: str | bytes = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        else:  # vsock: came with systemd 254; Debian 12 has 252
            raise OSError(errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET address {path!r}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # a receiver that does not keep up (a full queue: net.unix.max_dgram_qlen) must
        # not hold up the main loop, which stops the daemon and feeds the watchdog
        self.sock.settimeout(SEND_TIMEOUT)

    def send(self, message: str) -> None:
        """Send one message; OSError if it cannot be sent."""
        self.sock.sendto(message.encode(), self.address)


def _one_line(value: object) -> str:
    return str(value).replace("\n", " ")


def watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """$WATCHDOG_USEC if it is meant for process `pid` (sd_watchdog_enabled(3)), else None."""
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


class ProgressWatchdog:
    """Feeds systemd's watchdog from the main loop while the workers make progress.

    `workers()` returns the instance's workers; each has `name`, `running`, `native_id`
    (its thread id) and `stats["iterations"]` (rounds of its poll loop). `check()` sends
    WATCHDOG=1 unless a running worker is hung: it did no round since the last ping
    although it had CPU time (a loop that spins without polling) or while it was not
    runnable (blocked). A worker that did nothing because it got no CPU at all, runnable
    but waiting for a CPU the whole time (an overloaded or shared machine), is not hung:
    restarting would not help it. The first hung check is logged with the worker's name.
    Without a watchdog (WatchdogSec= unset) `check()` does nothing.
    """

    def __init__(
        self,
        notifier: Notifier,
        workers: Callable[[], Iterable[Any]],
        thread_cpu: Callable[[int], tuple[str, int] | None] | None = None,
    ):
        self.notifier = notifier
        self.workers = workers
        self.thread_cpu = thread_cpu or _thread_cpu
        self._at_last_ping: dict[int, tuple[int, tuple[str, int] | None]] = {}
        self._last_ping = time.monotonic()
        self._reported: frozenset[str] = frozenset()

    def check(self) -> bool:
        """Ping unless a running worker is hung; returns whether it pinged."""
        if self.notifier.watchdog_period is None:
            return False
        now = {}
        for w in self.workers():
            if w.running:
                cpu = self.thread_cpu(w.native_id) if w.native_id is not None else None
                now[id(w)] = (w, w.stats["iterations"], cpu)
        hung = [
            w.name
            for key, (w, iterations, cpu) in now.items()
            if key in self._at_last_ping
            and iterations == self._at_last_ping[key][0]
            and _had_a_chance(self._at_last_ping[key][1], cpu)
        ]
        if hung:
            if frozenset(hung) != self._reported:
                self._reported = frozenset(hung)
                log.error(
                    "worker %s made no progress for %.1f s: withholding the watchdog ping",
                    ", ".join(hung),
                    time.monotonic() - self._last_ping,
                )
            return False
        self._reported = frozenset()
        # a starved worker keeps its old reference point: it must move on before long
        self._at_last_ping = {
            key: (iterations, cpu)
            if key not in self._at_last_ping or iterations != self._at_last_ping[key][0]
            else self._at_last_ping[key]
            for key, (_, iterations, cpu) in now.items()
        }
        self._last_ping = time.monotonic()
        self.notifier.watchdog()
        return True


def _had_a_chance(before: tuple[str, int] | None, now: tuple[str, int] | None) -> bool:
    """Whether a thread that made no progress between two looks could have: it got CPU
    time, or it was not waiting for a CPU (blocked). Unknown (no /proc entry): yes."""
    if before is None or now is None:
        return True
    state, ticks = now
    return ticks != before[1] or state != "R"


def _thread_cpu(tid: int) -> tuple[str, int] | None:
    """(state letter, user + system clock ticks) of a thread of this process (proc(5))."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[11]) + int(fields[12])


def status_text(
    ports: Iterable[tuple[str, bool, int, Mapping[str, float] | None, bool]],
) -> str:
    """STATUS= line: per port its name, link and receive/transmit rates, e.g.
    `card.0 link up 10G, rx 1.20 Mpps, tx 1.20 Mpps; card.1 link down; card.2 removed`.
    ports: (name, link up, speed in Mb/s, rates with rx_pps/tx_pps or None, NIC gone)."""
    parts = []
    for name, up, speed, rates, removed in ports:
        if removed:
            parts.append(f"{name} removed")
            continue
        text = f"{name} link {'up ' + _speed(speed) if up else 'down'}"
        if rates:
            text += f", rx {_rate(rates['rx_pps'])}, tx {_rate(rates['tx_pps'])}"
        parts.append(text)
    return "; ".join(parts) or "no ports"


def _speed(mbps: int) -> str:
    return f"{mbps // 1000}G" if mbps >= 1000 and mbps % 1000 == 0 else f"{mbps}M"


def _rate(pps: float) -> str:
    for factor, unit in ((1e6, "Mpps"), (1e3, "kpps")):
        if pps >= factor:
            return f"{pps / factor:.2f} {unit}"
    return f"{pps:.0f} pps"
