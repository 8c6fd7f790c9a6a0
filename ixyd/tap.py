"""The kernel exception path: a TAP interface and the thread that bridges it to a worker.

`TapInterface` is a Linux TAP device (Ethernet frames, no packet-information header) whose
file descriptor this process holds; pyroute2 sets its MAC, MTU, addresses and state and can
move it into a network namespace. `TapBridge` is a host thread on one RX queue's
`ExceptionChannel`:

    wire ─▶ worker ─to_host─▶ bridge ─write─▶ TAP fd ─▶ kernel stack
    wire ◀─ worker ◀─to_wire─ bridge ◀─read── TAP fd ◀─ kernel stack

Buffer ownership follows `ixyd.worker`: the bridge never allocates or frees. A frame from
the wire is written to the TAP straight from its DMA buffer and handed back with
`give_back`; a frame from the kernel is read straight into an empty buffer from
`take_empty` and handed over with `push`. Buffers the worker does not take yet (its rings
are full) stay with the bridge and are offered again on the next round.

The per-frame loops run in C (`ixyd_tap_bridge_step`, ixyd/native/datapath.c): one call,
with the GIL released, writes up to a batch of frames to the TAP and reads up to a batch
from it, on the channel's rings directly. The Python thread keeps the lifecycle (poll()
while idle, stop, hand back) and folds the C counts into `counts` after every call. With
the Python loop (one os.readv per frame and the lists around it) the bridge carried about
0.2 million frames per CPU-second; in C about 0.55 million, four fifths of it in the
kernel's read() and write() (docs/benchmarks.md, "TAP bridge").

What the bridge drops, it counts (`TapBridge.stats`, into a `counts` dict that outlives the
bridge, so a port's totals survive mode switches); towards the kernel it never waits:
  drop_write_full   a frame from the wire: the TAP write would block (EAGAIN)
  drop_write_error  a frame from the wire: the TAP write failed otherwise (EIO while the
                    interface is down)
  drop_oversize     a kernel frame longer than a 2048-byte buffer (MTU set above 2034)
  drop_stopped      a kernel frame read but not yet taken by the worker when the bridge
                    stopped (and the worker took no more within the stop's bound)

From the kernel it takes only what the worker can send: while the worker lends no empty
buffer (its pool is short, or it was not scheduled), or its TX side is full, the bridge
reads nothing and the frames wait in the TAP's own queue in the kernel (`tx_queue_len`
frames: 1000 unless set). What overflows that queue the kernel drops and counts as the
interface's `tx_dropped` (drivers/net/tun.c, tun_net_xmit); `TapInterface.kernel_drops`
reads it, so every frame the kernel sent towards the port is either taken by the worker or
counted under a reason. (Before, the bridge discarded kernel frames after one idle_wait
without buffers: a worker off the CPU for a millisecond cost frames the kernel queue could
have held, and those discards were shown nowhere.)

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
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from ._datapath import ffi, lib
from .drivers.rings import PKT_DATA_SIZE
from .errors import ConfigError, IxydError
from .worker import MIN_FRAME, ExceptionChannel

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int): fails once the interface is gone
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet-information header: the fd carries bare frames
IFNAMSIZ = 16  # <linux/if.h>: 15 characters and the NUL
ETH_HEADER = 14
MAX_MTU = PKT_DATA_SIZE - ETH_HEADER  # a frame from the kernel must fit one buffer
OVERFLOW_BYTES = 65536  # catches (and measures) frames longer than a buffer; tun's limit
MIN_MTU = 68  # the smallest MTU IPv4 allows (RFC 791)
BRIDGE_STATS_FIELDS = (
    "to_kernel",
    "to_kernel_bytes",
    "from_kernel",
    "from_kernel_bytes",
    "padded",
    "drop_write_full",
    "drop_write_error",
    "drop_oversize",
    "drop_stopped",
)
# Reading an interface's counters over rtnetlink (<linux/rtnetlink.h>, <linux/netlink.h>,
# <linux/if_link.h>, <linux/net_namespace.h>): an RTM_GETLINK request by name, in the
# namespace IFLA_TARGET_NETNSID names, answered by RTM_NEWLINK whose IFLA_STATS64 attribute
# is struct rtnl_link_stats64 (u64 rx_packets, tx_packets, rx_bytes, tx_bytes, rx_errors,
# tx_errors, rx_dropped, tx_dropped, ...). <linux/if_tun.h>: TUNGETDEVNETNS.
TUNGETDEVNETNS = 0x54E3  # _IO('T', 227): an fd of the namespace the TAP is in now
RTM_NEWLINK, RTM_GETLINK, RTM_NEWNSID, RTM_GETNSID = 16, 18, 88, 90
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
IFLA_IFNAME, IFLA_STATS64, IFLA_TARGET_NETNSID = 3, 23, 46
NETNSA_NSID, NETNSA_FD = 1, 3
NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
RTGENMSG = struct.Struct("=Bxxx")  # family, padded to the 4-byte netlink alignment
RTATTR = struct.Struct("=HH")  # len, type; attributes are 4-byte aligned
STATS64_TX_DROPPED = 7  # the 8th u64 of rtnl_link_stats64
NETLINK_REPLY_BYTES = 65536
NETLINK_READ_TIMEOUT = 1.0  # seconds: the kernel answers at once, or the socket is broken


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
        # kernel_drops: a netlink socket (in our namespace), opened on first use
        self._stats_socket: socket.socket | None = None
        self._stats_lock = threading.Lock()  # the control thread and a scrape may both ask
        self._stats_seq = 0
        self._last_kernel_drops = 0

    @classmethod
    def create(
        cls,
        name: str,
        *,
        mac: str | bytes | None = None,
        mtu: int | None = 1500,
        netns: str | None = None,
        addresses: Sequence[str] = (),
        up: bool = True,
    ) -> TapInterface:
        """Create TAP interface `name`, set its MAC (None: the kernel's random one) and MTU
        (bytes of IP packet, 68..2034 so a frame fits one buffer; None: the kernel's 1500),
        move it into network namespace `netns` (a name under /var/run/netns; None: stay in
        ours), add `addresses` ("10.0.0.1/24", "fd00::1/64") there and set it up.

        Raises ConfigError for a bad name, MAC, MTU or address, and TapError when the name
        is taken, /dev/net/tun is missing, we lack CAP_NET_ADMIN, the namespace does not
        exist or the kernel refuses an address. Nothing is left behind when it raises."""
        if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
            raise ConfigError(f"not a usable interface name: {name!r}")
        if len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(
                f"interface name {name!r} is {len(name.encode())} bytes; Linux allows at most "
                f"{IFNAMSIZ - 1}"
            )
        mac = _check_mac(mac)
        _check_mtu(mtu)
        addresses = [_check_address(a) for a in addresses]
        _check_netns(netns)
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=name):
                raise TapError(f"interface {name!r} already exists; pick another name")
        if netns is not None and _lookup(netns, name):
            raise TapError(f"interface {name!r} already exists in network namespace {netns!r}")
        fd = _open_tap(name)
        tap = cls(name, fd, None)
        try:
            if mac:
                with IPRoute() as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], address=mac)
            tap.configure(netns=netns, mtu=mtu, addresses=addresses, up=up)
        except BaseException:
            tap.close()
            raise
        return tap

    def configure(
        self,
        *,
        netns: str | None = None,
        mtu: int | None = None,
        addresses: Sequence[str] = (),
        up: bool = True,
    ) -> None:
        """Move the interface into network namespace `netns` (None: leave it where it is),
        set its MTU (None: leave it), add each of `addresses` it lacks (those it has, and
        any an administrator added, stay) and set it up (up=False: leave its state).

        Raises ConfigError for a bad MTU or address, TapError when the namespace does not
        exist, the interface is gone or the kernel refuses a setting."""
        _check_mtu(mtu)
        wanted = [_check_address(a) for a in addresses]
        _check_netns(netns)
        try:
            if netns is not None and netns != self.netns:
                with _netlink(self.netns) as nl:  # moving drops its addresses: first
                    nl.link("set", index=self.index, net_ns_fd=netns)
                self.netns = netns
            with _netlink(self.netns) as nl:
                index = self.index
                if mtu is not None:
                    nl.link("set", index=index, mtu=mtu)
                have = {
                    (a.get("IFA_ADDRESS"), a["prefixlen"]) for a in nl.get_addr(index=index)
                }
                for address in wanted:
                    if (str(address.ip), address.network.prefixlen) not in have:
                        nl.addr(
                            "add",
                            index=index,
                            address=str(address.ip),
                            prefixlen=address.network.prefixlen,
                        )
                if up:
                    nl.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise TapError(f"cannot configure TAP interface {self.name!r}: {exc}") from exc

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
    def attached(self) -> bool:
        """Whether our fd still carries the interface (False once someone deleted it, e.g.
        `ip link del`, wherever it was, or once closed); no netlink, any thread."""
        if self.closed:
            return False
        try:
            fcntl.ioctl(self.fd, TUNGETIFF, bytes(IFNAMSIZ + 2))
        except OSError:
            return False
        return True

    @property
    def exists(self) -> bool:
        """Whether the interface is still there (False once closed or its netns removed)."""
        if self.netns is not None and not os.path.exists(f"/var/run/netns/{self.netns}"):
            return False
        return bool(_lookup(self.netns, self.name))

    def kernel_drops(self) -> int:
        """Frames the kernel sent towards this interface and dropped because its queue was
        full (the interface's `tx_dropped`: nobody read them in time).

        Found wherever the interface is now, also after someone moved it into another
        namespace by hand: TUNGETDEVNETNS on our fd names its namespace, RTM_GETNSID gives
        that namespace's id as seen from ours, and RTM_GETLINK with IFLA_TARGET_NETNSID
        reads its counters from here (Linux 5.2; CAP_NET_ADMIN, no setns, no pyroute2
        event loop: any thread may call this). When that fails (closed, removed, renamed)
        the last value read."""
        with self._stats_lock:
            if self.closed:
                return self._last_kernel_drops
            try:
                if self._stats_socket is None:
                    self._stats_socket = socket.socket(
                        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                        socket.NETLINK_ROUTE,
                    )
                    self._stats_socket.settimeout(NETLINK_READ_TIMEOUT)
                stats = self._read_stats64()
            except OSError as exc:
                log.debug("TAP %s: cannot read its kernel counters: %s", self.name, exc)
                self._close_stats_socket()
                return self._last_kernel_drops
            self._last_kernel_drops = stats[STATS64_TX_DROPPED]
            return self._last_kernel_drops

    def _read_stats64(self) -> tuple[int, ...]:
        attrs = _rtattr(IFLA_IFNAME, self.name.encode() + b"\0")
        netns_fd = fcntl.ioctl(self.fd, TUNGETDEVNETNS)
        try:
            if os.fstat(netns_fd).st_ino != os.stat("/proc/self/ns/net").st_ino:
                attrs += _rtattr(IFLA_TARGET_NETNSID, struct.pack("=i", self._netns_id(netns_fd)))
        finally:
            os.close(netns_fd)
        kind, reply = self._ask(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attrs)
        if kind != RTM_NEWLINK:
            raise OSError(errno.EPROTO, f"unexpected netlink message type {kind}")
        stats = _find_rtattr(reply, IFINFOMSG.size, IFLA_STATS64)
        if stats is None:
            raise OSError(errno.EPROTO, "the kernel sent no IFLA_STATS64")
        return struct.unpack_from(f"={len(stats) // 8}Q", stats)

    def _netns_id(self, netns_fd: int) -> int:
        """The id our namespace knows namespace `netns_fd` by, assigning one if it has none
        (what `ip netns set` does; needs CAP_NET_ADMIN)."""
        fd_attr = _rtattr(NETNSA_FD, struct.pack("=I", netns_fd))
        for attempt in range(2):
            _, reply = self._ask(RTM_GETNSID, RTGENMSG.pack(socket.AF_UNSPEC) + fd_attr)
            found = _find_rtattr(reply, RTGENMSG.size, NETNSA_NSID)
            if found is not None and struct.unpack("=i", found[:4])[0] >= 0:
                return struct.unpack("=i", found[:4])[0]
            if attempt == 0:  # not assigned yet: let the kernel pick one
                nsid = _rtattr(NETNSA_NSID, struct.pack("=i", -1))
                self._ask(RTM_NEWNSID, RTGENMSG.pack(socket.AF_UNSPEC) + fd_attr + nsid, ack=True)
        raise OSError(errno.ENOENT, "the TAP's network namespace has no id here")

    def _ask(self, kind: int, payload: bytes, ack: bool = False) -> tuple[int, bytes]:
        """Send one rtnetlink request; (type, payload) of its answer. OSError for an error
        answer (an ack is the answer, error 0, when `ack`)."""
        self._stats_seq += 1
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        size = NLMSG_HEADER.size + len(payload)
        header = NLMSG_HEADER.pack(size, kind, flags, self._stats_seq, 0)
        self._stats_socket.send(header + payload)
        while True:  # skip answers to requests that timed out before
            reply = self._stats_socket.recv(NETLINK_REPLY_BYTES)
            length, got, _, seq, _ = NLMSG_HEADER.unpack_from(reply)
            if seq == self._stats_seq:
                break
        body = reply[NLMSG_HEADER.size : length]
        if got == NLMSG_ERROR:
            code = struct.unpack_from("=i", body)[0]
            if code:
                raise OSError(-code, os.strerror(-code))
        return got, body

    def _close_stats_socket(self) -> None:
        if self._stats_socket is not None:
            self._stats_socket.close()
            self._stats_socket = None

    def close(self) -> None:
        """Remove the interface: closing the fd of a non-persistent TAP unregisters it."""
        if self.closed:
            return
        with self._stats_lock:
            self.closed = True
            self._close_stats_socket()
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


def _rtattr(kind: int, value: bytes) -> bytes:
    attr = RTATTR.pack(RTATTR.size + len(value), kind) + value
    return attr + bytes(-len(attr) % 4)


def _find_rtattr(body: bytes, offset: int, kind: int) -> bytes | None:
    """The value of attribute `kind` among those from `offset` of a message body."""
    while offset + RTATTR.size <= len(body):
        size, found = RTATTR.unpack_from(body, offset)
        if size < RTATTR.size:
            return None
        if found == kind:
            return body[offset + RTATTR.size : offset + size]
        offset += (size + 3) & ~3
    return None


def _check_mtu(mtu: int | None) -> None:
    if mtu is None:
        return
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ConfigError(
            f"MTU must be {MIN_MTU}..{MAX_MTU} (a frame fits 2048 bytes), got {mtu!r}"
        )


def _check_address(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(address)
    except (TypeError, ValueError):
        raise ConfigError(
            f"an interface address looks like 10.0.0.1/24 or fd00::1/64, got {address!r}"
        ) from None


def _check_netns(netns: str | None) -> None:
    if netns is None:
        return
    if not isinstance(netns, str) or not netns or "/" in netns or netns in (".", ".."):
        raise ConfigError(f"a network namespace is a name under /var/run/netns, got {netns!r}")
    if not os.path.exists(f"/var/run/netns/{netns}"):
        raise TapError(f"network namespace {netns!r} does not exist (ip netns add {netns})")


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


def new_bridge_counts() -> dict[str, int]:
    """Zeroed counters for a TapBridge (BRIDGE_STATS_FIELDS)."""
    return dict.fromkeys(BRIDGE_STATS_FIELDS, 0)


class TapBridge:
    """A thread moving frames between `channel` (an RX queue's exception path) and `tap`.

    batch: frames per direction per round (at most a quarter of the channel's ring, so
    what the bridge holds always fits back into it). idle_wait: seconds the thread sleeps
    in poll() when a round moved nothing; it bounds both the latency of a frame from the
    wire while idle and how long `stop` takes. counts: the dict to count into (keys
    BRIDGE_STATS_FIELDS), so that the next bridge of the same queue carries on the totals.
    """

    def __init__(
        self,
        channel: ExceptionChannel,
        tap: TapInterface,
        *,
        batch: int = 32,
        idle_wait: float = 0.001,
        name: str | None = None,
        counts: dict[str, int] | None = None,
    ):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch must be a positive integer, got {batch!r}")
        if not 0 < idle_wait <= 1:
            raise ConfigError(f"idle_wait must be in (0, 1] seconds, got {idle_wait!r}")
        self.channel, self.tap = channel, tap
        self.batch = max(1, min(batch, channel.size // 4))
        self.idle_wait = idle_wait
        self.name = name or f"ixyd-tap-{tap.name}"
        self._counts = new_bridge_counts() if counts is None else counts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the per-frame loops run in C (datapath.h, "TAP bridge"): the state they keep, the
        # buffers the bridge holds and the counts not yet folded into self._counts
        self._native = ffi.new("struct ixyd_tap_bridge *")
        self._slots = ffi.new("struct ixyd_pkt *[]", 3 * channel.size)
        self._overflow = ffi.new("uint8_t[]", OVERFLOW_BYTES)
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
        b = self._native
        return b.n_empty + b.n_outgoing + b.n_done

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
        b = self._native
        try:
            self.channel.bind_host()  # the C code below is this thread's use of the rings
            # once per bridge: a restart keeps the buffers a stop could not hand back
            if b.x == ffi.NULL and lib.ixyd_tap_bridge_init(
                b,
                self.channel.pointer,
                self.tap.fd,
                self.batch,
                self._slots,
                self._overflow,
                OVERFLOW_BYTES,
                PKT_DATA_SIZE,
                MIN_FRAME,
            ):
                raise RuntimeError(f"TAP bridge {self.name!r}: bad native bridge parameters")
            while not self._stop.is_set():
                # one batch each way: wire -> TAP, then TAP -> wire (GIL released)
                moved = lib.ixyd_tap_bridge_step(b)
                self._fold_counts()
                if moved < 0:
                    raise OSError(-moved, f"reading TAP {self.tap.name}: {os.strerror(-moved)}")
                if not moved:
                    # nothing to do: wait for the kernel (frames from the wire have no fd
                    # to wake us, so this also paces how often the ring is looked at)
                    waiting = b.n_outgoing or b.starved  # for the worker, not the fd
                    poller.modify(self.tap.fd, select.POLLERR if waiting else select.POLLIN)
                    poller.poll(self.idle_wait * 1000)
        except BaseException as exc:  # reported through .error; buffers still go back
            self.error = exc
            log.exception("TAP bridge %s failed", self.name)
        finally:
            self._hand_back()

    def _fold_counts(self) -> None:
        """Add what the C loop counted since the last call to the totals, and zero it."""
        native = self._native.stats
        for name in BRIDGE_STATS_FIELDS:
            if value := getattr(native, name):
                self._counts[name] += value
                setattr(native, name, 0)

    def _hand_back(self, timeout: float = 0.5) -> None:
        """Hand frames read from the kernel to the worker (it sends them even after the
        queue left tap mode) and every other buffer back; retries while the worker drains
        its rings, for at most `timeout` seconds. Kernel frames it did not take by then are
        given back unsent and counted as drop_stopped."""
        b = self._native
        if b.x == ffi.NULL:  # never initialised: it holds nothing
            return
        deadline = time.monotonic() + timeout
        while lib.ixyd_tap_bridge_hand_back(b, 0) and b.n_outgoing:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        while lib.ixyd_tap_bridge_hand_back(b, 1) and time.monotonic() <= deadline:
            time.sleep(0.001)
        self._fold_counts()
