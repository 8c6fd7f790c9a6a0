"""ixyd under a real systemd 252: the installed units, their lifecycle, the journal fields.

One container for the module (conftest.py): Debian bookworm with this checkout's wheel in
/opt/ixyd, the units installed with `ixyd-host install` (the README's deploy command), and
instance 0000:03:00.0 configured for two model ports. The tests run in file order and each
sets up the state it needs: start with systemctl, socket activation from ixyd-ctl, the
metrics endpoint, the watchdog killing a hung worker, journal fields, a clean stop.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from nspawn_harness import INSTANCE, INSTANCE_CONFIG, METRICS, SERVICE, SOCKET

from ixyd.metrics import MAX_CONNECTIONS

pytestmark = pytest.mark.nspawn

CTL = "/opt/ixyd/bin/ixyd-ctl"
PYTHON = "/opt/ixyd/bin/python3"


def ctl(container, *args: str, check: bool = True):
    return container.run([CTL, "-i", INSTANCE, "--timeout", "10", *args], check=check)


def active(container, unit: str) -> bool:
    return container.show(unit, "ActiveState")["ActiveState"] == "active"


def main_pid_status(container, pid: str) -> dict[str, str]:
    text = container.run(["cat", f"/proc/{pid}/status"]).stdout
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_install_creates_units_accounts_and_directories(container):
    out = container.install.stdout
    for path in (
        "/etc/systemd/system/ixyd@.service",
        "/etc/systemd/system/ixyd@.socket",
        "/etc/sysusers.d/ixyd.conf",
        "/etc/tmpfiles.d/ixyd.conf",
        "/etc/udev/rules.d/70-ixyd-vfio.rules",
    ):
        assert f"installed {path}" in out
    assert "ran systemctl daemon-reload" in out
    container.run(["getent", "passwd", "ixyd"])
    container.run(["getent", "group", "ixyd-ops"])
    assert container.run(["stat", "-c", "%U %a", "/var/lib/ixyd"]).stdout.split() == [
        "ixyd",
        "750",
    ]
    unit = container.run(["systemctl", "cat", SERVICE]).stdout
    assert "ExecStart=/opt/ixyd/bin/ixyd -- %i" in unit
    assert "ExecStartPre=+/opt/ixyd/bin/python3 -I -m ixyd.host prepare --group ixyd -- %i" in unit


def test_systemctl_start_returns_once_ready_and_runs_unprivileged(container):
    container.run(["systemctl", "start", SERVICE], timeout=60)
    # Type=notify: start returns after READY=1, so the control socket answers at once
    status = json.loads(ctl(container, "--json", "status").stdout)
    assert status["state"] == "running" and status["ports"] == ["card.0", "card.1"]
    shown = container.show(SERVICE, "MainPID", "StatusText", "Result", "Type", "WatchdogUSec")
    assert shown["Type"] == "notify" and shown["WatchdogUSec"] == "3s"
    assert "card.0 link up 10G" in shown["StatusText"]
    proc = main_pid_status(container, shown["MainPID"])
    uid = container.run(["id", "-u", "ixyd"]).stdout.strip()
    assert proc["Uid"].split()[0] == uid  # User=ixyd ...
    assert proc["CapEff"] == "0000000000000000" and proc["NoNewPrivs"] == "1"
    assert proc["Seccomp"] == "2"  # SystemCallFilter=
    journal = container.run(["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat"]).stdout
    assert "model ports only, nothing to bind" in journal  # ... ExecStartPre=+ as root


def test_status_text_shows_link_and_rates(container):
    container.run(["systemctl", "start", SERVICE], timeout=60)

    def rates():
        text = container.show(SERVICE, "StatusText")["StatusText"]
        return text if re.search(r"card\.0 link up 10G, rx [\d.]+ k?pps, tx", text) else None

    text = container.wait_for(rates, "STATUS= with rates", timeout=15)
    assert "card.1 link up 10G, rx" in text


def test_ixyd_ctl_starts_the_instance_through_its_socket(container):
    container.run(["systemctl", "stop", SERVICE], timeout=60)
    container.run(["systemctl", "start", SOCKET])
    assert not active(container, SERVICE)
    listing = container.run(["stat", "-c", "%A %U %G", f"/run/ixyd/{INSTANCE}.sock"]).stdout
    assert listing.split() == ["srw-rw----", "root", "ixyd-ops"]

    out = ctl(container, "set-forward", "card.0", "reflect", "--swap-mac").stdout
    assert out.strip() == "card.0: forwarding reflect, swap MAC"
    assert active(container, SERVICE)
    journal = container.run(["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat"]).stdout
    assert "control: using the socket-activated fd" in journal
    forward = json.loads(ctl(container, "--json", "get-forward", "card.0").stdout)
    assert forward["ports"][0]["forward"] == {"mode": "reflect", "swap_mac": True}


def test_metrics_are_scraped_inside_the_container(container):
    container.run(["systemctl", "start", SERVICE], timeout=60)
    scrape = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())"
    )

    def body():
        done = container.run(["/opt/ixyd/bin/python", "-c", scrape], check=False)
        return done.stdout if done.returncode == 0 else None

    text = container.wait_for(body, "the metrics endpoint", timeout=15)
    received = [
        line
        for line in text.splitlines()
        if line.startswith("ixyd_") and "card.0" in line and "receive_packets_total" in line
    ]
    assert received, text[:2000]


METRICS_SOCKET = f"ixyd-metrics@{INSTANCE}.socket"
SLOW_CLIENTS = Path(__file__).resolve().parents[1] / "slow_clients.py"
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
FLOOD = 2000
FLOOD_SECONDS = 30
WATCHDOG_SEC = 3  # the test drop-in's WatchdogSec= (nspawn_harness.TEST_DROP_IN)


def open_fds(container, pid: str) -> int:
    return int(container.run(["sh", "-c", f"ls /proc/{pid}/fd | wc -l"]).stdout)


def test_the_metrics_port_is_bound_by_its_socket_unit(container):
    """systemd binds the metrics port (ixyd-metrics@.socket, its address
    generated from /etc/ixyd/<instance>.toml) and hands it to the daemon; user nobody
    cannot bind it while the instance runs."""
    assert "installed /etc/systemd/system-generators/ixyd-metrics-generator" in (
        container.install.stdout
    )
    unit = container.run(["systemctl", "cat", METRICS_SOCKET]).stdout
    assert f"/run/systemd/generator/{METRICS_SOCKET}.d/50-listen.conf" in unit
    assert unit.rstrip().endswith(f"ListenStream={METRICS}"), unit
    container.run(["systemctl", "start", SERVICE], timeout=60)
    assert active(container, METRICS_SOCKET)
    pid = container.show(SERVICE, "MainPID")["MainPID"]
    listening = container.run(["ss", "-Hltnp", f"sport = :{METRICS.rsplit(':', 1)[1]}"]).stdout
    assert '("systemd",pid=1,' in listening and f"pid={pid}," in listening, listening
    host, port = METRICS.rsplit(":", 1)
    squat = (  # SO_REUSEADDR: only a listening socket on the port, not TIME_WAIT, stops it
        "import socket; s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(({host!r}, {port}))\n"
    )
    refused = container.run([*AS_NOBODY, "python3", "-c", squat], check=False)
    assert refused.returncode == 1 and "Address already in use" in refused.stderr, refused
    # a restart keeps systemd's listening socket: the port is never free in between
    inode = re.search(r"ino:(\d+)", container.run(["ss", "-Hltne", f"sport = :{port}"]).stdout)
    container.run(["systemctl", "restart", SERVICE], timeout=60)
    again = re.search(r"ino:(\d+)", container.run(["ss", "-Hltne", f"sport = :{port}"]).stdout)
    assert inode and again and inode.group(1) == again.group(1), (inode, again)
    assert container.show(SERVICE, "MainPID")["MainPID"] != pid


def test_a_port_squatted_before_the_start_fails_the_instance_loudly(container):
    """A user who binds the metrics port before the instance starts does
    not get scraped as a running instance: the socket unit fails to bind, the daemon
    refuses to run without it (and says why), and once the port is free again the next
    automatic restart serves it."""
    container.run(["systemctl", "stop", SERVICE], timeout=60)
    assert not active(container, METRICS_SOCKET)  # StopPropagatedFrom=: stopped with it
    host, port = METRICS.rsplit(":", 1)
    fake = (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(({host!r}, {port})); s.listen()\n"
        "import os; print(os.getpid(), flush=True); time.sleep(120)\n"
    )
    squatter = subprocess.Popen(
        ["nsenter", f"--target={container.leader}", "--all", *AS_NOBODY, "python3", "-c", fake],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    squatter_pid = squatter.stdout.readline().strip()  # in the container's pid space
    try:
        assert squatter_pid.isdigit(), squatter.communicate(timeout=10)
        started = container.run(["systemctl", "start", SERVICE], check=False, timeout=90)
        assert started.returncode != 0
        journal = container.wait_for(
            lambda: (j := journal_of(container, SERVICE)) and "handed over no socket" in j and j,
            "the daemon's refusal",
        )
        assert f"{METRICS_SOCKET} handed over no socket for {METRICS}" in journal
        socket_journal = journal_of(container, METRICS_SOCKET)
        assert "Address already in use" in socket_journal, socket_journal
    finally:
        # nsenter forked (it entered a pid namespace): the squatter is its child
        container.run(["kill", "-KILL", squatter_pid], check=False)
        squatter.wait(30)
    # the port is free again: a restart (Restart=on-failure) starts the socket and serves it
    container.wait_for(lambda: active(container, SERVICE), "the instance back", timeout=60)
    assert active(container, METRICS_SOCKET)


def test_slow_clients_of_another_user_leave_control_and_watchdog_alone(container):
    """Under the unit's own limits: 2,000 slow connections from user nobody
    to the metrics port; the instance is not restarted, systemd keeps receiving
    WATCHDOG=1 (WatchdogTimestamp moves on), `ixyd-ctl status` answers and the daemon's
    descriptors stay bounded."""
    container.run(["systemctl", "start", SERVICE], timeout=60)
    before = container.show(SERVICE, "MainPID", "NRestarts")
    pid = before["MainPID"]
    limits = container.run(["cat", f"/proc/{pid}/limits"]).stdout
    # LimitNOFILE=65536, clamped to the build machine's hard limit (20000 here) in nspawn
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()
    assert int(soft) == int(hard) > 1024, limits
    # /var/tmp: the container's /tmp is a tmpfs mounted over the overlay at boot
    script = container.root / "var/tmp" / "slow_clients.py"
    shutil.copy(SLOW_CLIENTS, script)
    script.chmod(0o644)
    fds_before = open_fds(container, pid)
    port = METRICS.rsplit(":", 1)[1]
    result = {}

    def attack() -> None:
        command = [*AS_NOBODY, "python3", "/var/tmp/slow_clients.py", port, str(FLOOD)]
        try:
            result["done"] = container.run(
                [*command, str(FLOOD_SECONDS)], timeout=FLOOD_SECONDS + 60
            )
        except Exception as exc:  # reported by the test, not lost in the thread
            result["error"] = exc

    attacker = threading.Thread(target=attack)
    attacker.start()
    fds, status_ok, ping_ages = [], 0, []
    while attacker.is_alive():
        fds.append(open_fds(container, pid))
        status = json.loads(ctl(container, "--json", "status").stdout)
        status_ok += status["state"] == "running"
        # systemd's time of the last WATCHDOG=1, on the same CLOCK_MONOTONIC as ours
        stamp = container.show(SERVICE, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
        ping_ages.append(time.monotonic() - int(stamp) / 1e6)
    attacker.join()
    assert "error" not in result, result["error"]
    flood = json.loads(result["done"].stdout)
    after = container.show(SERVICE, "MainPID", "NRestarts", "ActiveState")
    print(
        f"under systemd: flood {flood}; fds {fds_before} before, max {max(fds)} during; "
        f"{status_ok}/{len(fds)} status answers; last ping at most {max(ping_ages):.2f} s old"
    )
    assert after == {**before, "ActiveState": "active"}, (before, after)  # never restarted
    assert max(fds) <= fds_before + MAX_CONNECTIONS + 2, (fds_before, fds)
    assert status_ok == len(fds) >= 5
    assert max(ping_ages) < WATCHDOG_SEC, ping_ages  # pings keep coming, about every 1 s
    assert flood["most_open"] >= FLOOD and flood["closed_by_server"] > 0, flood
    journal = container.run(
        ["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat", f"_PID={pid}"]
    ).stdout
    assert "sd_notify" not in journal, journal


def test_a_hung_worker_is_killed_by_the_watchdog_and_restarted(container):
    container.run(["systemctl", "start", SERVICE], timeout=60)
    before = container.show(SERVICE, "MainPID", "NRestarts")
    out = ctl(container, "debug", "stall-worker", "--worker", "1").stdout
    assert "stalled" in out

    def killed_and_back():
        now = container.show(SERVICE, "MainPID", "NRestarts", "ActiveState")
        restarted = int(now["NRestarts"]) > int(before["NRestarts"])
        if restarted and now["ActiveState"] == "active" and now["MainPID"] != before["MainPID"]:
            return now
        return None

    container.wait_for(killed_and_back, "a watchdog restart", timeout=45)
    journal = container.run(["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat"]).stdout
    assert f"Killing process {before['MainPID']} (ixyd) with signal SIGABRT" in journal
    assert "Watchdog timeout (limit 3s)!" in journal
    assert "withholding the watchdog ping" in journal  # the daemon said which worker
    assert "stay on vfio-pci for the restart" in journal  # ExecStopPost saw the failure
    status = json.loads(ctl(container, "--json", "status").stdout)
    assert status["state"] == "running"
    # the forwarding set over the socket before the crash survived it (state file)
    forward = json.loads(ctl(container, "--json", "get-forward", "card.0").stdout)
    assert forward["ports"][0]["forward"]["mode"] == "reflect"


def test_journal_entries_carry_instance_and_device_fields(container):
    container.run(["systemctl", "start", SERVICE], timeout=60)
    lines = container.run(
        ["journalctl", "-u", SERVICE, "-o", "json", "--no-pager", "_COMM=ixyd"]
    ).stdout.splitlines()
    entries = [json.loads(line) for line in lines]
    daemon = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "ixyd"]
    assert daemon and all(e.get("INSTANCE") == INSTANCE for e in daemon)
    bring_up = [e for e in daemon if e["MESSAGE"] == "card.1: bringing up (model backend)"]
    assert bring_up and bring_up[-1]["DEVICE"] == "card.1"
    assert {e["PRIORITY"] for e in daemon} >= {"6"}  # INFO maps to syslog priority 6


def test_tap_mode_needs_the_tap_drop_in_and_works_with_it(container):
    container.run(["chmod", "0666", "/dev/net/tun"])  # what udev does on a real host
    container.run(["systemctl", "start", SERVICE], timeout=60)
    refused = ctl(container, "set-forward", "card.1", "tap", "ixyd0", check=False)
    assert refused.returncode == 1 and "CAP_NET_ADMIN" in refused.stderr, refused
    try:
        container.run(["/opt/ixyd/bin/ixyd-host", "install", "--tap"])
        container.run(["systemctl", "restart", SERVICE], timeout=60)
        assert ctl(container, "set-forward", "card.1", "tap", "ixyd0").returncode == 0
        index = container.run(["cat", "/sys/class/net/ixyd0/ifindex"]).stdout
        # the TAP outlives a switch to another mode and back (its kernel peer stays set
        # up), and goes with the instance
        ctl(container, "set-forward", "card.1", "port", "card.0")
        assert container.run(["cat", "/sys/class/net/ixyd0/ifindex"]).stdout == index
        assert ctl(container, "set-forward", "card.1", "tap", "ixyd0").returncode == 0
        assert container.run(["cat", "/sys/class/net/ixyd0/ifindex"]).stdout == index
        container.run(["systemctl", "stop", SERVICE], timeout=60)
        assert container.run(["ip", "link", "show", "ixyd0"], check=False).returncode != 0
    finally:
        container.run(["/opt/ixyd/bin/ixyd-host", "install"])
        container.run(["systemctl", "restart", SERVICE], timeout=60)


def test_a_nic_that_goes_away_is_reported_and_the_instance_carries_on(container):
    """A port's NIC unplugged under a running instance (fault injection on the model): the
    daemon stays up, says `card.1 removed` in systemd's status line and marks the port in
    ixyd-ctl, logs it once; a restart brings the port back."""
    container.run(["systemctl", "start", SERVICE], timeout=60)
    pid = container.show(SERVICE, "MainPID")["MainPID"]
    out = ctl(container, "debug", "remove-port", "--port", "card.1").stdout
    assert "card.1 unplugged" in out
    shown = container.wait_for(
        lambda: (
            (s := container.show(SERVICE, "StatusText", "ActiveState", "MainPID"))
            and "card.1 removed" in s["StatusText"]
            and s
        ),
        "the status line to name the removed port",
    )
    assert shown["ActiveState"] == "active" and shown["MainPID"] == pid
    assert shown["StatusText"].startswith("card.0 link up 10G")
    ports = json.loads(ctl(container, "--json", "ports").stdout)["ports"]
    assert [p["present"] for p in ports] == [True, False]
    assert "REMOVED" in ctl(container, "link").stdout
    status = json.loads(ctl(container, "--json", "status").stdout)
    assert status["state"] == "running" and status["removed_ports"] == ["card.1"]
    journal = container.run(
        ["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat", f"_PID={pid}"]
    ).stdout
    assert journal.count("keeps its last counters") == 1
    container.run(["systemctl", "restart", SERVICE], timeout=60)
    ports = json.loads(ctl(container, "--json", "ports").stdout)["ports"]
    assert [p["present"] for p in ports] == [True, True]


def test_systemctl_reload_fails_visibly_on_a_bad_file_and_keeps_the_running_config(container):
    """ExecReload= asks the daemon over the control socket and waits: a file it refuses
    fails `systemctl reload` (it used to send SIGHUP and return 0 whatever happened), the
    daemon keeps running with the configuration it had; a good file is applied."""
    container.run(["systemctl", "start", SERVICE], timeout=60)
    pid = container.show(SERVICE, "MainPID")["MainPID"]
    config = container.root / "etc/ixyd" / f"{INSTANCE}.toml"
    misspelt = INSTANCE_CONFIG.replace("metrics = ", "metric = ")
    assert misspelt != INSTANCE_CONFIG
    try:
        for bad in ("[[port]\n" + INSTANCE_CONFIG, misspelt):
            config.write_text(bad)
            reloaded = container.run(["systemctl", "reload", SERVICE], check=False, timeout=60)
            assert reloaded.returncode != 0, reloaded
            shown = container.show(SERVICE, "ActiveState", "MainPID")
            assert shown == {"ActiveState": "active", "MainPID": pid}
            forward = json.loads(ctl(container, "--json", "get-forward", "card.1").stdout)
            assert forward["ports"][0]["forward"] == {"mode": "port", "to": "card.0"}
        journal = journal_of(container, SERVICE)
        assert "not valid TOML" in journal, journal
        assert "unknown key metric;" in journal, journal
        config.write_text(INSTANCE_CONFIG.replace('{mode = "port", to = "card.0"}', '"drop"'))
        container.run(["systemctl", "reload", SERVICE], timeout=60)
        forward = json.loads(ctl(container, "--json", "get-forward", "card.1").stdout)
        assert forward["ports"][0]["forward"] == {"mode": "drop"}
        assert container.show(SERVICE, "MainPID")["MainPID"] == pid
    finally:
        config.write_text(INSTANCE_CONFIG)
        container.run(["systemctl", "reload", SERVICE], check=False, timeout=60)


def test_the_first_status_after_socket_activation_says_running(container):
    """The client that starts the instance through its socket waits in the listen queue;
    it used to be answered before the state was set, and read `starting`."""
    for _ in range(3):
        container.run(["systemctl", "stop", SERVICE], timeout=60)
        container.run(["systemctl", "start", SOCKET])
        assert not active(container, SERVICE)
        status = json.loads(ctl(container, "--json", "status").stdout)
        assert status["state"] == "running", status


OTHER = "0000:04:00.0"  # a second instance, for the failures below
OTHER_METRICS = "127.0.0.1:21390"
OTHER_SERVICE = f"ixyd@{OTHER}.service"


@pytest.fixture
def other_instance(container):
    """Instance OTHER with one model port whose config sets `cpus` as given, or the
    configuration `text`; stopped, reset and its files removed afterwards."""
    config = container.root / "etc/ixyd" / f"{OTHER}.toml"
    drop_in = container.root / "etc/systemd/system" / f"{OTHER_SERVICE}.d"

    def configure(cpus: int = 0, exec_start: str | None = None, text: str | None = None) -> None:
        config.write_text(
            text
            or f'metrics = "{OTHER_METRICS}"\n'
            f'[[port]]\naddress = "other.0"\nrx_ring = 64\ntx_ring = 64\npool_size = 256\n'
            f"cpus = [{cpus}]\n"
        )
        if exec_start:
            drop_in.mkdir(exist_ok=True)
            (drop_in / "exec.conf").write_text(f"[Service]\nExecStart=\nExecStart={exec_start}\n")
        container.run(["systemctl", "daemon-reload"])

    yield configure
    container.run(
        ["systemctl", "stop", OTHER_SERVICE, f"ixyd@{OTHER}.socket", f"ixyd-metrics@{OTHER}.socket"],
        timeout=60,
    )
    container.run(["systemctl", "reset-failed", OTHER_SERVICE], check=False)
    config.unlink(missing_ok=True)
    for path in drop_in.glob("*"):
        path.unlink()
    container.run(["rm", "-f", f"/var/lib/ixyd/{OTHER}.json", f"/var/lib/ixyd/{OTHER}.json.bad"])
    container.run(["systemctl", "daemon-reload"])


def journal_of(container, unit: str) -> str:
    return container.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout


def test_a_configuration_the_daemon_refuses_is_not_restarted(container, other_instance):
    """ixyd exits 2 for a configuration it refuses (here a CPU the machine lacks, which only
    the daemon can tell): RestartPreventExitStatus=2, so systemd does not retry it, and
    ExecStopPost= gives the NICs back instead of keeping them for a restart."""
    other_instance(cpus=999)
    # enabled sockets listen from boot on (sockets.target)
    container.run(["systemctl", "start", f"ixyd-metrics@{OTHER}.socket"])
    assert active(container, f"ixyd-metrics@{OTHER}.socket")
    started = container.run(["systemctl", "start", OTHER_SERVICE], check=False, timeout=60)
    assert started.returncode != 0
    shown = container.show(OTHER_SERVICE, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert shown == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "2",
        "NRestarts": "0",
    }
    journal = journal_of(container, OTHER_SERVICE)
    assert "CPU 999 does not exist" in journal
    assert f"{OTHER}: gave back no NIC" in journal  # released, not kept for a restart
    # Its metrics socket (the file parses, so the generator gave it an address) does not
    # stay listening either: Prometheus' next scrape would start the same failure again.
    container.wait_for(
        lambda: container.show(f"ixyd-metrics@{OTHER}.socket", "ActiveState")["ActiveState"]
        == "inactive",
        "the metrics socket to stop with the failed instance",
    )
    host, port = OTHER_METRICS.split(":")
    scrape = container.run(
        [PYTHON, "-c", f"import socket; socket.create_connection(('{host}', {port}), timeout=5)"],
        check=False,
    )
    assert scrape.returncode != 0 and "ConnectionRefused" in scrape.stderr, scrape
    assert container.show(OTHER_SERVICE, "NRestarts", "ActiveState") == {
        "NRestarts": "0",
        "ActiveState": "failed",
    }


def test_a_daemon_systemd_cannot_start_does_not_keep_the_nics(container, other_instance):
    """ExecStartPre=+ runs outside the sandbox and binds the NICs; when systemd then cannot
    start the daemon itself (203/EXEC: say, ixyd installed below /home, hidden by
    ProtectHome=), ExecStopPost= must not leave them on vfio-pci for a restart."""
    other_instance(cpus=0, exec_start="/opt/ixyd/bin/no-such-ixyd %i")
    container.run(["systemctl", "start", OTHER_SERVICE], check=False, timeout=60)
    journal = container.wait_for(
        lambda: (j := journal_of(container, OTHER_SERVICE)) and "gave back" in j and j,
        "ExecStopPost after the failed exec",
    )
    assert "status=203/EXEC" in journal
    assert f"{OTHER}: gave back no NIC" in journal
    assert "stay on vfio-pci" not in journal


OTHER_CONFIG = (
    f'metrics = "{OTHER_METRICS}"\n'
    '[[port]]\naddress = "other.0"\nrx_ring = 64\ntx_ring = 64\npool_size = 256\n'
    'forward = "reflect"\n'
)
TYPOS = {
    "toml": ("[[port]\n" + OTHER_CONFIG, "not valid TOML"),
    "key": (OTHER_CONFIG.replace("rx_ring", "rx_rings"), "unknown key port[0].rx_rings"),
}


@pytest.mark.parametrize("typo", TYPOS)
def test_a_config_typo_is_not_restarted_and_the_failed_unit_says_why(
    container, other_instance, typo
):
    """A typo is noticed first by ExecStartPre= (prepare exits 2), whose status
    RestartPreventExitStatus= does not look at: the unit restarted until its start limit.
    Now it fails once, says why in its status line, and its socket is stopped with it."""
    text, reason = TYPOS[typo]
    other_instance(text=text)
    container.run(["systemctl", "start", f"ixyd@{OTHER}.socket"])
    started = container.run(["systemctl", "restart", OTHER_SERVICE], check=False, timeout=60)
    assert started.returncode != 0

    def settled():  # failed for good, or waiting to be restarted (or restarted)
        shown = container.show(
            OTHER_SERVICE, "ActiveState", "SubState", "NRestarts", "Result", "StatusText"
        )
        return shown if shown["ActiveState"] == "failed" or shown["NRestarts"] != "0" else None

    shown = container.wait_for(settled, "the failed start to settle", timeout=30)
    assert shown["NRestarts"] == "0" and shown["SubState"] == "failed", shown
    assert shown["Result"] == "exit-code"
    assert shown["StatusText"].startswith("ixyd-host prepare failed: configuration: ")
    assert reason in shown["StatusText"]
    container.wait_for(
        lambda: container.show(f"ixyd@{OTHER}.socket", "ActiveState")["ActiveState"] == "inactive",
        "the socket to stop with the failed instance",
    )
    # ixyd-ctl tells what happened and where to look
    answer = container.run([CTL, "-i", OTHER, "status"], check=False)
    assert answer.returncode == 3
    assert f"ixyd@{OTHER}.service failed (exit-code): ixyd-host prepare failed" in answer.stderr
    assert reason in answer.stderr and f"journalctl -u {OTHER_SERVICE}" in answer.stderr


def test_ixyd_ctl_that_starts_a_refused_instance_is_told_why(container, other_instance):
    """Through socket activation: the waiting client used to read "Connection reset by
    peer" after the socket had started the failing instance up to the start limit."""
    other_instance(text=TYPOS["key"][0])

    def prepare_runs() -> int:
        return journal_of(container, OTHER_SERVICE).count("ixyd-host: configuration: ")

    before = prepare_runs()
    container.run(["systemctl", "start", f"ixyd@{OTHER}.socket"])
    answer = container.run([CTL, "-i", OTHER, "--timeout", "30", "status"], check=False)
    assert answer.returncode != 0
    assert f"ixyd@{OTHER}.service failed (exit-code)" in answer.stderr, answer.stderr
    assert "unknown key port[0].rx_rings" in answer.stderr
    assert container.show(OTHER_SERVICE, "NRestarts")["NRestarts"] == "0"
    assert prepare_runs() - before == 1  # one start, not one per start limit


