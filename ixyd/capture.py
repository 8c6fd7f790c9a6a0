"""Packet capture: frames a worker receives, mirrored into a ring and written as pcap.

The worker's side is C (datapath.h, "Capture"): while a queue's capture is armed, the
worker copies every batch it receives on that queue into the queue's `CaptureRing`, one
pcap record per slot, before it handles the batch. A full ring drops the *copies* (counted
in `dropped`); the frames are forwarded as if nothing were armed, and an unarmed queue
pays one load and one predictable branch per batch.

The Python side is a `CaptureSession`: a thread that arms the rings of one port's RX
queues, drains them every POLL_INTERVAL, merges the queues' records by timestamp and
hands pcap bytes to a sink (the control server streams them to ixyd-ctl, which writes the
file: the daemon never opens the user's file). It stops after `count` frames, after
`duration` seconds or when told to, and then disarms.

One session per ring at a time (a ring has one consumer); the service answers BUSY to a
second capture of a port. A ring is allocated on its queue's first capture and kept until
the worker closes: after a disarm the worker may still be copying the batch it holds. Each
session stamps its own number into the ring, so a later session skips those copies.

File format: classic pcap with nanosecond timestamps (magic 0xa1b23c4d; tshark, tcpdump
and scapy read it), LINKTYPE_ETHERNET, frames without FCS, `incl_len` cut to the snap
length and `orig_len` the frame's length. Timestamps are CLOCK_REALTIME read once per
received batch (all frames of a batch share it): they say when the worker polled the
frames, not when they arrived on the wire.
"""

from __future__ import annotations

import base64
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._datapath import ffi, lib
from .errors import ConfigError

log = logging.getLogger(__name__)

# pcap file format (IETF draft-ietf-opsawg-pcap; tcpdump's pcap-savefile(5))
PCAP_MAGIC_NS = 0xA1B23C4D  # nanosecond timestamps
PCAP_VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
PCAP_FILE_HEADER = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs,
#                                               snaplen, network (host order: little endian)
PCAP_RECORD_HEADER = struct.Struct("<IIII")  # ts_sec, ts_nsec, incl_len, orig_len

MAX_SNAPLEN = lib.IXYD_CAPTURE_DATA  # a slot holds a whole receive buffer
MIN_SNAPLEN = 14  # an Ethernet header
# slots per RX queue (8.5 MiB of ordinary memory): 20 ms of frames at 200k frames/s, so
# the drain thread may wait that long for a CPU that spinning workers share with it
DEFAULT_RING = 4096
POLL_INTERVAL = 0.002  # seconds between drains of empty rings
CHUNK_BYTES = 32 * 1024  # pcap bytes per sink message: base64 keeps a line under 48 KiB
PROGRESS_INTERVAL = 1.0  # seconds between progress messages (also a heartbeat)
_RECORD_MAX = PCAP_RECORD_HEADER.size + MAX_SNAPLEN


def pcap_file_header(snaplen: int) -> bytes:
    """The 24-byte header of a nanosecond pcap file of Ethernet frames."""
    return PCAP_FILE_HEADER.pack(PCAP_MAGIC_NS, *PCAP_VERSION, 0, 0, snaplen, LINKTYPE_ETHERNET)


