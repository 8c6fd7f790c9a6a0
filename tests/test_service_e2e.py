"""End to end against a real `ixyd` process: real kernel traffic through
tap mode, bad input on the real control socket, an unauthorized peer, and a clean SIGTERM.

Every test starts its own daemon (`python -m ixyd.service`) with its socket and state in a
fresh world-searchable temporary directory, and steers it with `ixyd-ctl` or raw clients.
Needs root (namespaces, TAP, clients forked as `nobody`).
"""

from __future__ import annotations

import grp  # noqa: F401  (ixyd-ctl's lazy imports, loaded before forking as nobody)
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hosttools import (
    CABLED_CONFIG,
    MAPPINGS_AT_EXIT,
    OPS_GID,
    RATE,
    Client,
    Daemon,
    as_nobody,
    assert_clean_exit,
    code,
    ctl_main,
    network_namespaces,
    python_in,
    raw_call,
    run_in,
    wait_until,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

@pytest.fixture
def demo(run_dir, daemons) -> Daemon:
    d = Daemon(run_dir, ["--demo", "--demo-rate", str(RATE), "--demo-frames", "0"])
    daemons.append(d)
    return d


# ---------------------------------------------------------------------------- 1. tap mode
@pytest.fixture
def namespaces():
    with network_namespaces("ixyde2e") as names:
        yield names


PING = """
    import os, socket, struct, sys, time

    def checksum(data):
        if len(data) % 2:
            data += b"\\0"
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    target, count = sys.argv[1], int(sys.argv[2])
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(2.0)
    answered = 0
    for seq in range(count):
        payload = b"ixyd-e2e-%04d" % seq
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        header = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq)
        sock.sendto(header + payload, (target, 0))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                packet, (source, _) = sock.recvfrom(2048)
            except socket.timeout:
                break
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if kind == 0 and rid == ident and rseq == seq and source == target:
                answered += icmp[8:] == payload
                break
    print(answered)
"""

TCP_SERVER = """
    import hashlib, socket
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("{ip}", 5201))
    server.listen(1)
    server.settimeout(20)
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.settimeout(20)
    digest, total = hashlib.sha256(), 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        digest.update(chunk)
        total += len(chunk)
    conn.sendall(digest.hexdigest().encode())  # and back the other way
    conn.close()
    print(total, digest.hexdigest())
"""

TCP_CLIENT = """
    import hashlib, os, socket
    data = os.urandom({size})
    conn = socket.create_connection(("{ip}", 5201), timeout=20)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            break
        answer += chunk
    print(len(data), hashlib.sha256(data).hexdigest(), answer.decode())
"""


def test_tap_mode_carries_ping_and_a_tcp_stream_between_namespaces(run_dir, daemons, namespaces):
    """netns A ─ TAP A ═ ixyd (demo.0 in tap mode) ═ cable ═ (demo.1 in tap mode) ═ TAP B ─
    netns B: ICMP echo and a 1 MiB TCP stream (its digest sent back) cross the daemon."""
    ns_a, ns_b = namespaces
    instance = f"tap{uuid.uuid4().hex[:6]}"
    config = Path(run_dir) / "cabled.toml"
    config.write_text(CABLED_CONFIG.format(instance=instance, state_dir=run_dir))
    d = Daemon(run_dir, [instance, "--config", str(config)], instance)
    daemons.append(d)
    assert all(p["link"]["up"] for p in d.json("ports")["ports"])

    taps = {"demo.0": f"ixa{uuid.uuid4().hex[:8]}", "demo.1": f"ixb{uuid.uuid4().hex[:8]}"}
    ips = {"demo.0": "10.215.0.1", "demo.1": "10.215.0.2"}
    for (port, ifname), ns in zip(taps.items(), (ns_a, ns_b), strict=True):
        # creating a TAP takes netlink round trips: allow for a loaded CI box
        answer = d.json("--timeout", "30", "set-forward", port, "tap", ifname)
        assert answer["forward"] == {"mode": "tap", "ifname": ifname}
        # the daemon keeps the TAP's fd; the interface moves to its namespace
        subprocess.run(["ip", "link", "set", ifname, "netns", ns], check=True)
        run_in(ns, "ip", "addr", "add", f"{ips[port]}/24", "dev", ifname)
        run_in(ns, "ip", "link", "set", ifname, "up")
        run_in(ns, "ip", "link", "set", "lo", "up")
    assert [p["forward"]["mode"] for p in d.json("get-forward")["ports"]] == ["tap", "tap"]

    ping = python_in(ns_a, PING.replace("sys.argv[1], int(sys.argv[2])", f"'{ips['demo.1']}', 5"))
    out, err = ping.communicate(timeout=30)
    assert ping.returncode == 0, err
    assert int(out) == 5, f"{out} of 5 echo requests answered"

    size = 1 << 20
    server = python_in(ns_b, TCP_SERVER.format(ip=ips["demo.1"]))
    helpers = [server]
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        client = python_in(ns_a, TCP_CLIENT.format(ip=ips["demo.1"], size=size))
        helpers.append(client)
        client_out, client_err = client.communicate(timeout=60)
        server_out, server_err = server.communicate(timeout=60)
    finally:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
    assert client.returncode == 0, client_err
    assert server.returncode == 0, server_err
    sent, sent_digest, echoed_digest = client_out.split()
    received, received_digest = server_out.split()
    assert int(sent) == int(received) == size
    assert sent_digest == received_digest == echoed_digest

    counters = d.counters()
    for port in ("demo.0", "demo.1"):
        assert counters[port]["to_host"] > 0 and counters[port]["from_host"] > 0, counters
    assert counters["demo.0"]["from_host"] > size // 1514  # the stream left through demo.0
    assert counters["demo.1"]["to_host"] > size // 1514  # and reached netns B via demo.1

    assert_clean_exit(d)
    for ifname, ns in zip(taps.values(), (ns_a, ns_b), strict=True):
        gone = subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "link", "show", ifname], capture_output=True
        )
        assert gone.returncode != 0, f"TAP {ifname} outlived the daemon"


