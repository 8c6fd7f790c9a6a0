"""`ixyd-ctl` as a user runs it (a subprocess) against a control server with stand-in
handlers that answer in the shapes docs/control.md documents, registered with the
schemas of ixyd.control.IXYD_METHODS: its tables, --json, the requests it sends, and
every exit code."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from ixyd import ctl
from ixyd.capture import pcap_file_header
from ixyd.control import FORWARD_MODES, IXYD_METHODS, ControlServer, ErrorCode, RpcError, Stream

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switches uid: needs root")

PORTS = [
    {
        "name": "demo.0",
        "address": "demo.0",
        "backend": "model",
        "driver": "ixgbe",
        "device": "82599ES 10-Gigabit SFI/SFP+",
        "mac": "02:1b:21:99:00:00",
        "link": {"up": True, "speed_mbps": 10000},
        "promisc": True,
        "rx_queues": 2,
        "tx_queues": 2,
        "forward": {"mode": "port", "to": "demo.1"},
    },
    {
        "name": "demo.1",
        "address": "demo.1",
        "backend": "model",
        "driver": "ixgbe",
        "device": "82599ES 10-Gigabit SFI/SFP+",
        "mac": "02:1b:21:99:00:01",
        "link": {"up": False, "speed_mbps": 0},
        "promisc": False,
        "rx_queues": 1,
        "tx_queues": 1,
        "forward": {"mode": "reflect", "swap_mac": True},
    },
]
COUNTERS = {
    "demo.0": {
        "rx_packets": 12_345_678,
        "rx_bytes": 1_610_612_736,
        "tx_packets": 999,
        "tx_bytes": 1536,
        "rx_missed": 0,
        "crc_errors": 3,
    },
    "demo.1": {"rx_packets": 5, "rx_bytes": 300, "tx_packets": 0, "tx_bytes": 0, "rx_missed": 7},
}


class FakeDaemon:
    """Stand-in handlers for ixyd's methods; `requests` records what each was sent."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.forward = {p["name"]: dict(p["forward"]) for p in PORTS}
        self.rates = None
        self.removed: set[str] = set()  # ports whose NIC is gone (present: false)

    def presence(self, name: str, entry: dict) -> dict:
        """entry, with `present` (as the daemon sends it) once some port is removed."""
        return {**entry, "present": name not in self.removed} if self.removed else entry

    def port_names(self, port=None):
        names = [p["name"] for p in PORTS]
        if port is None:
            return names
        if port not in names:
            raise RpcError(ErrorCode.NOT_FOUND, f"no port '{port}' (ports: {', '.join(names)})")
        return [port]

    def handlers(self):
        def status():
            return {
                "instance": "demo",
                "version": "0.1.0",
                "pid": 4242,
                "state": "running",
                "uptime_s": 3723.4,
                "ports": ["demo.0", "demo.1"],
                "workers": 2,
                **({"removed_ports": sorted(self.removed)} if self.removed else {}),
            }

        def ports():
            return {"ports": [self.presence(p["name"], p) for p in PORTS]}

        def stats(port=None):
            result = []
            for name in self.port_names(port):
                entry = self.presence(name, {"name": name, "counters": COUNTERS[name]})
                if self.rates:
                    entry["rates"] = self.rates
                result.append(entry)
            return {"ports": result}

        def link(port=None):
            by_name = {p["name"]: p["link"] for p in PORTS}
            names = self.port_names(port)
            return {"ports": [self.presence(n, {"name": n, **by_name[n]}) for n in names]}

        def get_forward(port=None):
            return {
                "ports": [{"name": n, "forward": self.forward[n]} for n in self.port_names(port)]
            }

        def set_forward(port, mode, **args):
            (name,) = self.port_names(port)
            self.forward[name] = {"mode": mode, **args}
            return {"name": name, "forward": self.forward[name]}

        def reset_stats(port=None):
            return {"ports": self.port_names(port)}

        def set_promisc(port, on):
            return {"name": self.port_names(port)[0], "promisc": on}

        def shutdown():
            return {"stopping": True}

        def reload():
            return {"config": "/etc/ixyd/demo.toml", "applied": ["demo.1 forward drop"]}

        def inject_fault(fault, worker=None, port=None):
            if fault == "remove":
                self.removed.add(self.port_names(port)[0])
                return {"fault": fault, "port": port}
            return {"fault": fault, "worker": f"ixyd-w{worker}-demo.{worker}.q0"}

        def capture(port, **options):  # the real one: tests/test_capture.py
            stream = Stream({"port": self.port_names(port)[0]}, on_close=lambda: None)
            for chunk, frames in CAPTURE_CHUNKS:
                data = base64.b64encode(chunk).decode()
                stream.send("capture.data", {"data": data, "frames": frames})
            stream.end("capture.end", {"frames": 2, "dropped": 7, "reason": "count"})
            return stream

        return {
            "status": status,
            "ports": ports,
            "stats": stats,
            "link": link,
            "get_forward": get_forward,
            "set_forward": set_forward,
            "reset_stats": reset_stats,
            "set_promisc": set_promisc,
            "shutdown": shutdown,
            "reload": reload,
            "capture": capture,
            "inject_fault": inject_fault,
        }

    def register(self, server):
        handlers = self.handlers()
        assert set(handlers) == set(IXYD_METHODS)
        for name, spec in IXYD_METHODS.items():
            server.register(
                name,
                self.recording(name, handlers[name]),
                params_schema=spec.params,
                mutating=spec.mutating,
                streaming=spec.streaming,
            )

    def recording(self, name, handler):
        def record(**params):
            self.requests.append((name, params))
            return handler(**params)

        return record