DEEP = "[" * 100_000 + "]" * 100_000
TAKEN = "ixtsystemd1"  # an interface the test makes


def saved_tap(ifname: str) -> dict:
    return {"version": 1, "ports": {"other.0": {"forward": {"mode": "tap", "ifname": ifname}}}}


SAVED_STATES = {
    # json.loads raises RecursionError: the start crashed (exit 1), restarted, crashed ...
    "nested": ('{"version": 1, "ports": {"other.0": {"forward": ' + DEEP + "}}}", False),
    # no `ixyd-host install --tap`: the TAP cannot be made (an uncaught RpcError)
    "tap without drop-in": (json.dumps(saved_tap("ixtsystemd0")), False),
    # the name is taken by another interface (exit 1)
    "tap name taken": (json.dumps(saved_tap(TAKEN)), True),
}


@pytest.mark.parametrize("saved", SAVED_STATES)
def test_a_state_file_that_cannot_be_restored_does_not_stop_the_start(
    container, other_instance, saved
):
    """Each of these crashed the start, and systemd restarted it into the same crash until
    the start limit: now the instance starts at once with its configured forwarding."""
    text, tap_drop_in = SAVED_STATES[saved]
    other_instance(text=OTHER_CONFIG)
    state = f"/var/lib/ixyd/{OTHER}.json"
    (container.root / state.lstrip("/")).write_text(text)
    container.run(["chown", "ixyd:ixyd", state])
    container.run(["chmod", "0666", "/dev/net/tun"])  # what udev does on a real host
    container.run(["ip", "link", "add", TAKEN, "type", "veth", "peer", "name", f"{TAKEN}p"])
    try:
        if tap_drop_in:
            container.run(["/opt/ixyd/bin/ixyd-host", "install", "--tap"])
        container.run(["systemctl", "start", OTHER_SERVICE], timeout=60)
        shown = container.show(OTHER_SERVICE, "ActiveState", "NRestarts")
        assert shown == {"ActiveState": "active", "NRestarts": "0"}
        listed = container.run([CTL, "-i", OTHER, "--json", "get-forward"]).stdout
        forward = json.loads(listed)["ports"][0]["forward"]
        assert forward == {"mode": "reflect", "swap_mac": False}  # the configuration's
        assert container.run(["cat", state + ".bad"]).stdout == text  # set aside
        assert "forward" not in container.run(["cat", state], check=False).stdout
    finally:
        container.run(["ip", "link", "del", TAKEN], check=False)
        if tap_drop_in:
            container.run(["/opt/ixyd/bin/ixyd-host", "install"])


def test_stop_leaves_nothing_behind(container):
    container.run(["systemctl", "start", SERVICE], timeout=60)
    pid = container.show(SERVICE, "MainPID")["MainPID"]
    container.run(["systemctl", "stop", SOCKET, SERVICE], timeout=60)
    shown = container.show(SERVICE, "ActiveState", "Result", "ControlGroup")
    assert shown["ActiveState"] == "inactive" and shown["Result"] == "success", shown
    assert container.show(SOCKET, "ActiveState")["ActiveState"] == "inactive"
    assert container.run(["pgrep", "-u", "ixyd"], check=False).returncode == 1  # no process
    assert container.run(["test", "-e", f"/run/ixyd/{INSTANCE}.sock"], check=False).returncode
    assert container.run(["ls", "-A", "/run/ixyd/vfio", "/dev/shm"]).stdout.split() == [
        "/dev/shm:",
        "/run/ixyd/vfio:",
    ]
    journal = container.run(
        ["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat", f"_PID={pid}"]
    ).stdout
    assert re.search(r"model card card: \d+ DMA mappings at exit, 0 remain", journal), journal
    assert "instance 0000:03:00.0 stopped" in journal