TAP_WIRED_CONFIG = """\
instance = "{instance}"
state_dir = "{state_dir}"

[[port]]
address = "demo.0"
wire = "tap:{tap_a}"
forward = {{ mode = "port", to = "demo.1" }}

[[port]]
address = "demo.1"
wire = "tap:{tap_b}"
forward = {{ mode = "port", to = "demo.0" }}
"""


def test_model_ports_wired_to_kernel_taps_forward_between_namespaces(run_dir, daemons, namespaces):
    """netns A ─ TAP A ═ wire of model port demo.0 ═ ixyd forwarding ═ demo.1 ═ TAP B ─
    netns B: the model's wires themselves are TAP interfaces (`wire = "tap:..."`), so
    kernel traffic enters and leaves the model NICs as if from a cable."""
    ns_a, ns_b = namespaces
    instance = f"tw{uuid.uuid4().hex[:6]}"
    taps = [f"ixw{uuid.uuid4().hex[:8]}", f"ixw{uuid.uuid4().hex[:8]}"]
    config = Path(run_dir) / "tapwired.toml"
    config.write_text(
        TAP_WIRED_CONFIG.format(instance=instance, state_dir=run_dir, tap_a=taps[0], tap_b=taps[1])
    )
    d = Daemon(run_dir, [instance, "--config", str(config)], instance)
    daemons.append(d)
    ips = ["10.216.0.1", "10.216.0.2"]
    for ifname, ns, ip in zip(taps, (ns_a, ns_b), ips, strict=True):
        subprocess.run(["ip", "link", "set", ifname, "netns", ns], check=True)
        run_in(ns, "ip", "addr", "add", f"{ip}/24", "dev", ifname)
        run_in(ns, "ip", "link", "set", ifname, "up")
    assert all(p["link"]["up"] for p in d.json("ports")["ports"])

    ping = python_in(ns_a, PING.replace("sys.argv[1], int(sys.argv[2])", f"'{ips[1]}', 5"))
    out, err = ping.communicate(timeout=30)
    assert ping.returncode == 0, err
    assert int(out) == 5, f"{out} of 5 echo requests answered"
    counters = d.counters()
    for port in ("demo.0", "demo.1"):  # requests one way, replies the other, by the driver
        assert counters[port]["rx_packets"] >= 5 and counters[port]["forwarded"] >= 5, counters

    assert_clean_exit(d)
    for ifname, ns in zip(taps, (ns_a, ns_b), strict=True):
        gone = subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "link", "show", ifname], capture_output=True
        )
        assert gone.returncode != 0, f"TAP {ifname} outlived the daemon"


