"""A real Prometheus server (Debian's `prometheus`, loopback only) scrapes a real `ixyd
--demo` process: promtool lints the live exposition, the rates Prometheus computes match
the model's own counts, and every query of the Grafana dashboard (etc/grafana/ixyd.json)
parses and returns data.

One daemon and one Prometheus serve the whole module. The demo sends FRAMES frames each
way at RATE frames/s: long enough for Prometheus (first sample after about 6 s) to see
the traffic flowing, short enough that the totals settle before the module ends.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hosttools import Daemon, wait_until

wait_for = functools.partial(wait_until, interval=0.1)  # each poll may query Prometheus

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "etc" / "grafana" / "ixyd.json"
SCRAPE_CONFIG = REPO / "etc" / "prometheus" / "ixyd.yml"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
RATE = 2_000  # frames/s per direction
FRAMES = 32_000  # per direction: 16 s of traffic
FRAME_BYTES = 60  # the demo's frames, without FCS
SCRAPE_INTERVAL = 1  # seconds
JOB = "ixyd"
RX_RING = 512  # the demo's RX ring: at most RX_RING - 1 frames wait in it
# Frames between the model's generator and the NIC's counters, read in the same scrape:
# what the model's engine holds (its packet buffer, one burst). Generous: a bound, not a
# measurement.
IN_FLIGHT = 1024

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the demo daemon helper needs root"),
    pytest.mark.skipif(
        not (PROMETHEUS and PROMTOOL), reason="needs Debian's prometheus (scripts/bootstrap)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own configuration and TSDB."""

    def __init__(self, workdir: str, target: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = Path(workdir) / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL}s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: {JOB}\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={Path(workdir) / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: self._get("/-/ready") is not None, 20, "Prometheus to be ready")

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as reply:
                return reply.read()
        except OSError:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.proc.stderr.read()}")
            return None

    def api(self, path: str, **params) -> dict:
        body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert body is not None, path
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.api("query", **params)["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def samples(self, expr: str, window: int, at: float | None = None) -> list[tuple[float, float]]:
        """The raw samples of one series over the `window` seconds up to `at` (now)."""
        result = self.query(f"{expr}[{window}s]", at)
        assert len(result) == 1, (expr, result)
        return [(float(t), float(v)) for t, v in result[0]["values"]]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def setup():
    """(daemon, prometheus, metrics address); Prometheus has scraped the daemon at least
    once when this returns."""
    workdir = tempfile.mkdtemp(prefix="ixyd-prom-")
    os.chmod(workdir, 0o755)
    # Prometheus first: its first scrape comes about 6 s after its start, time the daemon
    # spends starting up instead of sending traffic nobody sees
    address = f"127.0.0.1:{free_port()}"
    prometheus = Prometheus(workdir, address)
    daemon = None
    try:
        daemon = Daemon(
            workdir,
            ["--demo", "--demo-rate", str(RATE), "--demo-frames", str(FRAMES)]
            + ["--metrics", address],
        )
        assert daemon.json("status")["metrics"] == f"http://{address}/metrics"
        wait_for(lambda: prometheus.query("ixyd_receive_packets_total"), 30, "the first scrape")
        yield daemon, prometheus, address
    finally:
        prometheus.stop()
        if daemon is not None:
            daemon.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_promtool_finds_nothing_to_lint_in_a_live_scrape(setup):
    _, _, address = setup
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        body = reply.read()
    assert b"ixyd_receive_packets_total{" in body and b"_created" not in body
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint


def test_prometheus_rates_match_the_models_counts(setup):
    """Every frame the model's generator sends into a port is either taken by the worker
    or dropped for a counted reason (a loaded machine starves the workers, so some may
    be); every frame a port sends reaches the model's checker. Prometheus' rates and
    totals must show exactly that, from the same scrapes as the model's own counters."""
    daemon, prom, _ = setup
    # the last scrape while both generators were still sending: rates are taken there
    wait_for(lambda: len(prom.samples(_wire("demo.0", "to_port"), 60)) >= 4, 20, "4 scrapes")
    flowing = [
        t
        for t, v in prom.samples(_wire("demo.0", "to_port"), 60)
        if 0 < v < FRAMES and prom.value(_wire("demo.1", "to_port"), t) < FRAMES
    ]
    assert len(flowing) >= 4, f"Prometheus saw the traffic in {len(flowing)} scrapes only"
    at = flowing[-1]
    for device, peer in (("demo.0", "demo.1"), ("demo.1", "demo.0")):
        arrived = prom.value(f"sum(rate({{__name__=~'{ARRIVED}',{_at(device)}}}[4s]))", at)
        sent_in = prom.value(f"rate({_wire(device, 'to_port')}[4s])", at)
        transmitted = prom.value(
            f"sum(rate(ixyd_transmit_packets_total{{device='{peer}'}}[4s]))", at
        )
        checked = prom.value(f"rate({_wire(peer, 'from_port')}[4s])", at)
        assert sent_in > RATE / 10, f"the model's generator on {device} hardly ran: {sent_in}"
        slack = IN_FLIGHT / 3  # per second: a 4 s window holds 3+ scrape intervals
        assert abs(arrived - sent_in) <= 0.02 * sent_in + slack, (device, arrived, sent_in)
        assert abs(transmitted - checked) <= 0.02 * checked + slack, (peer, transmitted, checked)
    # sample by sample (the same scrapes): what arrived trails what the model sent into
    # the port by at most the frames in flight
    arrived: dict[float, float] = {}
    for series in prom.query(f"{{__name__=~'{ARRIVED}',{_at('demo.0')}}}[60s]"):
        for t, v in series["values"]:
            arrived[float(t)] = arrived.get(float(t), 0.0) + float(v)
    sent_in = prom.samples(_wire("demo.0", "to_port"), 60)
    assert sorted(arrived) == [t for t, _ in sent_in]
    for t, sent in sent_in:
        assert 0 <= sent - arrived[t] <= IN_FLIGHT, (t, arrived[t], sent)

    # once all FRAMES are sent and nothing moves any more, Prometheus' last sample,
    # ixyd-ctl stats and the model agree to the frame
    totals = {
        device: {
            "sent_in": _wire(device, "to_port"),
            "arrived": f"sum({{__name__=~'{ARRIVED}',{_at(device)}}})",
            "received": f"sum(ixyd_receive_packets_total{{device='{device}'}})",
            "received_bytes": f"sum(ixyd_receive_bytes_total{{device='{device}'}})",
            "polled": f"sum(ixyd_poll_packets_total{{device='{device}'}})",
            "ring_drops": f"sum(ixyd_receive_drop_total{{device='{device}',reason=~'{RING}'}})",
            "forwarded": f"sum(ixyd_forwarded_packets_total{{device='{device}'}})",
            "tx_full": f"sum(ixyd_receive_drop_total{{device='{device}',reason='tx_full'}})",
            "transmitted": f"sum(ixyd_transmit_packets_total{{device='{device}'}})",
            "checked": _wire(device, "from_port"),
            "problems": f"sum(ixyd_model_checker_problems_total{{device='{device}'}})",
        }
        for device in ("demo.0", "demo.1")
    }
    last: list = [None]

    def settled() -> bool:
        now = {d: {k: prom.value(e) for k, e in exprs.items()} for d, exprs in totals.items()}
        done = all(v["sent_in"] == FRAMES for v in now.values()) and now == last[0]
        last[0] = now
        return done

    wait_for(settled, 30, f"all {FRAMES} frames each way, and two equal scrapes")
    seen = last[0]
    stats = daemon.json("stats")
    counters = {p["name"]: p["counters"] for p in stats["ports"]}
    wires = {t["port"]: t for t in stats["traffic"]}
    for device, peer in (("demo.0", "demo.1"), ("demo.1", "demo.0")):
        mine, theirs = seen[device], seen[peer]
        assert mine["arrived"] == FRAMES, (device, mine)
        assert mine["received_bytes"] == FRAME_BYTES * mine["received"]
        # what the NIC put in the ring, the worker took out or dropped, except what still
        # waits there
        waiting = mine["received"] - mine["polled"] - mine["ring_drops"]
        assert 0 <= waiting < RX_RING, (device, mine)
        assert mine["forwarded"] + mine["tx_full"] == mine["polled"], (device, mine)
        assert theirs["transmitted"] == mine["forwarded"] == theirs["checked"], (device, seen)
        assert mine["problems"] == 0
        assert mine["received"] > 0, f"{device}: nothing received: {mine}"
        # ixyd-ctl reads the same counters (the NIC's per-queue ones for rx/tx_packets)
        assert counters[device]["rx_packets"] == mine["received"]
        assert counters[device]["forwarded"] == mine["forwarded"]
        assert counters[peer]["tx_packets"] == theirs["transmitted"]
        assert wires[device]["sent"] == FRAMES and wires[peer]["received"] == theirs["checked"]


# Every frame the model hands a port is received into a ring by the NIC or dropped by it.
ARRIVED = "ixyd_receive_packets_total|ixyd_receive_drop_total"
_INBOUND_DROPS = "no_descriptor|missed"  # by the NIC; the data path's are of received frames
RING = "no_buffer|multi_descriptor|error"  # received frames the data path dropped


def _at(device: str) -> str:
    """Label matchers: the device's received frames and inbound drops (not forwarding ones)."""
    return f"device='{device}',reason=~'|{_INBOUND_DROPS}'"


def _wire(device: str, direction: str) -> str:
    return f'ixyd_model_wire_packets_total{{device="{device}",direction="{direction}"}}'


# ---------------------------------------------------------------------------- the dashboard
def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, and the variables' label_values() queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"${variable['name']}", variable["query"]["query"]))
    return out


def concrete(expr: str) -> str:
    """What Grafana sends: variables replaced as for "All" (regex .*), the rate interval
    as Grafana computes it for a 1 s scrape interval (4 x scrape interval)."""
    return (
        expr.replace("$__rate_interval", "4s")
        .replace('"$device"', '".*"')
        .replace('"$job"', f'"{JOB}"')
    )


LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")


def test_dashboard_json_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "device"} <= set(variables)
    assert variables["device"]["multi"] and variables["device"]["includeAll"]
    ids, titles = set(), set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids, panel["title"]
        ids.add(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["title"] not in titles, panel["title"]
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert "$device" in target["expr"] or "device" not in target["expr"], panel["title"]
    # what the issue asks the dashboard to show
    shown = " ".join(expr for _, expr in dashboard_queries())
    for needed in (
        "ixyd_receive_packets_total",
        "ixyd_transmit_bytes_total",
        "ixyd_receive_drop_total",
        "ixyd_link_up",
        "ixyd_poll_empty_total",
        "ixyd_mempool_free_buffers",
    ):
        assert needed in shown, needed


def test_every_dashboard_query_parses_with_promtool(tmp_path):
    exprs = []
    for title, expr in dashboard_queries():
        match = LABEL_VALUES.fullmatch(expr)
        exprs.append((title, match["selector"] if match else expr))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": concrete(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in check.stdout


def test_every_dashboard_query_returns_data_from_the_live_prometheus(setup):
    _, prom, _ = setup
    # rate() needs two samples inside its 4 s window
    wait_for(lambda: len(prom.samples("ixyd_link_up{device='demo.0'}", 4)) >= 2, 20, "samples")
    empty = []
    for title, expr in dashboard_queries():
        match = LABEL_VALUES.fullmatch(expr)
        if match:
            data = prom.api(
                f"label/{match['label']}/values", **{"match[]": concrete(match["selector"])}
            )
        else:
            data = prom.query(concrete(expr))
        if not data:
            empty.append((title, expr))
    assert not empty, empty


def test_the_example_scrape_config_is_valid():
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(SCRAPE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "127.0.0.1:19911" in SCRAPE_CONFIG.read_text()  # the documented default
