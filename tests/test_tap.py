"""The TAP exception path with real kernel traffic, on two model ports joined by a cable:

    netns 1 ─ TAP 1 ═ bridge ═ exception(A) ─ port A ══ cable ══ port B ─ exception(B)
                                                        ═ bridge ═ TAP 2 ─ netns 2

Every frame either kernel sends crosses both bridges, the worker (in exception mode on both
RX queues) and the model's wire, so ARP, UDP both ways and a TCP stream prove the path in
both directions. Needs root and /dev/net/tun; each test makes its own namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import pytest
from hosttools import (
    BIN,
    CABLED_CONFIG,
    Daemon,
    assert_clean_exit,
    network_namespaces,
    python_in,
    run_in,
    wait_until,
)

from ixyd.drivers.config import PortConfig
from ixyd.drivers.ixgbe import IxgbePort
from ixyd.errors import ConfigError
from ixyd.model import ModelNic
from ixyd.tap import TapBridge, TapError, TapInterface
from ixyd.worker import ForwardingTable, Worker

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)

FAST = dict(reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.005)
# Port A's link comes up only once B, its cable peer, is initialised too: do not wait for it
CONFIG = PortConfig(rx_ring=256, tx_ring=512, pool_size=2048, link_timeout=0.05, drop_en=False)
MAC1, MAC2 = "02:00:00:00:aa:01", "02:00:00:00:aa:02"
IP1, IP2 = "10.214.0.1", "10.214.0.2"


@pytest.fixture
def namespaces():
    """Two fresh network namespaces without IPv6 (no MLD or router solicitations)."""
    with network_namespaces("ixydtap") as names:
        yield names


def tap_name() -> str:
    return f"ixt{uuid.uuid4().hex[:8]}"


class Path:
    """netns 1 ↔ TAP 1 ↔ port A ↔ cable ↔ port B ↔ TAP 2 ↔ netns 2, through one worker."""

    def __init__(self, ns1: str, ns2: str):
        self.ns1, self.ns2 = ns1, ns2
        self.nic = ModelNic(2, mode="thread", **FAST)
        self.nic.connect(*self.nic.ports)
        self.a, self.b = (IxgbePort(p, CONFIG) for p in self.nic.ports)
        wait_until(lambda: self.a.link()[0] and self.b.link()[0], what="the cable's link")
        self.table = ForwardingTable()
        self.rx = [self.a.rx_queues[0], self.b.rx_queues[0]]
        self.tx = [self.a.tx_queues[0], self.b.tx_queues[0]]
        self.worker = Worker(self.table, self.rx, self.tx, exception_queues=self.rx)
        for rxq, txq in zip(self.rx, self.tx, strict=True):
            self.table.set(rxq, "exception", tx=txq)
        self.taps = [
            TapInterface.create(tap_name(), mac=MAC1, netns=ns1),
            TapInterface.create(tap_name(), mac=MAC2, netns=ns2),
        ]
        for tap, ip in zip(self.taps, (IP1, IP2), strict=True):
            run_in(tap.netns, "ip", "addr", "add", f"{ip}/24", "dev", tap.name)
        self.bridges = [
            TapBridge(self.worker.exception(rxq), tap)
            for rxq, tap in zip(self.rx, self.taps, strict=True)
        ]
        self.worker.start()
        for bridge in self.bridges:
            bridge.start()
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for bridge in self.bridges:
            bridge.stop()  # before the worker: it takes back what the bridges hold
        self.worker.close()
        for port in (self.a, self.b):
            port.shutdown()
        self.nic.close()
        for tap in self.taps:
            tap.close()


@pytest.fixture
def path(namespaces):
    p = Path(*namespaces)
    yield p
    p.close()


UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({ip!r}, {port}))
s.settimeout(15)
print("ready", flush=True)
got = []
while len(got) < {count}:
    got.append(s.recv(4096).decode())
print(" ".join(got), flush=True)
"""