MULTIQUEUE_TAP_CONFIG = """\
instance = "{instance}"
state_dir = "{state_dir}"

[[port]]
address = "demo.0"
wire = "tap:{wire_tap}"
rx_queues = 2
forward = {{ mode = "tap", ifname = "{exception_tap}" }}
"""

TCP_FLOWS_SERVER = """
    import socket
    server = socket.socket()
    server.bind(("{ip}", 5202))
    server.listen(8)
    server.settimeout(20)
    print("ready", flush=True)
    for _ in range({flows}):
        conn, _ = server.accept()
        conn.settimeout(20)
        total = 0
        while chunk := conn.recv(65536):
            total += len(chunk)
        conn.sendall(str(total).encode())
        conn.close()
"""

TCP_FLOWS_CLIENT = """
    import socket
    answers = []
    for _ in range({flows}):  # each connection its own source port: its own RSS hash
        conn = socket.create_connection(("{ip}", 5202), timeout=20)
        conn.sendall(bytes(100_000))
        conn.shutdown(socket.SHUT_WR)
        answers.append(int(conn.recv(64)))
        conn.close()
    print(" ".join(map(str, answers)))
"""


def test_tap_mode_serves_every_rx_queue_of_a_port(run_dir, daemons, namespaces):
    """netns A ─ TAP (the model port's wire) ═ demo.0 with 2 RX queues in tap mode ═ TAP ─
    netns B: RSS spreads TCP connections over both queues; every one arrives whole, so
    both queues' exception channels reach the kernel."""
    ns_a, ns_b = namespaces
    instance = f"mq{uuid.uuid4().hex[:6]}"
    wire_tap, exception_tap = f"ixw{uuid.uuid4().hex[:8]}", f"ixe{uuid.uuid4().hex[:8]}"
    config = Path(run_dir) / "multiqueue.toml"
    config.write_text(
        MULTIQUEUE_TAP_CONFIG.format(
            instance=instance,
            state_dir=run_dir,
            wire_tap=wire_tap,
            exception_tap=exception_tap,
        )
    )
    d = Daemon(run_dir, [instance, "--config", str(config)], instance)
    daemons.append(d)
    ips = ["10.217.0.1", "10.217.0.2"]
    for ifname, ns, ip in zip((wire_tap, exception_tap), (ns_a, ns_b), ips, strict=True):
        subprocess.run(["ip", "link", "set", ifname, "netns", ns], check=True)
        run_in(ns, "ip", "addr", "add", f"{ip}/24", "dev", ifname)
        run_in(ns, "ip", "link", "set", ifname, "up")
    flows = 8
    server = python_in(ns_b, TCP_FLOWS_SERVER.format(ip=ips[1], flows=flows))
    helpers = [server]
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        client = python_in(ns_a, TCP_FLOWS_CLIENT.format(ip=ips[1], flows=flows))
        helpers.append(client)
        out, err = client.communicate(timeout=90)
        server.communicate(timeout=30)
    finally:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
    assert client.returncode == 0, err
    assert out.split() == ["100000"] * flows
    counters = d.counters()["demo.0"]
    assert counters["to_host"] > flows * 100_000 // 1514, counters
    assert counters["from_host"] > 0, counters
    assert_clean_exit(d)