@pytest.fixture
def run_dir(monkeypatch):
    path = tempfile.mkdtemp(prefix="ixyd-ctl-")
    os.chmod(path, 0o755)
    monkeypatch.setenv("IXYD_RUN_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(run_dir):
    """A control server for instance 'demo' in run_dir, with the fake daemon's handlers."""
    fake = FakeDaemon()
    server = ControlServer(os.path.join(run_dir, "demo.sock"), socket_mode=0o666)
    fake.register(server)
    server.serve()
    fake.server = server
    yield fake
    server.close()


def ixyd_ctl_command():
    """The installed console script if there is one (it proves the entry point), else -m."""
    script = os.path.join(os.path.dirname(sys.executable), "ixyd-ctl")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ixyd.ctl"]


def run_ctl(*args, timeout=30):
    return subprocess.run(
        [*ixyd_ctl_command(), *args], capture_output=True, text=True, timeout=timeout
    )


def ok(*args):
    result = run_ctl(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def column(lines, header, name):
    """The cell under `header` in the row of port `name` (columns are 2+ spaces apart)."""
    headers = re.split(r"\s{2,}", lines[0].strip())
    row = next(line for line in lines if line.startswith(name + " "))
    return dict(zip(headers, re.split(r"\s{2,}", row.strip()), strict=True))[header]


# ---------------------------------------------------------------------------- output
def test_status_prints_every_field_with_a_readable_uptime(daemon):
    out = ok("-i", "demo", "status")
    assert "instance  demo" in out
    assert "uptime    1h 02m 03s" in out
    assert "ports     demo.0, demo.1" in out
    assert "state     running" in out


def test_ports_is_an_aligned_table(daemon):
    lines = ok("-i", "demo", "ports").splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        *("PORT", "ADDRESS", "BACKEND", "DRIVER", "MAC", "LINK", "PROMISC", "RX/TX Q", "FORWARD")
    ]
    assert column(lines, "LINK", "demo.0") == "up 10 Gb/s"
    assert column(lines, "LINK", "demo.1") == "down"
    assert column(lines, "PROMISC", "demo.1") == "off"
    assert column(lines, "FORWARD", "demo.0") == "port demo.1"
    assert column(lines, "FORWARD", "demo.1") == "reflect, swap MAC"
    assert lines[1].index("02:1b:21:99:00:00") == lines[2].index("02:1b:21:99:00:01")


def test_stats_shows_counters_in_human_units(daemon):
    lines = ok("-i", "demo", "stats").splitlines()
    assert re.split(r"\s{2,}", lines[0])[:3] == ["PORT", "RX PACKETS", "RX BYTES"]
    assert column(lines, "RX PACKETS", "demo.0") == "12.3M"
    assert column(lines, "RX BYTES", "demo.0") == "1.50 GiB"
    assert column(lines, "TX BYTES", "demo.0") == "1.50 KiB"
    assert column(lines, "RX MISSED", "demo.1") == "7"
    assert "RATE" not in lines[0]


def test_stats_shows_rates_when_the_daemon_has_them(daemon):
    daemon.rates = {"rx_pps": 14_880_952.0, "rx_bps": 1e10, "tx_pps": 12.0, "tx_bps": 5760.0}
    lines = ok("-i", "demo", "stats").splitlines()
    assert column(lines, "RX RATE", "demo.0") == "14.9 Mpps 10.0 Gb/s"
    assert column(lines, "TX RATE", "demo.0") == "12 pps 5.76 kb/s"


def test_stats_for_one_port_lists_every_counter_exactly(daemon):
    out = ok("-i", "demo", "stats", "demo.0")
    assert out.startswith("port demo.0\n")
    assert any(line.split() == ["rx_packets", "12,345,678", "12.3M"] for line in out.splitlines())
    assert any(line.split() == ["crc_errors", "3", "3"] for line in out.splitlines())
    assert ("stats", {"port": "demo.0"}) in daemon.requests


def test_link_and_get_forward_tables(daemon):
    link = ok("-i", "demo", "link").splitlines()
    assert link[0].split() == ["PORT", "LINK", "SPEED"]
    assert link[1].split() == ["demo.0", "up", "10", "Gb/s"]
    assert link[2].split() == ["demo.1", "down", "-"]
    forward = ok("-i", "demo", "get-forward", "demo.1").splitlines()
    assert forward == ["PORT    FORWARD", "demo.1  reflect, swap MAC"]


def test_a_port_whose_nic_is_gone_is_marked_in_every_table(daemon):
    daemon.removed = {"demo.1"}
    ports = ok("-i", "demo", "ports").splitlines()
    assert column(ports, "LINK", "demo.1") == "REMOVED"
    assert column(ports, "LINK", "demo.0") == "up 10 Gb/s"
    assert ok("-i", "demo", "link").splitlines()[2].split() == ["demo.1", "REMOVED", "-"]
    stats = ok("-i", "demo", "stats").splitlines()
    assert stats[2].startswith("demo.1 (removed)") and stats[1].startswith("demo.0 ")
    assert "removed_ports  demo.1" in ok("-i", "demo", "status")


def test_json_prints_the_raw_result(daemon):
    for args in (("--json", "-i", "demo", "ports"), ("ports", "--json", "-i", "demo")):
        assert json.loads(ok(*args)) == {"ports": PORTS}
    assert json.loads(ok("-i", "demo", "--json", "link", "demo.1")) == {
        "ports": [{"name": "demo.1", "up": False, "speed_mbps": 0}]
    }


# ---------------------------------------------------------------------------- requests
@pytest.mark.parametrize(
    "args, params, shown",
    [
        (["port", "demo.1"], {"mode": "port", "to": "demo.1"}, "port demo.1"),
        (["reflect"], {"mode": "reflect", "swap_mac": False}, "reflect"),
        (["reflect", "--swap-mac"], {"mode": "reflect", "swap_mac": True}, "reflect, swap MAC"),
        (["drop"], {"mode": "drop"}, "drop"),
        (["tap", "ixyd0"], {"mode": "tap", "ifname": "ixyd0"}, "tap ixyd0"),
        (
            ["generate", "--size", "64", "--rate", "1.5M", "--count", "10k"],
            {"mode": "generate", "size": 64, "rate": 1_500_000, "count": 10_000},
            "generate 64 B, 1.50 Mpps, 10000 frames",
        ),
        (["generate"], {"mode": "generate"}, "generate ? B, max rate, no end"),
    ],
)
def test_set_forward_sends_the_documented_params(daemon, args, params, shown):
    out = ok("-i", "demo", "set-forward", "demo.0", *args)
    assert daemon.requests == [("set_forward", {"port": "demo.0", **params})]
    assert out == f"demo.0: forwarding {shown}\n"


def test_every_forward_mode_has_a_set_forward_form():
    parser = ctl.build_parser()
    forms = {"port": ["demo.1"], "tap": ["ixyd0"]}
    for mode in FORWARD_MODES:
        args = parser.parse_args(["set-forward", "demo.0", mode, *forms.get(mode, [])])
        params = ctl._forward_params(args)
        assert params["mode"] == mode
        assert set(params) <= set(IXYD_METHODS["set_forward"].params)


def test_changes_send_the_documented_params(daemon):
    assert ok("-i", "demo", "set-promisc", "demo.1", "on") == "demo.1: promiscuous mode on\n"
    assert ok("-i", "demo", "reset-stats") == "statistics reset: demo.0, demo.1\n"
    assert ok("-i", "demo", "reset-stats", "demo.1") == "statistics reset: demo.1\n"
    assert ok("-i", "demo", "shutdown") == "ixyd instance 'demo' is shutting down\n"
    assert daemon.requests == [
        ("set_promisc", {"port": "demo.1", "on": True}),
        ("reset_stats", {}),
        ("reset_stats", {"port": "demo.1"}),
        ("shutdown", {}),
    ]


def test_debug_stall_worker_sends_inject_fault(daemon):
    assert ok("-i", "demo", "debug", "stall-worker") == (
        "worker ixyd-w0-demo.0.q0 stalled (fault injection)\n"
    )
    assert ok("-i", "demo", "debug", "stall-worker", "--worker", "1").startswith("worker ixyd-w1")
    assert daemon.requests == [
        ("inject_fault", {"fault": "stall", "worker": 0}),
        ("inject_fault", {"fault": "stall", "worker": 1}),
    ]


def test_debug_remove_port_sends_inject_fault_and_needs_a_port(daemon):
    assert ok("-i", "demo", "debug", "remove-port", "--port", "demo.1") == (
        "port demo.1 unplugged (fault injection)\n"
    )
    assert daemon.requests == [("inject_fault", {"fault": "remove", "port": "demo.1"})]
    refused = run_ctl("-i", "demo", "debug", "remove-port")
    assert refused.returncode == 2 and "needs --port PORT" in refused.stderr


# a pcap header, then one record per chunk: what ixyd-ctl capture writes, byte for byte
CAPTURE_CHUNKS = [
    (pcap_file_header(2048), 0),
    (bytes(range(16)) + b"frame one", 1),
    (bytes(range(16)) + b"frame two", 1),
]


def test_capture_writes_the_streamed_bytes_and_reports_the_end(daemon, run_dir):
    path = os.path.join(run_dir, "out.pcap")
    result = run_ctl("-i", "demo", "capture", "demo.0", "-c", "2", "-s", "100", "-w", path)
    assert result.returncode == 0, result.stderr
    with open(path, "rb") as f:
        assert f.read() == b"".join(chunk for chunk, _ in CAPTURE_CHUNKS)
    assert daemon.requests == [("capture", {"port": "demo.0", "count": 2, "snaplen": 100})]
    assert result.stderr.strip() == (
        f"ixyd-ctl: 2 frames of demo.0 written to {path} "
        "(count reached; 7 not captured: the capture ring was full)"
    )
    piped = subprocess.run(
        [*ixyd_ctl_command(), "-i", "demo", "capture", "demo.0", "-w", "-"],
        capture_output=True,
        timeout=30,
    )
    assert piped.returncode == 0 and b"written to stdout" in piped.stderr
    assert piped.stdout == b"".join(chunk for chunk, _ in CAPTURE_CHUNKS)


def test_call_sends_any_method_and_prints_its_json(daemon):
    out = ok("-i", "demo", "call", "link", '{"port": "demo.0"}')
    assert json.loads(out) == {"ports": [{"name": "demo.0", "up": True, "speed_mbps": 10000}]}
    assert daemon.requests == [("link", {"port": "demo.0"})]


def test_the_only_running_instance_is_found_without_i(daemon):
    assert ok("link", "demo.0").splitlines()[1].split()[0] == "demo.0"


def test_socket_names_the_socket_directly(daemon):
    assert json.loads(ok("--socket", daemon.server.path, "--json", "status"))["instance"] == "demo"


# ---------------------------------------------------------------------------- exit codes
def test_exit_1_and_the_daemons_message_for_an_error_answer(daemon):
    result = run_ctl("-i", "demo", "stats", "eth9")
    assert result.returncode == ctl.EXIT_ERROR == 1
    assert result.stderr == "ixyd-ctl: no port 'eth9' (ports: demo.0, demo.1)\n"
    assert result.stdout == ""
    bad = run_ctl("-i", "demo", "call", "set_forward", '{"port": "demo.0", "mode": "bounce"}')
    assert bad.returncode == 1
    assert "'mode' must be one of" in bad.stderr
    unknown = run_ctl("-i", "demo", "call", "frobnicate")
    assert unknown.returncode == 1 and "no method 'frobnicate'" in unknown.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nonsense"],
        ["set-forward", "demo.0"],
        ["set-forward", "demo.0", "bounce"],
        ["set-forward", "demo.0", "generate", "--rate", "fast"],
        ["set-promisc", "demo.0", "maybe"],
        ["call", "stats", "[1, 2]"],
        ["call", "stats", "{not json"],
        ["-i", "demo", "--socket", "/tmp/x.sock", "status"],
        ["-i", "../../etc/passwd", "status"],
        ["--timeout", "0", "status"],
    ],
)
def test_exit_2_for_usage_errors(daemon, args):
    result = run_ctl(*args)
    assert result.returncode == ctl.EXIT_USAGE == 2, result.stderr
    assert "usage:" in result.stderr
    assert daemon.requests == []


