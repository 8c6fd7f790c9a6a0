"""The kernel exception path: a TAP interface and the thread that bridges it to a worker.

`TapInterface` is a Linux TAP device (Ethernet frames, no packet-information header) whose
file descriptor this process holds; pyroute2 sets its MAC, MTU and state and can move it
into a network namespace. `TapBridge` is a host thread on one RX queue's
`ExceptionChannel`:

    wire ─▶ worker ─to_host─▶ bridge ─write─▶ TAP fd ─▶ kernel stack
    wire ◀─ worker ◀─to_wire─ bridge ◀─read── TAP fd ◀─ kernel stack

Buffer ownership follows `ixyd.worker`: the bridge never allocates or frees. A frame from
the wire is written to the TAP straight from its DMA buffer and handed back with
`give_back`; a frame from the kernel is read straight into an empty buffer from
`take_empty` and handed over with `push`. Buffers the worker does not take yet (its rings
are full) stay with the bridge and are offered again on the next round.

What the bridge drops, it counts (`TapBridge.stats`); it never waits for the worker:
  drop_tap_full    the TAP write would block (EAGAIN)
  drop_tap_error   the TAP write failed otherwise (EIO while the interface is down)
  drop_no_buffer   a kernel frame arrived while the worker had no empty buffer to lend
  drop_oversize    a kernel frame longer than a 2048-byte buffer (MTU set above 2034)

Short frames: the kernel hands a TAP frames as short as 42 bytes (an ARP request); an
Ethernet frame is at least 60 bytes without FCS. The 82599 would pad them itself
(HLREG0.TXPADEN, 82599 datasheet 8.2.3.22.8, which `ixgbe.py` sets), but the bridge pads
with zeros anyway: it costs nothing in a buffer that already holds 2048 bytes, the
worker's from_host byte counters then match what goes on the wire, and no driver or model
configuration has to be right for a runt never to leave the port.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from .drivers.rings import PKT_DATA_SIZE
from .errors import ConfigError, IxydError
from .worker import MIN_FRAME, ExceptionChannel, packet_view

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet-information header: the fd carries bare frames
IFNAMSIZ = 16  # <linux/if.h>: 15 characters and the NUL
ETH_HEADER = 14
MAX_MTU = PKT_DATA_SIZE - ETH_HEADER  # a frame from the kernel must fit one buffer
OVERFLOW_BYTES = 65536  # catches (and measures) frames longer than a buffer; tun's limit
BRIDGE_STATS_FIELDS = (
    "to_kernel",
    "to_kernel_bytes",
    "from_kernel",
    "from_kernel_bytes",
    "padded",
    "drop_tap_full",
    "drop_tap_error",
    "drop_no_buffer",
    "drop_oversize",
)


class TapError(IxydError):
    """A TAP interface could not be created, configured or removed."""


def _check_mac(mac: str | bytes | None) -> str | None:
    if mac is None:
        return None
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ConfigError(f"a MAC address is 6 bytes, got {len(mac)}")
        return ":".join(f"{b:02x}" for b in mac)
    parts = mac.split(":")
    try:
        octets = [int(p, 16) for p in parts if len(p) == 2]
    except ValueError:
        octets = []
    if len(parts) != 6 or len(octets) != 6:
        raise ConfigError(f"a MAC address looks like 02:00:00:00:00:01, got {mac!r}")
    if octets[0] & 1:
        raise ConfigError(f"{mac} is a multicast address; an interface needs a unicast one")
    return mac.lower()


class TapInterface:
    """A TAP interface whose frames this process reads and writes on a non-blocking fd.

    The interface lives as long as the fd: `close` (or the process ending) removes it.
    """

    def __init__(self, name: str, fd: int, netns: str | None):
        self.name, self.fd, self.netns = name, fd, netns
        self.closed = False

    @classmethod
    def create(
        cls,
        name: str,
        *,
        mac: str | bytes | None = None,
        mtu: int = 1500,
        netns: str | None = None,
        up: bool = True,
    ) -> TapInterface:
        """Create TAP interface `name`, set its MAC (None: the kernel's random one) and MTU
        (bytes of IP packet, 68..2034 so a frame fits one buffer), move it into network
        namespace `netns` (a name under /var/run/netns; None: stay in ours) and set it up.

        Raises ConfigError for a bad name, MAC or MTU, and TapError when the name is
        taken, /dev/net/tun is missing, we lack CAP_NET_ADMIN, or the namespace does not
        exist. Nothing is left behind when it raises."""
        if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
            raise ConfigError(f"not a usable interface name: {name!r}")
        if len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(
                f"interface name {name!r} is {len(name.encode())} bytes; Linux allows at most "
                f"{IFNAMSIZ - 1}"
            )
        mac = _check_mac(mac)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= MAX_MTU:
            raise ConfigError(f"MTU must be 68..{MAX_MTU} (a frame fits 2048 bytes), got {mtu!r}")
        if netns is not None and not os.path.exists(f"/var/run/netns/{netns}"):
            raise TapError(f"network namespace {netns!r} does not exist (ip netns add {netns})")
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=name):
                raise TapError(f"interface {name!r} already exists; pick another name")
        if netns is not None and _lookup(netns, name):
            raise TapError(f"interface {name!r} already exists in network namespace {netns!r}")
        fd = _open_tap(name)
        tap = cls(name, fd, None)
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=name)[0]
                settings = {"mtu": mtu} | ({"address": mac} if mac else {})
                ipr.link("set", index=index, **settings)
                if netns is not None:
                    ipr.link("set", index=index, net_ns_fd=netns)
            tap.netns = netns
            if up:
                tap.set_up(True)
        except NetlinkError as exc:
            tap.close()
            raise TapError(f"cannot configure TAP interface {name!r}: {exc}") from exc
        except BaseException:
            tap.close()
            raise
        return tap

    def set_up(self, up: bool = True) -> None:
        """Set the interface administratively up or down (in its namespace)."""
        with _netlink(self.netns) as nl:
            nl.link("set", index=self.index, state="up" if up else "down")

    @property
    def index(self) -> int:
        """The interface index in its namespace; TapError if it is gone."""
        found = _lookup(self.netns, self.name)
        if not found:
            where = f" in network namespace {self.netns!r}" if self.netns else ""
            raise TapError(f"TAP interface {self.name!r} no longer exists{where}")
        return found[0]

    @property
    def exists(self) -> bool:
        """Whether the interface is still there (False once closed or its netns removed)."""
        if self.netns is not None and not os.path.exists(f"/var/run/netns/{self.netns}"):
            return False
        return bool(_lookup(self.netns, self.name))

    def close(self) -> None:
        """Remove the interface: closing the fd of a non-persistent TAP unregisters it."""
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        if self.exists:  # someone made it persistent: delete it explicitly
            with _netlink(self.netns) as nl:
                nl.link("del", index=self.index)

    def __enter__(self) -> TapInterface:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"<TapInterface {self.name}{where} fd={self.fd}>"


def _open_tap(name: str) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)") from None
    except PermissionError:
        raise TapError(
            f"cannot open {TUN_DEVICE}: TAP interfaces need root or CAP_NET_ADMIN"
        ) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise TapError(f"creating TAP {name!r} needs CAP_NET_ADMIN") from None
        if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EEXIST):
            raise TapError(f"interface {name!r} already exists (or is another kind)") from None
        raise TapError(f"TUNSETIFF for {name!r} failed: {exc.strerror}") from None
    return fd


def _netlink(netns: str | None):
    return NetNS(netns) if netns is not None else IPRoute()


def _lookup(netns: str | None, name: str) -> list[int]:
    with _netlink(netns) as nl:
        return nl.link_lookup(ifname=name)


class TapBridge:
    """A thread moving frames between `channel` (an RX queue's exception path) and `tap`.

    batch: frames per direction per round (at most a quarter of the channel's ring, so
    what the bridge holds always fits back into it). idle_wait: seconds the thread sleeps
    in poll() when a round moved nothing; it bounds both the latency of a frame from the
    wire while idle and how long `stop` takes.
    """

    def __init__(
        self,
        channel: ExceptionChannel,
        tap: TapInterface,
        *,
        batch: int = 32,
        idle_wait: float = 0.001,
        name: str | None = None,
    ):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch must be a positive integer, got {batch!r}")
        if not 0 < idle_wait <= 1:
            raise ConfigError(f"idle_wait must be in (0, 1] seconds, got {idle_wait!r}")
        self.channel, self.tap = channel, tap
        self.batch = max(1, min(batch, channel.size // 4))
        self.idle_wait = idle_wait
        self.name = name or f"ixyd-tap-{tap.name}"
        self._counts = dict.fromkeys(BRIDGE_STATS_FIELDS, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._empty: list = []  # lent by the worker, not yet filled
        self._outgoing: list = []  # filled from the kernel, not yet taken by the worker
        self._done: list = []  # written to the kernel (or dropped), not yet taken back
        self._overflow = bytearray(OVERFLOW_BYTES)
        self._starved = False  # the last round found no empty buffer
        self.error: BaseException | None = None

    # -- running
    def start(self) -> None:
        """Start the thread (it binds the channel's host side until it ends)."""
        if self._thread is not None:
            return
        if self.tap.closed:
            raise RuntimeError(f"{self.tap!r} is closed")
        self._stop.clear()
        self.error = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread, handing every buffer it holds back to the worker first (which
        must still be running to take them if its rings are full). Bounded by about
        idle_wait plus one round; TimeoutError if the thread does not end in `timeout`."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"TAP bridge {self.name!r} did not stop within {timeout} s")
        self._thread = None
        if self.held:
            log.warning(
                "TAP bridge %s kept %d buffers: the worker took no more", self.name, self.held
            )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def held(self) -> int:
        """Buffers the bridge holds now (0 after a clean stop)."""
        return len(self._empty) + len(self._outgoing) + len(self._done)

    @property
    def stats(self) -> dict[str, int]:
        """Frames and bytes each way, zero-padded runts, and drops by reason (see module)."""
        return dict(self._counts) | {"held": self.held}

    def __enter__(self) -> TapBridge:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.tap.fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                moved = self._to_kernel() + self._from_kernel()
                if not moved:
                    # nothing to do: wait for the kernel (frames from the wire have no fd
                    # to wake us, so this also paces how often the ring is looked at)
                    waiting = self._outgoing or self._starved  # for the worker, not the fd
                    poller.modify(self.tap.fd, select.POLLERR if waiting else select.POLLIN)
                    poller.poll(self.idle_wait * 1000)
        except BaseException as exc:  # reported through .error; buffers still go back
            self.error = exc
            log.exception("TAP bridge %s failed", self.name)
        finally:
            self._hand_back()

    def _to_kernel(self) -> int:
        """Write what the worker received for the host to the TAP, then return the buffers."""
        packets = self.channel.pop(self.batch)
        for packet in packets:
            try:
                os.write(self.tap.fd, packet_view(packet))
                self._counts["to_kernel"] += 1
                self._counts["to_kernel_bytes"] += packet.len
            except BlockingIOError:
                self._counts["drop_tap_full"] += 1
            except OSError:
                self._counts["drop_tap_error"] += 1
        self._done += packets
        if self._done:
            del self._done[: self.channel.give_back(self._done)]
        return len(packets)

    def _from_kernel(self) -> int:
        """Read frames from the TAP into lent buffers and hand them to the worker."""
        if self._outgoing:  # back-pressure: the worker's TX side is full; read nothing
            del self._outgoing[: self.channel.push(self._outgoing)]
            if self._outgoing:
                return 0
        frames = 0
        while frames < self.batch:
            if not self._empty:
                self._empty = self.channel.take_empty(self.batch)
            if not self._empty:
                # The worker refills the empty ring every round it is in exception mode:
                # give it one idle_wait, then discard, or the readable fd would keep us
                # spinning (and stale frames would go out once buffers come back).
                if self._starved and self._discard_one():
                    self._counts["drop_no_buffer"] += 1
                    frames += 1
                    continue
                self._starved = True
                break
            self._starved = False
            packet = self._empty[-1]
            try:
                got = os.readv(self.tap.fd, [packet_view(packet, PKT_DATA_SIZE), self._overflow])
            except BlockingIOError:
                break
            frames += 1
            if got > PKT_DATA_SIZE:
                self._counts["drop_oversize"] += 1
                continue  # the buffer stays empty for the next frame
            self._empty.pop()
            if got < MIN_FRAME:
                packet_view(packet, MIN_FRAME)[got:] = bytes(MIN_FRAME - got)
                self._counts["padded"] += 1
            packet.len = max(got, MIN_FRAME)
            self._counts["from_kernel"] += 1
            self._counts["from_kernel_bytes"] += packet.len
            self._outgoing.append(packet)
        if self._outgoing:
            del self._outgoing[: self.channel.push(self._outgoing)]
        return frames

    def _discard_one(self) -> bool:
        try:
            os.readv(self.tap.fd, [self._overflow])
            return True
        except BlockingIOError:
            return False

    def _hand_back(self, timeout: float = 0.5) -> None:
        """Give every held buffer back (frames not yet sent are lost); retries while the
        worker drains its `returned` ring, for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self._done += self._outgoing + self._empty
        self._outgoing, self._empty = [], []
        while self._done:
            del self._done[: self.channel.give_back(self._done)]
            if not self._done or time.monotonic() > deadline:
                break
            time.sleep(0.001)