# ---------------------------------------------------------------------------- 2. bad input
def traffic_moves(d: Daemon) -> None:
    """The demo traffic keeps flowing: every port's RX and forwarded counters increase."""
    before = d.counters()
    time.sleep(0.5)
    after = d.counters()
    for port in before:
        for name in ("rx_packets", "forwarded"):
            assert after[port][name] > before[port][name], (port, name, before, after)


def test_bad_input_gets_errors_and_the_daemon_and_its_traffic_carry_on(demo):
    traffic_moves(demo)
    clients = []
    try:
        idle = Client(demo.socket)  # connects and never sends anything
        clients.append(idle)

        c = Client(demo.socket)
        clients.append(c)
        c.send(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
        assert code(c.reply()) == -32700
        c.send(b"\xff\xfe\x80 not utf-8 \xc3\x28\n")
        assert code(c.reply()) == -32700
        c.send(b"[]\n")
        assert code(c.reply()) == -32600
        c.send(b'{"jsonrpc": "2.0", "id": 2}\n')
        assert code(c.reply()) == -32600
        assert code(c.call("no_such_method")) == -32601
        assert code(c.call("set_forward", {"port": 5, "mode": "drop"})) == -32602
        assert code(c.call("set_forward", {"port": "demo.0", "mode": "teleport"})) == -32602
        assert code(c.call("set_forward", {"port": "demo.0", "mode": "tap", "ifname": 7})) == -32602
        assert code(c.call("set_promisc", {"port": "demo.0", "on": "yes"})) == -32602
        assert code(c.call("stats", ["demo.0", "extra", "args"])) == -32602
        assert code(c.call("stats", {"port": "demo.9"})) == -32004
        assert "result" in c.call("status")  # the same connection still serves

        huge = Client(demo.socket)
        clients.append(huge)
        try:
            huge.send(b'{"jsonrpc": "2.0", "id": 1, "method": "status", "x": "' + b"A" * 300_000)
            huge.send(b'"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up while we are still sending: that is a refusal too
        reply = huge.reply()
        assert reply is None or code(reply) == -32005, reply
        assert huge.closed_by_server()

        assert demo.json("status")["state"] == "running"
        traffic_moves(demo)

        # 70 at once: the server serves up to its limit and refuses the rest with BUSY
        many = [Client(demo.socket) for _ in range(70)]
        clients.extend(many)
        for i, m in enumerate(many):
            m.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "status"}).encode() + b"\n")
        served = refused = 0
        for m in many:
            reply = m.reply()
            if reply is not None and "result" in reply:
                served += 1
            else:
                assert reply is None or code(reply) == -32003, reply
                refused += 1
        assert served + refused == 70
        assert refused >= 1, "70 clients were all served; the limit is 64"
        assert served >= 60, f"only {served} of 70 clients were served"
        for m in many:
            m.close()

        # the idle client has not blocked anyone, and everything still works
        assert demo.json("status")["state"] == "running"
        assert demo.ctl("set-forward", "demo.0", "port", "demo.1").returncode == 0
        traffic_moves(demo)
    finally:
        for client in clients:
            client.close()
    assert_clean_exit(demo)