def test_exit_2_when_several_instances_run_and_none_is_named(daemon, run_dir):
    other = ControlServer(os.path.join(run_dir, "other.sock"))
    other.serve()
    try:
        result = run_ctl("status")
    finally:
        other.close()
    assert result.returncode == 2
    assert "several ixyd instances are running (demo, other)" in result.stderr


def test_exit_3_when_the_instance_is_not_running(run_dir):
    result = run_ctl("-i", "demo", "status")
    assert result.returncode == ctl.EXIT_NOT_RUNNING == 3
    assert result.stderr == (
        f"ixyd-ctl: ixyd instance 'demo' is not running (no socket at {run_dir}/demo.sock)\n"
    )
    nothing = run_ctl("status")
    assert nothing.returncode == 3
    assert f"no ixyd instance is running (no socket in {run_dir})" in nothing.stderr


def test_exit_3_for_a_stale_socket_nothing_listens_on(run_dir):
    path = os.path.join(run_dir, "demo.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    result = run_ctl("-i", "demo", "status")
    assert result.returncode == 3
    assert "is not running (stale socket at" in result.stderr


def run_ctl_as_nobody(*args):
    """ctl.main(args) in a child forked as nobody (the venv's python is not reachable by
    nobody, so no exec): returns (exit code, stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stdout = open(os.devnull, "w")  # fresh streams: no lock held by another thread
            sys.stderr = os.fdopen(write_end, "w")
            code = ctl.main(list(args))
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stderr


@needs_root
def test_exit_4_when_the_daemon_refuses_a_change(daemon):
    code, stderr = run_ctl_as_nobody("-i", "demo", "set-promisc", "demo.0", "off")
    assert code == ctl.EXIT_PERMISSION == 4
    assert "permission denied: 'set_promisc' changes the daemon" in stderr
    assert daemon.requests == []


@needs_root
def test_exit_4_when_the_socket_file_refuses_the_connection(daemon):
    os.chmod(daemon.server.path, 0o660)
    code, stderr = run_ctl_as_nobody("-i", "demo", "status")
    assert code == 4
    assert "permission denied connecting to" in stderr
    assert "owner root, group root, mode 0660" in stderr


def test_exit_5_when_the_daemon_does_not_answer_in_time(run_dir):
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(os.path.join(run_dir, "demo.sock"))
    mute.listen()  # connect() succeeds, nobody ever answers
    try:
        result = run_ctl("-i", "demo", "--timeout", "0.3", "status")
    finally:
        mute.close()
    assert result.returncode == ctl.EXIT_TIMEOUT == 5
    assert result.stderr == "ixyd-ctl: no answer from ixyd instance 'demo' within 0.3 s\n"


def test_exit_1_when_the_daemon_hangs_up_without_answering(run_dir):
    path = os.path.join(run_dir, "demo.sock")
    rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rude.bind(path)
    rude.listen()
    child = subprocess.Popen(
        [*ixyd_ctl_command(), "-i", "demo", "status"], stderr=subprocess.PIPE, text=True
    )
    connection, _ = rude.accept()
    connection.settimeout(30)
    assert b'"method": "status"' in connection.recv(65536)  # the request, then hang up
    connection.close()
    rude.close()
    assert child.wait(30) == 1
    assert "closed the connection without answering" in child.stderr.read()
    child.stderr.close()


# ---------------------------------------------------------------------------- units
@pytest.mark.parametrize(
    "value, count, size",
    [
        (0, "0", "0 B"),
        (999, "999", "999 B"),
        (1536, "1.54k", "1.50 KiB"),
        (12_345_678, "12.3M", "11.8 MiB"),
        (1_610_612_736, "1.61G", "1.50 GiB"),
    ],
)
def test_human_units(value, count, size):
    assert ctl.human_count(value) == count
    assert ctl.human_bytes(value) == size


def test_human_durations_and_speeds():
    assert ctl.human_duration(12.7) == "12s"
    assert ctl.human_duration(303) == "5m 03s"
    assert ctl.human_duration(3723) == "1h 02m 03s"
    assert ctl.human_duration(2 * 86400 + 3600 * 4 + 60 * 5) == "2d 04h 05m"
    assert ctl.human_speed(10000) == "10 Gb/s"
    assert ctl.human_speed(2500) == "2.5 Gb/s"
    assert ctl.human_speed(100) == "100 Mb/s"


def test_global_options_are_accepted_after_a_forwarding_mode():
    from ixyd.ctl import build_parser

    args = build_parser().parse_args(["set-forward", "demo.0", "reflect", "--swap-mac", "--json"])
    assert args.json and args.swap_mac and args.mode == "reflect"
