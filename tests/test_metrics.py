"""The metrics face (ixyd/metrics.py) on a running instance: what a scrape returns and
where each figure comes from, no lost clear-on-read delta with several readers, a device
that reads all-ones or is shut down, the address (configured, taken, off) and socket
activation of a real daemon process. Prometheus itself: test_prometheus.py."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from hosttools import NOBODY, wait_until
from prometheus_client.parser import text_string_to_metric_families

from ixyd.config import (
    DEFAULT_METRICS_ADDRESS,
    ConfigError,
    build,
    demo_config,
    load,
    parse_listen_address,
)
from ixyd.drivers.config import PortConfig
from ixyd.drivers.ixgbe import IxgbePort
from ixyd.errors import EXIT_FAILED
from ixyd.generator import generate
from ixyd.metrics import (
    MAX_CONNECTIONS,
    REQUEST_DEADLINE,
    SOCKET_UNIT_ENV,
    IxydCollector,
    MetricsError,
    MetricsServer,
)
from ixyd.model import ModelNic
from ixyd.service import Instance

wait_for = functools.partial(wait_until, interval=0.05)  # each poll may scrape

REPO = Path(__file__).resolve().parent.parent
FRAMES = 20_000


def scrape(url: str) -> dict[str, list]:
    """{family name: [(sample name, labels, value)]} of one scrape."""
    with urllib.request.urlopen(url, timeout=30) as reply:  # a loaded CI box is slow
        text = reply.read().decode()
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def value(families: dict, sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total")
    found = [v for n, lab, v in families.get(family, []) if n == sample and lab == labels]
    assert len(found) == 1, (sample, labels, families.get(family))
    return found[0]


def start(tmp_path, **traffic) -> Instance:
    config = demo_config(state_dir=str(tmp_path), **traffic)
    config = dataclasses.replace(
        config, metrics="127.0.0.1:0", control_socket=str(tmp_path / "ctl.sock")
    )
    instance = Instance(config, run_dir=str(tmp_path))
    instance.start()
    return instance


@pytest.fixture
def instance(tmp_path):
    inst = start(tmp_path, rate=5000, frames=FRAMES)
    yield inst
    inst.stop()


# ---------------------------------------------------------------------------- what a scrape says
def test_a_scrape_reports_the_nics_and_the_workers_counters_exactly(instance):
    nic = instance._model_nics["demo"]
    wait_for(
        lambda: all(p.traffic.stats["sent"] == FRAMES for p in instance.ports), 20, "the traffic"
    )
    time.sleep(0.3)  # the last frames through the workers and out of the TX rings
    families = scrape(instance.metrics.url)
    truth = {p.name: p.driver.dev.counters for p in instance.ports}
    for port in instance.ports:
        name, t = port.name, truth[port.name]
        q0 = {"device": name, "queue": "0"}
        worker = port.workers[0][0].queue_stats(port.workers[0][1])
        assert value(families, "ixyd_receive_packets_total", **q0) == t["rx_queue_frames"][0]
        assert value(families, "ixyd_receive_bytes_total", **q0) == 60 * t["rx_queue_frames"][0]
        assert value(families, "ixyd_poll_packets_total", **q0) == worker["packets"]
        assert value(families, "ixyd_forwarded_packets_total", **q0) == worker["sent"]
        for q, frames in enumerate(t["tx_queue_frames"][:2]):
            labels = {"device": name, "queue": str(q)}
            assert value(families, "ixyd_transmit_packets_total", **labels) == frames
        drop = "ixyd_receive_drop_total"
        assert value(families, drop, **q0, reason="no_descriptor") == t["rx_no_descriptor"]
        assert value(families, drop, device=name, reason="missed") == t["rx_missed"]
        assert value(families, "ixyd_link_up", device=name) == 1
        assert value(families, "ixyd_link_speed_bytes", device=name) == 10_000 * 125_000
        assert value(families, "ixyd_scrape_device_success", device=name) == 1
        assert value(families, "ixyd_worker_running", **q0) == 1
        pool = port.workers[0][1].pool
        assert value(families, "ixyd_mempool_size_buffers", **q0) == pool.count
        assert 0 < value(families, "ixyd_mempool_free_buffers", **q0) <= pool.count
        wire = {"device": name, "direction": "to_port"}
        assert value(families, "ixyd_model_wire_packets_total", **wire) == FRAMES
    assert value(families, "ixyd_iommu_faults_total", card="demo") == nic.fault_count == 0
    mapped = sum(m.size for m in nic.dma.mappings)
    assert value(families, "ixyd_dma_mapped_bytes") == mapped > 0
    assert value(families, "ixyd_instance_info", ixyd_instance="demo") == 1
    assert "process_cpu_seconds" in families  # the process's own
    created = [n for f in families.values() for n, _, _ in f if n.endswith("_created")]
    assert not created


def test_concurrent_readers_lose_no_clear_on_read_delta(tmp_path):
    """The scrape thread, the control thread (stats) and the main thread (rates) all read
    the NIC's clear-on-read registers: every delta must land in exactly one total."""
    inst = start(tmp_path, rate=0, frames=FRAMES)  # as fast as the model goes
    try:
        stop = threading.Event()
        errors = []

        def hammer(read):
            while not stop.is_set():
                try:
                    read()
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        readers = [
            lambda: scrape(inst.metrics.url),
            lambda: scrape(inst.metrics.url),
            inst.rpc_stats,
            inst.sample_rates,
        ]
        threads = [threading.Thread(target=hammer, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        try:
            wait_for(
                lambda: all(p.traffic.stats["sent"] == FRAMES for p in inst.ports), 30, "traffic"
            )
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors, errors
        families = scrape(inst.metrics.url)
        for port in inst.ports:
            truth = port.driver.dev.counters
            q0 = {"device": port.name, "queue": "0"}
            assert (
                value(families, "ixyd_receive_packets_total", **q0) == truth["rx_queue_frames"][0]
            )
            no_descriptor = value(families, "ixyd_receive_drop_total", **q0, reason="no_descriptor")
            assert no_descriptor == truth["rx_no_descriptor"]
            stats = port.driver.stats()
            assert stats["rx_good_packets"] == truth["rx_accepted"]
            assert stats["tx_good_packets"] == truth["tx_frames"]
    finally:
        inst.stop()


# ---------------------------------------------------------------------------- broken devices
def test_a_device_reading_all_ones_is_skipped_and_the_rest_is_served(instance, caplog):
    removed = instance.ports[1]
    removed.driver.dev.surprise_remove()
    with caplog.at_level(logging.WARNING, logger="ixyd.metrics"):
        families = scrape(instance.metrics.url)
        again = scrape(instance.metrics.url)
    for fam in (families, again):
        assert value(fam, "ixyd_scrape_device_success", device="demo.1") == 0
        assert value(fam, "ixyd_scrape_device_success", device="demo.0") == 1
        assert value(fam, "ixyd_link_up", device="demo.0") == 1
        assert not [s for s in fam["ixyd_link_up"] if s[1]["device"] == "demo.1"]
        # the worker's counters of the removed port are shared memory: still there
        assert value(fam, "ixyd_worker_running", device="demo.1", queue="0") == 1
    warnings = [r for r in caplog.records if "demo.1" in r.getMessage()]
    assert len(warnings) == 1 and "removed" in warnings[0].getMessage()  # once, not per scrape


def test_a_port_that_is_shut_down_is_skipped(tmp_path):
    nic = ModelNic(1, mode="thread", name="solo")
    nic.attach_traffic(nic.ports[0])
    driver = IxgbePort(nic.ports[0], PortConfig(rx_ring=64, tx_ring=64, pool_size=256))
    port = SimpleNamespace(
        name="solo.0",
        driver=driver,
        workers=[],
        forward=SimpleNamespace(mode="drop"),
        spec=SimpleNamespace(backend="model"),
        traffic=None,
    )
    collector = IxydCollector(lambda: [port], "solo")
    try:
        by_name = {m.name: m for m in collector.collect()}
        assert by_name["ixyd_link_up"].samples[0].value == 1
        driver.shutdown()
        by_name = {m.name: m for m in collector.collect()}
        assert by_name["ixyd_scrape_device_success"].samples[0].value == 0
        assert "ixyd_link_up" not in by_name and "ixyd_port_info" in by_name
        collector.close()  # from now on the instance may be torn down
        assert {m.name for m in collector.collect()} == {"ixyd_build_info", "ixyd_instance_info"}
    finally:
        driver.shutdown()
        nic.close()


def test_stop_closes_the_endpoint_before_the_ports_go(tmp_path):
    inst = start(tmp_path, rate=1000)
    url, collector = inst.metrics.url, inst.metrics.collector
    inst.stop()
    assert inst.metrics is None
    with pytest.raises(OSError):
        scrape(url)
    assert {m.name for m in collector.collect()} == {"ixyd_build_info", "ixyd_instance_info"}


# ---------------------------------------------------------------------------- the address
def test_the_metrics_key_is_checked(tmp_path):
    assert parse_listen_address("127.0.0.1:19911") == ("127.0.0.1", 19911)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    assert parse_listen_address("off") is None and parse_listen_address("") is None
    for bad in ("localhost:19911", "127.0.0.1", "::1:19911", "127.0.0.1:65536", 19911, True):
        with pytest.raises(ConfigError, match="metrics must be an IP address and a port"):
            build({"instance": "x", "metrics": bad, "port": [{"address": "demo.0"}]}, None)
    example = load("example", str(REPO / "etc" / "ixyd" / "example.toml"))
    assert example.metrics == "127.0.0.1:19911"


def test_an_explicit_address_that_is_taken_fails_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = dataclasses.replace(
            demo_config(state_dir=str(tmp_path)),
            metrics=f"127.0.0.1:{taken.getsockname()[1]}",
            control_socket=str(tmp_path / "ctl.sock"),
        )
        inst = Instance(config, run_dir=str(tmp_path))
        with pytest.raises(MetricsError, match="cannot serve metrics on 127.0.0.1:.*in use"):
            inst.start()
        assert inst.ports == [] and inst.workers == []  # start() released everything


def test_the_default_address_taken_leaves_the_instance_without_metrics(
    tmp_path, monkeypatch, caplog
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(
            "ixyd.service.DEFAULT_METRICS_ADDRESS", f"127.0.0.1:{taken.getsockname()[1]}"
        )
        config = dataclasses.replace(
            demo_config(state_dir=str(tmp_path)), control_socket=str(tmp_path / "ctl.sock")
        )
        inst = Instance(config, run_dir=str(tmp_path))
        with caplog.at_level(logging.WARNING):
            inst.start()
        try:
            assert inst.metrics is None and inst.rpc_status()["metrics"] is None
            assert inst.state == "running"
            assert "running without metrics" in caplog.text
        finally:
            inst.stop()


def test_an_empty_metrics_key_switches_the_endpoint_off(tmp_path, caplog):
    config = dataclasses.replace(
        demo_config(state_dir=str(tmp_path)), metrics="", control_socket=str(tmp_path / "c.sock")
    )
    inst = Instance(config, run_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="ixyd"):
        inst.start()
    try:
        assert inst.metrics is None and inst.rpc_status()["metrics"] is None
        assert "metrics: off" in caplog.text  # not the default address
    finally:
        inst.stop()


def test_the_endpoint_serves_ipv6_loopback(tmp_path):
    collector = IxydCollector(lambda: [], "v6")
    server = MetricsServer(collector, address=("::1", 0))
    server.serve()
    try:
        assert server.address.startswith("[::1]:")
        assert "ixyd_build_info" in scrape(server.url)
    finally:
        server.close()


# ---------------------------------------------------------------------------- a real daemon
LAUNCH = """
import os, sys
fds = [int(f) for f in sys.argv[1].split(",")]
for i, fd in enumerate(fds):  # to 3, 4, ... as systemd passes them
    os.dup2(fd, 3 + i)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, "-m", "ixyd.service", *sys.argv[3:]])
"""


@pytest.fixture
def run_dir():
    path = tempfile.mkdtemp(prefix="ixyd-met-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def daemon(run_dir, sockets, names, *args) -> subprocess.Popen:
    fds = [s.fileno() for s in sockets]
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, ",".join(map(str, fds)), names]
        + ["--demo", "--demo-rate", "1000", "--run-dir", run_dir, "--state-dir", run_dir, *args],
        pass_fds=fds,
        env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_both_faces_take_their_socket_from_systemd(run_dir):
    """control and metrics handed over together (LISTEN_FDNAMES=control:metrics): the
    daemon binds nothing itself, and the configured address is not used."""
    control = socket.socket(socket.AF_UNIX)
    control.bind(os.path.join(run_dir, "handed.sock"))
    control.listen()
    metrics = socket.socket()
    metrics.bind(("127.0.0.1", 0))
    metrics.listen()
    port = metrics.getsockname()[1]
    proc = daemon(run_dir, [control, metrics], "control:metrics", "--metrics", "127.0.0.1:1")
    control.close()
    metrics.close()
    try:
        families = {}
        deadline = time.monotonic() + 20
        while "ixyd_link_up" not in families:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                families = scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                time.sleep(0.1)
        assert value(families, "ixyd_link_up", device="demo.0") == 1
        client = socket.socket(socket.AF_UNIX)
        client.connect(os.path.join(run_dir, "handed.sock"))
        client.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
        status = json.loads(client.makefile().readline())["result"]
        client.close()
        assert status["metrics"] == f"http://127.0.0.1:{port}/metrics"
        assert not os.path.exists(os.path.join(run_dir, "demo.sock"))
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out
    assert "metrics: serving on" in out and "(socket-activated)" in out


def test_a_handed_over_metrics_socket_of_the_wrong_kind_is_refused(run_dir):
    wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wrong.bind(("127.0.0.1", 0))
    proc = daemon(run_dir, [wrong], "metrics")
    wrong.close()
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1, out
    assert "handed over as 'metrics' (fd 3) is AF_INET/SOCK_DGRAM, not a TCP socket" in out
    assert "Traceback" not in out


def test_metrics_off_and_a_bad_address_on_the_command_line(run_dir):
    bad = subprocess.run(
        [sys.executable, "-m", "ixyd.service", "--demo", "--metrics", "localhost:80"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "--metrics must be an IP address and a port" in bad.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "ixyd.service", "--demo", "--demo-rate", "1000"]
        + ["--run-dir", run_dir, "--state-dir", run_dir, "--metrics", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        path = os.path.join(run_dir, "demo.sock")
        wait_for(lambda: os.path.exists(path) or proc.poll() is not None, 20, "the daemon")
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
        assert json.loads(client.makefile().readline())["result"]["metrics"] is None
        client.close()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "metrics: off" in out


# ---------------------------------------------------------------------------- slow clients
# The flood itself (a daemon with 1024 open files and a watchdog, 2,000 slow clients from
# user nobody, what the daemon did meanwhile) is benchmarks/metrics_flood.py, which prints
# the figures docs/metrics.md quotes; this test runs it and checks the bounds.
_spec = importlib.util.spec_from_file_location(
    "metrics_flood", REPO / "benchmarks" / "metrics_flood.py"
)
metrics_flood = sys.modules["metrics_flood"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(metrics_flood)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs the clients as nobody)")
def test_slow_clients_of_another_user_starve_neither_control_nor_watchdog(run_dir):
    """2,000 slow connections from user nobody to the metrics port of a real
    daemon with the default soft limit of 1024 open files, a watchdog and systemd's part
    played by the test: the status call answers throughout, WATCHDOG=1 keeps coming, the
    daemon's descriptors and threads stay bounded, and scrapes still get through."""
    flood = metrics_flood.run(run_dir, clients=2000, seconds=30.0)
    print(flood.summary())
    assert flood.fds_max <= flood.fds_before + MAX_CONNECTIONS + 2, flood.fds
    assert flood.threads_max <= flood.threads_before, flood.threads
    assert flood.attack["most_open"] >= 2000 and flood.attack["opened"] > 2000, flood.attack
    assert flood.attack["closed_by_server"] > 0, flood.attack  # deadlines, slots taken over
    assert flood.ping_gap_max < flood.watchdog_seconds, flood.pings  # systemd would not kill
    assert len(flood.status_seconds) >= 10 and not flood.status_failures, flood.status_failures
    assert flood.scrapes_ok, f"no scrape got through the flood: {flood.scrape_seconds}"
    assert flood.exit_code == 0, flood.output
    assert "sd_notify" not in flood.output, flood.output  # no notification failed


# ---------------------------------------------------------------------------- one slow client
def test_a_request_trickled_in_is_cut_off_at_its_deadline_not_per_byte():
    """A client that sends its request one byte every 0.5 s (inside any per-read timeout)
    is closed REQUEST_DEADLINE after it connected; meanwhile a scraper is answered."""
    server = MetricsServer(IxydCollector(lambda: [], "slow"), address=("127.0.0.1", 0))
    server.serve()
    try:
        host, port = server.address.rsplit(":", 1)
        slow = socket.create_connection((host, int(port)))
        connected = time.monotonic()
        slow.settimeout(0.5)
        closed_after = None
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                slow.send(bytes([byte]))
                if slow.recv(1) == b"":
                    closed_after = time.monotonic() - connected
                    break
            except TimeoutError:
                continue
            except OSError:  # reset: closed as well
                closed_after = time.monotonic() - connected
                break
        slow.close()
        families = scrape(server.url)
        # counted: the endpoint says how many it cut off, and why
        assert value(families, "ixyd_metrics_refused_connections_total", reason="deadline") == 1
        assert value(families, "ixyd_metrics_connections") == 1  # this scrape
    finally:
        server.close()
    assert closed_after is not None, "the trickling client was never cut off"
    assert REQUEST_DEADLINE - 0.5 <= closed_after <= REQUEST_DEADLINE + 5, closed_after


# ---------------------------------------------------------------------------- a taken port, by hand
def test_a_configured_port_another_user_holds_fails_the_daemon_naming_them(run_dir):
    """By hand: the port is held by user nobody; `ixyd --metrics` on it exits
    1 at start with the reason and who holds the port, instead of running on."""
    if os.geteuid() != 0:
        pytest.skip("needs root (binds the port as nobody)")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the squatter: user nobody, listening until the pipe closes
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            squat = socket.socket()
            squat.bind(("127.0.0.1", 0))
            squat.listen()
            os.write(write_end, str(squat.getsockname()[1]).encode())
            os.close(write_end)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        port = int(os.read(read_end, 16))
        done = subprocess.run(
            [sys.executable, "-m", "ixyd.service", "--demo", "--run-dir", run_dir]
            + ["--state-dir", run_dir, "--metrics", f"127.0.0.1:{port}"],
            env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
    assert done.returncode == EXIT_FAILED, done.stderr
    assert (
        f"cannot serve metrics on 127.0.0.1:{port}: Address already in use (a socket of user "
        f"nobody (uid {NOBODY}) listens on port {port})"
    ) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "instance demo running" not in done.stderr


def test_under_the_unit_a_missing_metrics_socket_fails_the_daemon(run_dir):
    """Under ixyd@.service ($IXYD_METRICS_SOCKET) the port comes from the socket unit
    only: when it handed nothing over, the daemon does not bind the port itself."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # free again once closed: the daemon could bind it
    done = subprocess.run(
        [sys.executable, "-m", "ixyd.service", "--demo", "--run-dir", run_dir]
        + ["--state-dir", run_dir, "--metrics", f"127.0.0.1:{port}"],
        env={
            **{k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
            SOCKET_UNIT_ENV: "ixyd-metrics@demo.socket",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_FAILED, done.stderr
    assert f"ixyd-metrics@demo.socket handed over no socket for 127.0.0.1:{port}" in done.stderr
    assert "systemctl status ixyd-metrics@demo.socket" in done.stderr


# ---------------------------------------------------------------------------- the generator
def test_the_generator_gives_each_metrics_socket_its_configured_address(tmp_path):
    configs, out = tmp_path / "etc", tmp_path / "generator"
    configs.mkdir()
    port = '[[port]]\naddress = "demo.0"\n'
    (configs / "a.toml").write_text('metrics = "127.0.0.1:19912"\n' + port)
    (configs / "b.toml").write_text('metrics = "[::1]:19913"\n' + port)
    (configs / "c.toml").write_text(port)  # the default
    (configs / "d.toml").write_text('metrics = "off"\n' + port)
    (configs / "e.toml").write_text('metrics = "127.0.0.1:0"\n' + port)
    (configs / "f.toml").write_text("metrics = [\n")  # the daemon refuses it too
    done = generate(str(out), str(configs))
    assert done == {
        "a": "127.0.0.1:19912",
        "b": "[::1]:19913",
        "c": "127.0.0.1:19911",
        "d": "masked: no fixed metrics port",
        "e": "masked: no fixed metrics port",
        "f": "masked: configuration refused",
    }
    drop_in = (out / "ixyd-metrics@a.socket.d" / "50-listen.conf").read_text()
    assert drop_in.endswith("[Socket]\nListenStream=\nListenStream=127.0.0.1:19912\n")
    for masked in "def":
        assert os.readlink(out / f"ixyd-metrics@{masked}.socket") == "/dev/null"
    template = (REPO / "systemd" / "ixyd-metrics@.socket").read_text()
    assert f"\nListenStream={DEFAULT_METRICS_ADDRESS}\n" in template  # the same default