# ---------------------------------------------------------------------------- 3. authorization
def test_unauthorized_peers_are_refused_and_group_members_may_only_read(run_dir, daemons):
    # the run directory hands its group to the socket, as RuntimeDirectory + Group= would
    os.chown(run_dir, 0, OPS_GID)
    os.chmod(run_dir, 0o2755)
    d = Daemon(run_dir, ["--demo", "--demo-rate", str(RATE), "--demo-frames", "0"])
    daemons.append(d)
    info = os.stat(d.socket)
    assert info.st_gid == OPS_GID and info.st_mode & 0o777 == 0o660

    member = [OPS_GID]
    promisc = [p["promisc"] for p in d.json("ports")["ports"]]
    # a member of the socket's group reads ...
    code_, out, err = as_nobody(ctl_main(d, "--json", "status"), member)
    assert code_ == 0, err
    assert json.loads(out)["state"] == "running"
    assert as_nobody(ctl_main(d, "stats"), member)[0] == 0
    # ... but may change nothing: -32001 on the wire, exit code 4 from ixyd-ctl
    code_, out, err = as_nobody(ctl_main(d, "set-forward", "demo.0", "drop"), member)
    assert code_ == 4, (out, err)
    assert "permission denied" in err, err
    reply = as_nobody(raw_call(d, "set_forward", {"port": "demo.0", "mode": "drop"}), member)
    assert reply["id"] == 7 and reply["error"]["code"] == -32001, reply
    for method, params in (
        ("shutdown", {}),
        ("reset_stats", {}),
        ("set_promisc", {"port": "demo.0", "on": True}),
    ):
        reply = as_nobody(raw_call(d, method, params), member)
        assert reply["error"]["code"] == -32001, (method, reply)

    # outside the group, nobody cannot even connect (socket mode 0660): exit code 4 too
    assert as_nobody(raw_call(d, "status", {})) == "EACCES"
    code_, out, err = as_nobody(ctl_main(d, "status"))
    assert code_ == 4, (out, err)

    # nothing changed, the daemon still runs, and root may change it
    assert d.json("get-forward")["ports"][0]["forward"] == {"mode": "port", "to": "demo.1"}
    assert [p["promisc"] for p in d.json("ports")["ports"]] == promisc
    stats = d.json("stats")["ports"][0]["counters"]
    assert stats["rx_packets"] > 0  # not reset by nobody's reset_stats
    assert d.json("status")["state"] == "running"
    d.ctl("set-forward", "demo.0", "drop")
    assert d.json("get-forward")["ports"][0]["forward"] == {"mode": "drop"}
    assert_clean_exit(d)


# ---------------------------------------------------------------------------- 4. SIGTERM
def test_a_second_start_of_a_running_instance_stops_before_the_devices(demo):
    """Starting an instance that already runs fails at once with a clear message and
    touches nothing: it never opens the ports (with VFIO, the first instance's group and
    NIC), never serves metrics, and the first instance runs on undisturbed."""
    second = subprocess.run(
        [sys.executable, "-m", "ixyd.service", "--demo"]
        + ["--run-dir", demo.run_dir, "--state-dir", demo.run_dir],
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = second.stdout + second.stderr
    assert second.returncode == 1, log
    assert f"(pid {demo.proc.pid}) is listening" in log and "already running" in log
    assert "bringing up" not in log and "metrics" not in log, log
    assert demo.json("status")["pid"] == demo.proc.pid
    traffic_moves(demo)
    assert_clean_exit(demo)


def test_sigterm_leaves_no_mapping_and_no_stale_socket(demo):
    wait_until(lambda: all(c["forwarded"] > 0 for c in demo.counters().values()), what="traffic")
    demo.ctl("set-forward", "demo.1", "generate", "--rate", "1000")  # a generator pool too
    time.sleep(0.2)
    started = time.monotonic()
    assert_clean_exit(demo)
    assert time.monotonic() - started < 10
    cards = MAPPINGS_AT_EXIT.findall(demo.log)
    assert [card for card, _, _ in cards] == ["demo"], demo.log
    # a second daemon binds the same path at once: nothing stale is in its way
    again = Daemon(demo.run_dir, ["--demo", "--demo-rate", str(RATE), "--demo-frames", "0"])
    try:
        assert again.json("status")["state"] == "running"
        assert_clean_exit(again)
    finally:
        again.kill()