def pcap_records(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split pcap record bytes (no file header) into (ts_ns, incl_len, orig_len, frame)."""
    out, offset = [], 0
    while offset < len(data):
        sec, nsec, incl, orig = PCAP_RECORD_HEADER.unpack_from(data, offset)
        start = offset + PCAP_RECORD_HEADER.size
        out.append((sec * 1_000_000_000 + nsec, incl, orig, data[start : start + incl]))
        offset = start + incl
    return out


class CaptureRing:
    """The mirror ring of one RX queue (`size` slots of IXYD_CAPTURE_DATA bytes, ordinary
    memory). The worker fills it while armed; one consumer drains it."""

    def __init__(self, size: int = DEFAULT_RING):
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size & (size - 1)
            or not 2 <= size <= 65536
        ):
            raise ConfigError(f"capture ring size must be a power of two in 2..65536, got {size}")
        self.size = size
        self._slots = ffi.new("struct ixyd_capture_slot[]", size)
        self.pointer = ffi.new("struct ixyd_capture *")
        if lib.ixyd_capture_init(self.pointer, self._slots, size):
            raise ConfigError(f"cannot lay out a capture ring of {size} slots")
        self._out = ffi.new("uint8_t[]", CHUNK_BYTES + _RECORD_MAX)
        self._frames = ffi.new("uint32_t *")

    def begin(self, snaplen: int) -> int:
        """Start a new session (before arming): returns its number."""
        self.pointer.snaplen = snaplen
        self.pointer.session = (self.pointer.session + 1) & 0xFFFFFFFF
        return self.pointer.session

    def drain(
        self, session: int, max_frames: int, max_bytes: int = CHUNK_BYTES
    ) -> tuple[bytes, int]:
        """Take up to max_frames records of `session` (about max_bytes of them): returns the
        pcap record bytes and the number of records."""
        if max_frames <= 0:
            return b"", 0
        size = lib.ixyd_capture_drain(
            self.pointer,
            session,
            self._out,
            min(max_bytes, CHUNK_BYTES) + _RECORD_MAX,
            min(max_frames, 0xFFFFFFFF),
            self._frames,
        )
        return bytes(ffi.buffer(self._out, size)), self._frames[0]

    @property
    def pending(self) -> int:
        """Slots written and not yet drained (any session)."""
        return (self.pointer.head - self.pointer.tail) & 0xFFFFFFFF

    @property
    def stats(self) -> dict[str, int]:
        """captured: copies the worker made; dropped: copies it dropped (ring full)."""
        return {"captured": self.pointer.captured, "dropped": self.pointer.dropped}


class CaptureSource:
    """What a session captures from: one RX queue and the worker polling it. `arm()` and
    `disarm()` publish the queue's ring to the worker, or withdraw it, without waiting."""

    def __init__(self, worker: Any, rx_queue: Any):
        self.worker, self.rx_queue = worker, rx_queue
        self.ring: CaptureRing = worker.capture_ring(rx_queue)

    def arm(self) -> None:
        self.worker.set_capture(self.rx_queue, self.ring)

    def disarm(self) -> None:
        self.worker.set_capture(self.rx_queue, None)


Sink = Callable[[str, dict], bool]  # (event, params) -> False when nobody listens any more


class CaptureSession:
    """Capture what `sources` receive into pcap bytes handed to `sink`.

    sink(event, params) is called from the session's thread and may block (a slow reader:
    the rings then fill and count their drops). Events: "data" {"data": base64 pcap bytes,
    "frames": records in it} (the first one starts with the file header), "progress"
    {"frames", "dropped", "elapsed_s"} every PROGRESS_INTERVAL, and finally "end"
    {"frames", "dropped", "reason": "count" | "duration" | "stopped" | "error",
    "message"?}. count: frames to write, 0 = no limit; duration: seconds, 0 = no limit.
    on_done runs on the session thread after the rings are disarmed and the end is sent.
    """

    def __init__(
        self,
        sources: Sequence[CaptureSource],
        sink: Sink,
        *,
        count: int = 0,
        duration: float = 0.0,
        snaplen: int = MAX_SNAPLEN,
        name: str = "ixyd-capture",
        on_done: Callable[[], None] | None = None,
    ):
        if not sources:
            raise ConfigError("a capture needs at least one RX queue")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"count must be an integer >= 0, got {count!r}")
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0:
            raise ConfigError(f"duration must be a number of seconds >= 0, got {duration!r}")
        if (
            isinstance(snaplen, bool)
            or not isinstance(snaplen, int)
            or not MIN_SNAPLEN <= snaplen <= MAX_SNAPLEN
        ):
            raise ConfigError(
                f"snaplen must be {MIN_SNAPLEN}..{MAX_SNAPLEN} bytes, got {snaplen!r}"
            )
        self.sources = list(sources)
        self.sink, self.count, self.duration, self.snaplen = sink, count, duration, snaplen
        self.on_done, self.name = on_done, name
        self.frames = 0  # records handed to the sink
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._sessions: list[int] = []
        self._dropped_before: list[int] = []

    # -- control
    def start(self) -> None:
        """Arm every source and start draining."""
        for source in self.sources:
            self._sessions.append(source.ring.begin(self.snaplen))
            self._dropped_before.append(source.ring.pointer.dropped)
        for source in self.sources:
            source.arm()
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Ask the session to end (it disarms, sends "end" and calls on_done); no waiting."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the session's thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def dropped(self) -> int:
        """Copies the rings dropped since this session armed them (ring full)."""
        return sum(
            s.ring.pointer.dropped - before
            for s, before in zip(self.sources, self._dropped_before, strict=True)
        )

    # -- the thread
    def _run(self) -> None:
        message = None
        try:
            self._capture()
        except Exception as exc:  # reported to the client in "end"; the daemon goes on
            log.exception("capture failed")
            self.reason, message = "error", f"capture failed: {exc}"
        finally:
            for source in self.sources:
                source.disarm()
        if self.reason is None:  # stopped or timed out: the copies made until the disarm
            self._drain_and_send(until_empty=True)
            self.reason = self._why_stopped()
        end = {"frames": self.frames, "dropped": self.dropped, "reason": self.reason}
        if message:
            end["message"] = message
        try:
            self.sink("end", end)
        except Exception:
            log.exception("capture: sending the end failed")
        if self.on_done is not None:
            self.on_done()

    def _capture(self) -> None:
        header = pcap_file_header(self.snaplen)
        if not self._send(header, 0):
            return
        next_progress = self._started + PROGRESS_INTERVAL
        while not self._stop.is_set():
            if self.count and self.frames >= self.count:
                self.reason = "count"
                return
            if self.duration and time.monotonic() - self._started >= self.duration:
                return
            got = self._drain_and_send()
            if got is None:  # the sink is gone
                return
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + PROGRESS_INTERVAL
                progress = {
                    "frames": self.frames,
                    "dropped": self.dropped,
                    "elapsed_s": round(now - self._started, 3),
                }
                if not self.sink("progress", progress):
                    self._stop.set()
                    return
            if not got:
                self._stop.wait(POLL_INTERVAL)

    def _why_stopped(self) -> str:
        if self.count and self.frames >= self.count:
            return "count"
        if self._stop.is_set():
            return "stopped"
        return "duration"

    def _drain_and_send(self, until_empty: bool = False) -> int | None:
        """Drain each ring once (until they are empty with until_empty) and send what came;
        returns the records sent, None if the sink is gone."""
        sent = 0
        share = max(CHUNK_BYTES // len(self.sources), 1)  # a message stays about CHUNK_BYTES
        while True:
            remaining = self.count - self.frames if self.count else 1 << 32
            parts, n = [], 0
            for source, session in zip(self.sources, self._sessions, strict=True):
                data, got = source.ring.drain(session, remaining - n, share)
                if got:
                    parts.append(data)
                    n += got
            if not n:
                return sent
            if not self._send(parts[0] if len(parts) == 1 else _merge(parts), n):
                return None
            sent += n
            if not until_empty:
                return sent

    def _send(self, data: bytes, frames: int) -> bool:
        ok = self.sink("data", {"data": base64.b64encode(data).decode("ascii"), "frames": frames})
        if ok:
            self.frames += frames
        else:
            self._stop.set()
        return ok


def _offsets(data: bytes):
    """(start, end) of each pcap record in `data`."""
    offset = 0
    while offset < len(data):
        incl = PCAP_RECORD_HEADER.unpack_from(data, offset)[2]
        end = offset + PCAP_RECORD_HEADER.size + incl
        yield offset, end
        offset = end


def _merge(parts: list[bytes]) -> bytes:
    """Records of several queues in timestamp order (a stable sort: each queue's own order
    is kept among equal timestamps)."""
    records = []
    for data in parts:
        for start, end in _offsets(data):
            sec, nsec = struct.unpack_from("<II", data, start)
            records.append(((sec, nsec), data[start:end]))
    records.sort(key=lambda r: r[0])
    return b"".join(r[1] for r in records)