UDP_SENDER = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range({count}):
    s.sendto(("%s-%d" % ({tag!r}, i)).encode(), ({ip!r}, {port}))
    time.sleep(0.002)
"""


def udp_exchange(sender_ns: str, receiver_ns: str, ip: str, tag: str, count: int = 20) -> list:
    receiver = python_in(receiver_ns, UDP_RECEIVER.format(ip=ip, port=9999, count=count))
    try:
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
        run_in(
            sender_ns,
            sys.executable,
            "-c",
            UDP_SENDER.format(ip=ip, port=9999, count=count, tag=tag),
        )
        out, err = receiver.communicate(timeout=20)
    finally:
        receiver.kill()
    assert receiver.returncode == 0, err
    return out.split()


TCP_SERVER = """
import hashlib, socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(({ip!r}, {port}))
srv.listen(1)
srv.settimeout(30)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(65536):
    digest.update(chunk)
    total += len(chunk)
conn.sendall(digest.hexdigest().encode())  # data back the other way, then EOF
conn.close()
print(total, digest.hexdigest(), flush=True)
"""

TCP_CLIENT = """
import random, socket
data = random.Random(7).randbytes({size})
c = socket.create_connection(({ip!r}, {port}), timeout=30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
reply = b""
while chunk := c.recv(4096):
    reply += chunk
print(reply.decode(), flush=True)
"""


# --------------------------------------------------------------------------- interface


def test_tap_interface_is_configured_in_its_namespace_and_removed_on_close(namespaces):
    ns = namespaces[0]
    started = time.monotonic()
    tap = TapInterface.create(tap_name(), mac=MAC1, mtu=1400, netns=ns)
    created = time.monotonic() - started
    try:
        shown = run_in(ns, "ip", "-o", "link", "show", tap.name, capture_output=True, text=True)
        assert MAC1 in shown.stdout and "mtu 1400" in shown.stdout
        assert "UP" in shown.stdout and "state UNKNOWN" in shown.stdout  # up, fd attached
        assert tap.exists and created < 2.0
        with pytest.raises(TapError, match="already exists in network namespace"):
            TapInterface.create(tap.name, netns=ns)
    finally:
        tap.close()
    assert not tap.exists
    gone = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "link", "show", tap.name], capture_output=True
    )
    assert gone.returncode != 0
    tap.close()  # twice is fine


def test_kernel_drops_are_read_wherever_the_tap_was_moved(namespaces):
    """The kernel's drops at a TAP's full queue are found also after an administrator
    moved the TAP into a namespace by hand (ixyd never entered it)."""
    tap = TapInterface.create(tap_name(), up=False)  # down: our namespace sends it nothing
    try:
        subprocess.run(["ip", "link", "set", tap.name, "netns", namespaces[0]], check=True)
        run_in(namespaces[0], "ip", "link", "set", tap.name, "txqueuelen", "4", "up")
        flood = run_in(
            namespaces[0],
            sys.executable,
            "-c",
            textwrap.dedent(FLOOD),
            tap.name,
            "50",
            capture_output=True,
            text=True,
        )
        sent, refused = (int(n) for n in flood.stdout.split())
        assert (sent, refused) == (50, 46)  # nobody reads: 4 fit the queue
        assert tap.kernel_drops() == refused
    finally:
        tap.close()
    assert tap.kernel_drops() == refused  # the last value, once closed


def test_tap_interface_rejects_bad_requests_clearly(namespaces):
    bad = [
        (dict(name="x" * 16), ConfigError, "at most 15"),
        (dict(name="a/b"), ConfigError, "not a usable interface name"),
        (dict(name="ixtok", mtu=9000), ConfigError, "MTU must be"),
        (dict(name="ixtok", mac="01:00:5e:00:00:01"), ConfigError, "multicast"),
        (dict(name="ixtok", mac="02:00:00"), ConfigError, "MAC address"),
        (dict(name="ixtok", netns="ixyd-no-such-ns"), TapError, "does not exist"),
        (dict(name="lo"), TapError, "already exists"),
    ]
    for args, error, message in bad:
        name = args.pop("name")
        with pytest.raises(error, match=message):
            TapInterface.create(name, **args)
    assert not subprocess.run(["ip", "link", "show", "ixtok"], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- data path


def test_arp_and_udp_cross_the_datapath_both_ways(path):
    forward = udp_exchange(path.ns1, path.ns2, IP2, "fwd")  # the first one resolves ARP
    assert forward == [f"fwd-{i}" for i in range(20)]
    backward = udp_exchange(path.ns2, path.ns1, IP1, "back")
    assert backward == [f"back-{i}" for i in range(20)]
    for ns, peer, mac in ((path.ns1, IP2, MAC2), (path.ns2, IP1, MAC1)):
        neigh = run_in(ns, "ip", "neigh", "show", peer, capture_output=True, text=True).stdout
        assert mac in neigh, neigh  # each kernel learned the other's MAC through the path
    s1, s2 = (b.stats for b in path.bridges)
    assert s1["from_kernel"] >= 21 and s2["to_kernel"] >= 21  # 20 datagrams + ARP
    assert s2["from_kernel"] >= 21 and s1["to_kernel"] >= 21
    assert s1["padded"] >= 1 and s2["padded"] >= 1  # 42-byte ARP frames, padded to 60
    for s in (s1, s2):
        assert s["drop_write_full"] == s["drop_write_error"] == s["drop_oversize"] == 0, s
    for rxq in path.rx:
        qs = path.worker.queue_stats(rxq)
        assert qs["drop_exception_full"] == qs["drop_from_host"] == 0, qs


def test_tcp_stream_of_one_megabyte_arrives_byte_exact(path):
    size, port = 1 << 20, 5201
    server = python_in(path.ns2, TCP_SERVER.format(ip=IP2, port=port))
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        started = time.monotonic()
        client = run_in(
            path.ns1,
            sys.executable,
            "-c",
            TCP_CLIENT.format(ip=IP2, port=port, size=size),
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
        out, err = server.communicate(timeout=30)
    finally:
        server.kill()
    want = hashlib.sha256(random.Random(7).randbytes(size)).hexdigest()
    assert out.split() == [str(size), want], err
    assert client.stdout.strip() == want  # and the reply came back the other way
    s1 = path.bridges[0].stats
    assert s1["from_kernel_bytes"] > size and s1["drop_oversize"] == 0
    print(f"1 MiB over TCP through the TAP path in {elapsed:.2f} s; bridge 1: {s1}")


# --------------------------------------------------------------------------- lifecycle


def test_stop_is_bounded_and_every_buffer_comes_home(path):
    udp_exchange(path.ns1, path.ns2, IP2, "warm", count=5)  # buffers in use both ways
    for bridge in path.bridges:
        started = time.monotonic()
        bridge.stop()
        assert time.monotonic() - started < 0.2 and not bridge.running
        assert bridge.held == 0 and bridge.error is None
    path.close()
    for rxq, txq in zip(path.rx, path.tx, strict=True):
        pool = rxq.pool
        # after port shutdown every buffer is back on the free stack: nothing leaked
        assert pool.free_count == pool.count, (pool.free_count, pool.count, txq.in_flight)
    assert all(not tap.exists for tap in path.taps)


def test_frames_the_buffers_cannot_hold_are_dropped_and_counted(path):
    tap1 = path.taps[0]
    run_in(path.ns1, "ip", "link", "set", tap1.name, "mtu", "4000")  # past what a buffer holds
    run_in(path.ns1, "ip", "neigh", "replace", IP2, "lladdr", MAC2, "dev", tap1.name)
    big = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.setsockopt(socket.IPPROTO_IP, 10, 2); "  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
        f"s.sendto(bytes(3000), ({IP2!r}, 9)); s.sendto(bytes(1000), ({IP2!r}, 9))"
    )
    run_in(path.ns1, sys.executable, "-c", big)
    bridge = path.bridges[0]
    wait_until(lambda: bridge.stats["drop_oversize"] == 1, what="the oversize drop")
    wait_until(lambda: path.bridges[1].stats["to_kernel"] >= 1, what="the 1000-byte datagram")
    assert bridge.stats["from_kernel"] >= 1 and bridge.error is None


def test_frames_a_down_tap_refuses_are_counted_and_their_buffers_come_home(path):
    tap1, tap2 = path.taps
    run_in(path.ns1, "ip", "neigh", "replace", IP2, "lladdr", MAC2, "dev", tap1.name)
    run_in(path.ns2, "ip", "link", "set", tap2.name, "down")  # tun refuses writes: EIO
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range(5): s.sendto(b'x', ({IP2!r}, 9))"
    )
    run_in(path.ns1, sys.executable, "-c", send)
    bridge = path.bridges[1]
    wait_until(lambda: bridge.stats["drop_write_error"] >= 5, what="the refused writes")
    assert bridge.stats["to_kernel"] == 0 and bridge.error is None, bridge.stats
    for b in path.bridges:
        b.stop()
        assert b.held == 0 and b.error is None
    path.close()
    for rxq in path.rx:
        assert rxq.pool.free_count == rxq.pool.count  # nothing leaked


# --------------------------------------------------------------------------- the daemon
# The same path run by a real ixyd (hosttools.Daemon) on two model ports
# joined by a cable, steered with ixyd-ctl: what an administrator sees.


def daemon_with_cabled_ports(run_dir: str, daemons: list, metrics_port: int) -> Daemon:
    """A real ixyd on two cabled model ports (both in drop mode), its metrics on
    `metrics_port` (this clone's range)."""
    instance = f"ixt-tap-{uuid.uuid4().hex[:6]}"
    config = os.path.join(run_dir, f"{instance}.toml")
    with open(config, "w") as f:
        f.write(f'metrics = "127.0.0.1:{metrics_port}"\n')
        f.write(CABLED_CONFIG.format(instance=instance, state_dir=run_dir))
    d = Daemon(run_dir, [instance, "--config", config], instance)
    daemons.append(d)
    return d


PING = """
    import os, socket, struct, sys, time

    def checksum(data):
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF

    target, count, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    started, answered, first = time.monotonic(), set(), None
    deadline = started + count * interval + 30  # replies may be late on a loaded box
    for seq in range(count):
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"ixyd-tap"
        sock.sendto(header[:2] + struct.pack("!H", checksum(header)) + header[4:], (target, 0))
        until = time.monotonic() + interval if seq < count - 1 else deadline
        while len(answered) <= seq or seq == count - 1 and len(answered) < count:
            sock.settimeout(max(0.001, until - time.monotonic()))
            try:
                packet, (source, _) = sock.recvfrom(2048)
            except socket.timeout:
                break
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if kind == 0 and rid == ident and source == target:
                answered.add(rseq)
                first = first or time.monotonic() - started
    print(len(answered), first)
"""


def ping(netns: str, target: str, count: int = 5, interval: float = 0.2) -> tuple[int, float]:
    """ICMP echo requests from `netns`, `interval` s apart: how many were answered (each
    may take up to 30 s: the machine may be loaded), and the seconds to the first reply."""
    done = run_in(
        netns,
        sys.executable,
        "-c",
        textwrap.dedent(PING),
        target,
        str(count),
        str(interval),
        capture_output=True,
        text=True,
        timeout=90,
    )
    answered, first = done.stdout.split()
    return int(answered), float(first) if first != "None" else float("inf")


def ctl(d: Daemon, *args: str) -> dict:
    """ixyd-ctl --json against `d`, with room for netlink on a loaded machine (creating a
    TAP in a namespace forks and takes several round trips)."""
    done = subprocess.run(
        [str(BIN / "ixyd-ctl"), "-i", d.instance, "--timeout", "60", "--json", *args],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def fail_with_log(d: Daemon, message: str) -> None:
    counters = ctl(d, "stats")
    d.terminate()
    pytest.fail(f"{message}: {counters}\n{d.log}")


def link_of(netns: str, ifname: str) -> dict:
    shown = run_in(netns, "ip", "-j", "addr", "show", ifname, capture_output=True, text=True)
    link = json.loads(shown.stdout)[0]
    return {
        "index": link["ifindex"],
        "mac": link["address"],
        "mtu": link["mtu"],
        "addresses": sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]),
    }


def test_tap_survives_mode_switches_with_its_namespace_addresses_and_mtu(
    run_dir, daemons, namespaces
):
    """demo.0's TAP is placed by ixyd itself (--netns, --address, --mtu);
    demo.1's the way an administrator did it before (created by ixyd, then moved and
    addressed by hand). Ping crosses both; each port switches out of tap mode and back;
    ping again at once: every echo answered, both TAPs the same interfaces as before, in
    their namespaces with their addresses and MTU."""
    ns_a, ns_b = namespaces
    d = daemon_with_cabled_ports(run_dir, daemons, 21401)
    tap_a, tap_b = f"ixt-tap-a{uuid.uuid4().hex[:4]}", f"ixt-tap-b{uuid.uuid4().hex[:4]}"
    ip_a, ip_b = "10.218.0.1", "10.218.0.2"
    placed = ["--netns", ns_a, "--address", f"{ip_a}/24", "--mtu", "1400"]
    answer = ctl(d, "set-forward", "demo.0", "tap", tap_a, *placed)
    assert answer["forward"] == {
        "mode": "tap",
        "ifname": tap_a,
        "netns": ns_a,
        "addresses": [f"{ip_a}/24"],
        "mtu": 1400,
    }
    ctl(d, "set-forward", "demo.1", "tap", tap_b)
    subprocess.run(["ip", "link", "set", tap_b, "netns", ns_b], check=True)
    run_in(ns_b, "ip", "addr", "add", f"{ip_b}/24", "dev", tap_b)
    run_in(ns_b, "ip", "link", "set", tap_b, "mtu", "1400", "up")
    before = {ns_a: link_of(ns_a, tap_a), ns_b: link_of(ns_b, tap_b)}
    assert before[ns_a]["mtu"] == 1400 and before[ns_a]["addresses"] == [f"{ip_a}/24"]
    # static neighbours: on a loaded machine an ARP reply may come after the kernel gave
    # up on it (3 tries in 3 s), and the echo requests queued behind it would be lost
    for ns, dev, peer, other in ((ns_a, tap_a, ip_b, ns_b), (ns_b, tap_b, ip_a, ns_a)):
        mac = before[other]["mac"]
        run_in(ns, "ip", "neigh", "replace", peer, "lladdr", mac, "dev", dev, "nud", "permanent")
    answered, first_before = ping(ns_a, ip_b)
    if answered != 5:
        fail_with_log(d, f"{answered} of 5 echo requests answered before the switch")

    ctl(d, "set-forward", "demo.0", "reflect")
    ctl(d, "set-forward", "demo.1", "drop")
    assert link_of(ns_a, tap_a) == before[ns_a] and link_of(ns_b, tap_b) == before[ns_b]
    ctl(d, "set-forward", "demo.0", "tap", tap_a, *placed)  # as before
    ctl(d, "set-forward", "demo.1", "tap", tap_b)  # as the administrator left it
    answered, first = ping(ns_a, ip_b)
    if answered != 5:
        fail_with_log(d, f"{answered} of 5 echo requests answered after the switch")
    print(
        f"5 of 5 echo requests answered before the switch (the first in {first_before:.3f} s) "
        f"and right after switching back (the first in {first:.3f} s)"
    )
    assert link_of(ns_a, tap_a) == before[ns_a] and link_of(ns_b, tap_b) == before[ns_b]

    assert_clean_exit(d)
    for ns, ifname in ((ns_a, tap_a), (ns_b, tap_b)):
        gone = subprocess.run(["ip", "-n", ns, "link", "show", ifname], capture_output=True)
        assert gone.returncode != 0, f"TAP {ifname} outlived the daemon"


FLOOD = """
    import socket, sys
    ifname, count = sys.argv[1], int(sys.argv[2])
    SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20  # <linux/socket.h>, <linux/if_packet.h>:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)  # straight to the TAP's driver
    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)  # (a qdisc would pass it on anyway)
    s.bind((ifname, 0))
    frame = bytes.fromhex("020000000002" "020000000001" "88b5").ljust(60, b"\\0")
    refused = 0  # the TAP's queue was full: the driver dropped it and said so
    for _ in range(count):
        try:
            s.send(frame)
        except OSError:
            refused += 1
    print(count, refused)
"""


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_kernel_flood_that_overruns_the_bridge_is_accounted_for_exactly(
    run_dir, daemons, namespaces
):
    """A sender in the TAP's namespace floods it with frames for the wire,
    faster than the bridge and worker take them (the TAP's kernel queue is cut to 16
    frames so that the flood surely overruns it). Every frame sent is either forwarded
    or dropped under a reason, in `ixyd-ctl stats` and in the metrics, exactly."""
    ns_a = namespaces[0]
    metrics_port = 21402
    d = daemon_with_cabled_ports(run_dir, daemons, metrics_port)
    tap = f"ixt-tap-f{uuid.uuid4().hex[:4]}"
    ctl(d, "set-forward", "demo.0", "tap", tap, "--netns", ns_a)
    run_in(ns_a, "ip", "link", "set", tap, "txqueuelen", "16")
    flood = run_in(
        ns_a,
        sys.executable,
        "-c",
        textwrap.dedent(FLOOD),
        tap,
        "100000",
        capture_output=True,
        text=True,
        timeout=120,
    )
    sent, refused = (int(n) for n in flood.stdout.split())  # every frame went to the TAP
    reasons = ("drop_from_host", "tap_drop_oversize", "tap_drop_stopped", "tap_drop_kernel_queue")

    def accounted() -> int:
        c = d.counters()["demo.0"]
        return c["from_host"] + sum(c[r] for r in reasons)

    wait_until(lambda: accounted() == sent, timeout=30, what="every frame accounted for",
               detail=lambda: f"sent {sent}, {d.counters()['demo.0']}")
    counters = d.counters()["demo.0"]
    assert counters["tap_drop_kernel_queue"] > 0, counters  # the flood did overrun it
    assert counters["from_host"] > 0 and counters["tap_from_kernel"] >= counters["from_host"]
    print(f"sent {sent} ({refused} refused by the TAP's full queue): forwarded "
          f"{counters['from_host']}, dropped "
          + ", ".join(f"{r} {counters[r]}" for r in reasons))

    samples = metric_samples(metrics_port)
    dev = ("device", "demo.0")
    forwarded = sum(
        v
        for (name, labels), v in samples.items()
        if name == "ixyd_host_packets_total" and dev in labels
        and ("direction", "from_host") in labels
    )
    dropped = sum(
        v
        for (name, labels), v in samples.items()
        if name == "ixyd_transmit_drop_total" and dev in labels
    )
    assert forwarded + dropped == sent, [
        (k, v) for k, v in samples.items() if k[0] == "ixyd_transmit_drop_total"
    ]
    kernel_queue = samples[("ixyd_transmit_drop_total", (dev, ("reason", "tap_kernel_queue")))]
    assert kernel_queue == counters["tap_drop_kernel_queue"]
    assert_clean_exit(d)
