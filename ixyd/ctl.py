"""`ixyd-ctl`: query and steer a running ixyd instance over its control socket.

    ixyd-ctl [-i INSTANCE | --socket PATH] [--json] [--timeout S] COMMAND [ARGS]

Each command is one JSON-RPC 2.0 call (docs/control.md) on a fresh connection. The result
is printed as a table, or as JSON with --json. Exit status: 0 ok, 1 the daemon returned
an error (printed to stderr), 2 usage error, 3 the daemon is not running or cannot be
reached, 4 permission denied, 5 no answer within the timeout.
"""

from __future__ import annotations

import argparse
import base64
import glob
import grp
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .control import DEFAULT_RUN_DIR, RUN_DIR_ENV, ErrorCode, socket_path
from .errors import ConfigError

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered with an error
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_NOT_RUNNING = 3  # no socket, nothing listening, or the socket cannot be reached
EXIT_PERMISSION = 4  # the socket's permissions or the daemon's authorization refused us
EXIT_TIMEOUT = 5  # no answer within --timeout

DEFAULT_TIMEOUT = 5.0  # seconds for connect + request + reply
UNIT_QUERY_TIMEOUT = 5.0  # seconds for `systemctl show` when the daemon cannot be reached
UNIT_SETTLE = 5.0  # seconds a unit whose start just failed may take to run its stop helpers
UNIT_SETTLE_POLL = 0.1  # seconds between two looks at it
MAX_REPLY = 16 * 1024 * 1024  # bytes; a longer reply line is a broken daemon


class CtlError(Exception):
    """A failure ixyd-ctl reports with `message` on stderr and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int, *, daemon_gone: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        # the daemon closed the connection unanswered: it died, or never started (a
        # socket-activated start that failed); its unit may say why
        self.daemon_gone = daemon_gone


class RemoteError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


# ---------------------------------------------------------------------------- the client
class ControlClient:
    """One connection to an ixyd control socket, with a deadline for each call.

    `who` names the daemon in messages ("ixyd instance 'demo'"). Raises CtlError with the
    exit code for anything but an error answer, which raises RemoteError.
    """

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT, who: str = "ixyd"):
        self.path, self.timeout, self.who = path, timeout, who
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise CtlError(
                f"{self.who} is not running (no socket at {self.path})", EXIT_NOT_RUNNING
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise CtlError(
                f"{self.who} is not running (stale socket at {self.path}: nothing listens on it)",
                EXIT_NOT_RUNNING,
            ) from None
        except PermissionError:
            sock.close()
            raise CtlError(_socket_permission_hint(self.path), EXIT_PERMISSION) from None
        except TimeoutError:
            sock.close()
            raise CtlError(
                f"{self.who} did not accept the connection within {self.timeout:g} s ({self.path})",
                EXIT_TIMEOUT,
            ) from None
        except OSError as exc:
            sock.close()
            raise CtlError(
                f"cannot connect to {self.who} at {self.path}: {exc.strerror or exc}",
                EXIT_NOT_RUNNING,
            ) from None
        self._sock = sock

    def call(self, method: str, params: dict | None = None) -> Any:
        """Call `method` and return its result. Raises RemoteError for an error answer."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request_id = self._next_id
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params:
            request["params"] = params
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            reply = self._read_reply(deadline)
        except TimeoutError:
            raise CtlError(
                f"no answer from {self.who} within {self.timeout:g} s", EXIT_TIMEOUT
            ) from None
        except OSError as exc:
            raise CtlError(
                f"{self.who} closed the connection: {exc.strerror or exc}",
                EXIT_ERROR,
                daemon_gone=True,
            ) from None
        if not isinstance(reply, dict) or reply.get("id") not in (request_id, None):
            raise CtlError(f"{self.who} sent an answer to another request: {reply!r}", EXIT_ERROR)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise RemoteError(
                error.get("code", ErrorCode.INTERNAL_ERROR),
                str(error.get("message", "unknown error")),
                error.get("data"),
            )
        if "result" not in reply:
            raise CtlError(f"{self.who} sent an answer without a result: {reply!r}", EXIT_ERROR)
        return reply["result"]

    def receive(self, timeout: float) -> Any | None:
        """The next message the daemon sends after a streaming method's result; None once
        it has closed the connection. CtlError EXIT_TIMEOUT after `timeout` s of silence."""
        assert self._sock is not None
        try:
            if b"\n" not in self._buffer:
                self._sock.settimeout(timeout)
                while b"\n" not in self._buffer:
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        return None
                    self._buffer += chunk
                    if len(self._buffer) > MAX_REPLY:
                        raise CtlError(f"{self.who} sent a line over {MAX_REPLY} bytes", EXIT_ERROR)
        except TimeoutError:
            raise CtlError(f"{self.who} sent nothing for {timeout:g} s", EXIT_TIMEOUT) from None
        except OSError as exc:
            raise CtlError(
                f"{self.who} closed the connection: {exc.strerror or exc}",
                EXIT_ERROR,
                daemon_gone=True,
            ) from None
        return self._pop_message()

    def send_line(self, data: bytes = b"\n") -> None:
        """Send raw bytes (a streaming method's stop request); errors are ignored: a
        daemon that is gone has stopped anyway."""
        if self._sock is not None:
            try:
                self._sock.sendall(data)
            except OSError:
                pass

    def _pop_message(self) -> Any:
        """The first complete line of the buffer, decoded as JSON."""
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError as exc:
            raise CtlError(
                f"{self.who} sent something that is not JSON: {exc}", EXIT_ERROR
            ) from None

    def _read_reply(self, deadline: float) -> Any:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise CtlError(
                    f"{self.who} closed the connection without answering",
                    EXIT_ERROR,
                    daemon_gone=True,
                )
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY:
                raise CtlError(f"{self.who} sent a reply over {MAX_REPLY} bytes", EXIT_ERROR)
        return self._pop_message()


def _socket_permission_hint(path: str) -> str:
    """'permission denied' with who may connect, from the socket file's owner and mode."""
    try:
        st = os.stat(path)
    except OSError:
        return f"permission denied connecting to {path} (its directory is not searchable)"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    mode = stat.S_IMODE(st.st_mode)
    who = "root" if owner == "root" else f"root or {owner}"
    return (
        f"permission denied connecting to {path} (owner {owner}, group {group}, mode {mode:04o}): "
        f"run as {who}, or join group '{group}'"
    )


# ---------------------------------------------------------------------------- units
def human_count(n: float) -> str:
    """12345678 -> '12.3M' (SI, three significant digits)."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{_three_digits(n / factor)}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (IEC, three significant digits)."""
    for factor, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= factor:
            return f"{_three_digits(n / factor)} {suffix}"
    return f"{n:.0f} B"


def human_rate(pps: float | None, bps: float | None) -> str:
    """Packets and bits per second: '14.9 Mpps 10.0 Gb/s'."""
    parts = [_with_unit(v, unit) for v, unit in ((pps, "pps"), (bps, "b/s")) if v is not None]
    return " ".join(parts) if parts else "-"


def _with_unit(value: float, unit: str) -> str:
    """12.3M + 'pps' -> '12.3 Mpps'."""
    text = human_count(value)
    if text[-1].isalpha():
        return f"{text[:-1]} {text[-1]}{unit}"
    return f"{text} {unit}"


def human_speed(mbps: int) -> str:
    """10000 -> '10 Gb/s', 100 -> '100 Mb/s'."""
    if mbps >= 1000:
        return f"{mbps / 1000:g} Gb/s"
    return f"{mbps} Mb/s"


def human_duration(seconds: float) -> str:
    """3723 -> '1h 02m 03s'."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _three_digits(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def parse_count(text: str) -> int:
    """'1.5M' -> 1500000; plain integers and the suffixes k, M, G (argparse type)."""
    factors = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
    try:
        if text and text[-1] in factors:
            value = float(text[:-1]) * factors[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 1000, 1.5M)") from None
    if value < 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(value)


# ---------------------------------------------------------------------------- rendering
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Aligned columns; the columns whose index is in `right` are right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i])
            for i in range(len(headers))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def describe_forward(forward: dict) -> str:
    """A forwarding setting in words: 'port demo.1', 'reflect, swap MAC', ..."""
    mode = forward.get("mode", "?")
    if mode == "port":
        return f"port {forward.get('to', '?')}"
    if mode == "reflect":
        return "reflect, swap MAC" if forward.get("swap_mac") else "reflect"
    if mode == "tap":
        where = f" in netns {forward['netns']}" if forward.get("netns") else ""
        return f"tap {forward.get('ifname', '?')}{where}"
    if mode == "generate":
        size = forward.get("size")
        rate = forward.get("rate", 0)
        count = forward.get("count", 0)
        return (
            f"generate {size if size is not None else '?'} B, "
            f"{_with_unit(rate, 'pps') if rate else 'max rate'}, "
            f"{f'{count} frames' if count else 'no end'}"
        )
    extra = ", ".join(f"{k} {v}" for k, v in forward.items() if k != "mode")
    return f"{mode}, {extra}" if extra else str(mode)


def render_status(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if key == "removed_ports" and not value:
            continue  # said only when a port's NIC is gone
        if key == "uptime_s" and isinstance(value, int | float):
            rows.append(("uptime", human_duration(value)))
        elif isinstance(value, list):
            rows.append((key, ", ".join(str(v) for v in value) or "-"))
        elif isinstance(value, dict):
            rows.append((key, ", ".join(f"{k} {v}" for k, v in value.items()) or "-"))
        else:
            rows.append((key, "-" if value is None else value))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _link_text(link: dict | None) -> str:
    if not link:
        return "-"
    return f"up {human_speed(link.get('speed_mbps', 0))}" if link.get("up") else "down"


def render_ports(result: dict) -> str:
    rows = [
        (
            p.get("name", "?"),
            p.get("address", "-"),
            p.get("backend", "-"),
            p.get("driver", "-"),
            p.get("mac", "-"),
            "REMOVED" if p.get("present") is False else _link_text(p.get("link")),
            "on" if p.get("promisc") else "off",
            f"{p.get('rx_queues', '?')}/{p.get('tx_queues', '?')}",
            describe_forward(p["forward"]) if p.get("forward") else "-",
        )
        for p in result.get("ports", [])
    ]
    headers = ("PORT", "ADDRESS", "BACKEND", "DRIVER", "MAC", "LINK", "PROMISC", "RX/TX Q")
    return table((*headers, "FORWARD"), rows, right=(7,))


_STATS_COLUMNS = (
    ("RX PACKETS", "rx_packets", human_count),
    ("RX BYTES", "rx_bytes", human_bytes),
    ("TX PACKETS", "tx_packets", human_count),
    ("TX BYTES", "tx_bytes", human_bytes),
    ("RX MISSED", "rx_missed", human_count),
)


def render_stats(result: dict, detail: bool) -> str:
    ports = result.get("ports", [])
    if detail and len(ports) == 1:
        return _render_port_counters(ports[0])
    with_rates = any(p.get("rates") for p in ports)
    headers = ["PORT", *(h for h, _, _ in _STATS_COLUMNS)]
    if with_rates:
        headers += ["RX RATE", "TX RATE"]
    rows = []
    for port in ports:
        counters = port.get("counters", {})
        # a port whose NIC is gone: its NIC counters are the last ones read
        row = [port.get("name", "?") + (" (removed)" if port.get("present") is False else "")]
        row += [fmt(counters[k]) if k in counters else "-" for _, k, fmt in _STATS_COLUMNS]
        if with_rates:
            rates = port.get("rates") or {}
            row += [human_rate(rates.get(f"{d}_pps"), rates.get(f"{d}_bps")) for d in ("rx", "tx")]
        rows.append(row)
    return table(headers, rows, right=range(1, len(headers)))


def _render_port_counters(port: dict) -> str:
    counters = port.get("counters", {})
    rows = [
        (name, f"{value:,}", human_bytes(value) if name.endswith("bytes") else human_count(value))
        for name, value in counters.items()
    ]
    for name, value in (port.get("rates") or {}).items():
        unit = "pps" if name.endswith("pps") else "b/s" if name.endswith("bps") else ""
        rows.append(
            (name, f"{value:,.0f}", _with_unit(value, unit) if unit else human_count(value))
        )
    return f"port {port.get('name', '?')}\n" + table(("COUNTER", "VALUE", ""), rows, right=(1, 2))


def render_link(result: dict) -> str:
    rows = [
        (p.get("name", "?"), "up" if p.get("up") else "down", human_speed(p["speed_mbps"]))
        if p.get("up")
        else (p.get("name", "?"), "REMOVED" if p.get("present") is False else "down", "-")
        for p in result.get("ports", [])
    ]
    return table(("PORT", "LINK", "SPEED"), rows, right=(2,))


def render_forward(result: dict) -> str:
    rows = [
        (p.get("name", "?"), describe_forward(p.get("forward", {})))
        for p in result.get("ports", [])
    ]
    return table(("PORT", "FORWARD"), rows)


# ---------------------------------------------------------------------------- commands
def _port_filter(args: argparse.Namespace) -> dict:
    return {"port": args.port} if args.port else {}


def _forward_params(args: argparse.Namespace) -> dict:
    params: dict[str, Any] = {"port": args.port, "mode": args.mode}
    if args.mode == "port":
        params["to"] = args.to
    elif args.mode == "reflect":
        params["swap_mac"] = args.swap_mac
    elif args.mode == "tap":
        params["ifname"] = args.ifname
        if args.netns is not None:
            params["netns"] = args.netns
        if args.address:
            params["addresses"] = args.address
        if args.mtu is not None:
            params["mtu"] = args.mtu
    elif args.mode == "generate":
        for name in ("size", "rate", "count"):
            if getattr(args, name) is not None:
                params[name] = getattr(args, name)
    return params


def _raw_params(args: argparse.Namespace) -> dict:
    return args.params


# command -> (wire method, params from args, renderer of the result)
Renderer = Callable[[Any, argparse.Namespace], str]
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], dict], Renderer]] = {
    "status": ("status", lambda a: {}, lambda r, a: render_status(r)),
    "ports": ("ports", lambda a: {}, lambda r, a: render_ports(r)),
    "stats": ("stats", _port_filter, lambda r, a: render_stats(r, detail=bool(a.port))),
    "link": ("link", _port_filter, lambda r, a: render_link(r)),
    "get-forward": ("get_forward", _port_filter, lambda r, a: render_forward(r)),
    "set-forward": (
        "set_forward",
        _forward_params,
        lambda r, a: (
            f"{r.get('name', a.port)}: forwarding {describe_forward(r.get('forward', {}))}"
        ),
    ),
    "reset-stats": (
        "reset_stats",
        _port_filter,
        lambda r, a: f"statistics reset: {', '.join(r.get('ports', [])) or 'no ports'}",
    ),
    "set-promisc": (
        "set_promisc",
        lambda a: {"port": a.port, "on": a.state == "on"},
        lambda r, a: (
            f"{r.get('name', a.port)}: promiscuous mode {'on' if r.get('promisc') else 'off'}"
        ),
    ),
    "shutdown": ("shutdown", lambda a: {}, lambda r, a: f"{a.who} is shutting down"),
    "reload": (
        "reload",
        lambda a: {},
        lambda r, a: (
            f"{a.who} re-read {r.get('config') or 'its built-in configuration'}; "
            f"applied: {', '.join(r.get('applied') or []) or 'nothing changed'}"
        ),
    ),
    "call": ("", _raw_params, lambda r, a: json.dumps(r, indent=2)),
    "debug": (
        "inject_fault",
        lambda a: (
            {"fault": "remove", "port": a.port}
            if a.fault == "remove-port"
            else {"fault": "stall", "worker": a.worker}
        ),
        lambda r, a: (
            f"port {r.get('port', a.port)} unplugged (fault injection)"
            if a.fault == "remove-port"
            else f"worker {r.get('worker', a.worker)} stalled (fault injection)"
        ),
    ),
}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            'the parameters must be a JSON object, e.g. \'{"port": "demo.0"}\''
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before and after the command (`ixyd-ctl stats --json`).
    common = argparse.ArgumentParser(add_help=False)
    target = common.add_mutually_exclusive_group()
    target.add_argument(
        "-i",
        "--instance",
        default=argparse.SUPPRESS,
        help=f"the instance to talk to: its socket is {DEFAULT_RUN_DIR}/INSTANCE.sock "
        f"(${RUN_DIR_ENV} overrides the directory); default: the only one running",
    )
    target.add_argument(
        "--socket", default=argparse.SUPPRESS, metavar="PATH", help="the control socket's path"
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the raw result"
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="S",
        help=f"seconds to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )
    parser = argparse.ArgumentParser(
        prog="ixyd-ctl",
        parents=[common],
        description="Query and steer a running ixyd instance over its control socket.",
        epilog="exit status: 0 ok, 1 the daemon returned an error, 2 usage error, "
        "3 not running / cannot connect, 4 permission denied, 5 timeout",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help, description=help)

    def optional_port(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("port", nargs="?", metavar="PORT", help="a port's name or PCI address")

    command("status", "the instance: state, version, uptime, ports")
    command("ports", "the ports: address, driver, MAC, link, forwarding")
    optional_port(command("stats", "packet and byte counters (all of them for one PORT)"))
    optional_port(command("link", "link state and speed"))
    optional_port(command("get-forward", "where each port's received frames go"))

    set_forward = command("set-forward", "change where a port's received frames go")
    set_forward.add_argument("port", metavar="PORT", help="a port's name or PCI address")
    modes = set_forward.add_subparsers(dest="mode", required=True, metavar="MODE")
    mode = modes.add_parser("port", help="out of another port of this instance", parents=[common])
    mode.add_argument("to", metavar="TARGET", help="the other port's name or PCI address")
    mode = modes.add_parser("reflect", help="back out of the same port", parents=[common])
    mode.add_argument("--swap-mac", action="store_true", help="swap source and destination MAC")
    modes.add_parser("drop", help="count and drop", parents=[common])
    mode = modes.add_parser(
        "tap", help="to the kernel through a TAP interface, and back", parents=[common]
    )
    mode.add_argument("ifname", metavar="IFNAME", help="the TAP interface's name")
    mode.add_argument("--netns", metavar="NS", help="move the TAP into network namespace NS")
    mode.add_argument(
        "--address",
        action="append",
        metavar="ADDR/LEN",
        help="give the TAP this address (10.0.0.1/24); repeat for more",
    )
    mode.add_argument("--mtu", type=parse_count, help="the TAP's MTU (68..2034)")
    mode = modes.add_parser(
        "generate", help="send generated frames instead of forwarding", parents=[common]
    )
    mode.add_argument("--size", type=parse_count, help="frame size in bytes, without the FCS")
    mode.add_argument("--rate", type=parse_count, metavar="PPS", help="frames per second")
    mode.add_argument("--count", type=parse_count, metavar="N", help="frames to send")

    optional_port(command("reset-stats", "set the counters back to zero"))
    set_promisc = command("set-promisc", "accept frames for any MAC address, or not")
    set_promisc.add_argument("port", metavar="PORT", help="a port's name or PCI address")
    set_promisc.add_argument("state", choices=("on", "off"))
    command("shutdown", "stop the instance (workers, device, socket)")
    command(
        "reload",
        "re-read the configuration file and apply what it changed; exit 1, with the running "
        "configuration kept, when the file is refused (systemctl reload runs this)",
    )
    capture = command(
        "capture", "write the frames a port receives to a pcap file (tshark, tcpdump read it)"
    )
    capture.add_argument("port", metavar="PORT", help="a port's name or PCI address")
    capture.add_argument(
        "-w", "--write", required=True, metavar="FILE", help="the pcap file; - for stdout"
    )
    capture.add_argument("-c", "--count", type=parse_count, metavar="N", help="stop after N frames")
    capture.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    capture.add_argument(
        "-s", "--snaplen", type=int, metavar="BYTES", help="bytes kept per frame (14..2048)"
    )
    call = command("call", "call any method; prints its JSON result")
    call.add_argument("method", metavar="METHOD")
    call.add_argument("params", nargs="?", type=_json_object, default={}, metavar="JSON-PARAMS")
    debug = command(
        "debug",
        "test aids, not for production: `stall-worker` makes a worker hang (its loop spins "
        "without polling), so that the systemd watchdog restarts the instance; `remove-port` "
        "unplugs a model port (its NIC reads all-ones); only for an instance configured "
        "with fault_injection = true",
    )
    debug.add_argument("fault", choices=("stall-worker", "remove-port"))
    debug.add_argument("--worker", type=int, default=0, metavar="N", help="worker number (0)")
    debug.add_argument("--port", metavar="PORT", help="the model port to unplug (remove-port)")
    return parser


# ---------------------------------------------------------------------------- capture
CAPTURE_SILENCE = 10.0  # seconds without a message (the daemon sends progress every 1 s)
_CAPTURE_ENDS = {"count": "count reached", "duration": "duration over", "stopped": "stopped"}


def run_capture(args: argparse.Namespace, client: ControlClient) -> int:
    """`ixyd-ctl capture`: the daemon streams pcap bytes, we write them to args.write (-:
    stdout). The first Ctrl-C asks the daemon to stop (the file gets every frame captured
    until then), a second one leaves at once. Raises CtlError / RemoteError."""
    params: dict[str, Any] = {"port": args.port}
    for name in ("count", "duration", "snaplen"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    to_stdout = args.write == "-"
    if to_stdout and sys.stdout.isatty():
        raise CtlError("not writing a pcap file to a terminal: use -w FILE or a pipe", EXIT_USAGE)
    interrupted = []

    def on_sigint(signum, frame) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        # read after the request (even before its answer): the daemon stops, sends what
        # it has captured and its end
        client.send_line()

    previous = signal.signal(signal.SIGINT, on_sigint)
    frames, end, out, result = 0, None, None, None
    try:
        result = client.call("capture", params)
        try:
            out = sys.stdout.buffer if to_stdout else open(args.write, "wb")  # noqa: SIM115
        except OSError as exc:
            raise CtlError(
                f"cannot write {args.write}: {exc.strerror or exc}", EXIT_ERROR
            ) from None
        while True:
            message = client.receive(max(client.timeout, CAPTURE_SILENCE))
            if message is None:
                break
            method = message.get("method") if isinstance(message, dict) else None
            body = message.get("params") if isinstance(message, dict) else None
            body = body if isinstance(body, dict) else {}
            if method == "capture.data":
                out.write(base64.b64decode(body.get("data", "")))
                out.flush()
                frames += int(body.get("frames", 0))
            elif method == "capture.end":
                end = body
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `ixyd-ctl capture ... -w - | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        end = {"reason": "the reader of stdout went away"}
    finally:
        signal.signal(signal.SIGINT, previous)
        if out is not None and not to_stdout:
            out.close()
    where = "stdout" if to_stdout else args.write
    port = result.get("port", args.port) if isinstance(result, dict) else args.port
    if end is None:
        print(
            f"ixyd-ctl: capture of {port} cut short: {frames} frames written to {where}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    dropped = end.get("dropped", 0)
    note = f"; {dropped} not captured: the capture ring was full" if dropped else ""
    reason = _CAPTURE_ENDS.get(end.get("reason"), end.get("reason", "?"))
    print(
        f"ixyd-ctl: {frames} frames of {port} written to {where} ({reason}{note})",
        file=sys.stderr,
    )
    if end.get("message"):
        print(f"ixyd-ctl: {end['message']}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def unit_hint(instance: str, settle: float = 0.0) -> str | None:
    """Where to look when `instance` cannot be reached and systemd manages it: the state of
    ixyd@INSTANCE.service and its status line, which says why a start failed (the daemon
    and the ixyd-host helpers put it there). Waits up to `settle` seconds for a unit that
    is still deactivating (its stop helpers run) to end up failed or inactive. None
    without systemd, without such a unit, or when the unit is active."""
    if not os.path.isdir("/run/systemd/system"):  # booted with systemd (sd_booted(3))
        return None
    unit = f"ixyd@{instance}.service"
    query = "--property=LoadState,ActiveState,SubState,Result,StatusText"
    deadline = time.monotonic() + settle
    while True:
        try:
            done = subprocess.run(
                ["systemctl", "show", query, "--", unit],
                capture_output=True,
                text=True,
                timeout=UNIT_QUERY_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        shown = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        if done.returncode != 0 or shown.get("LoadState") != "loaded":
            return None
        if shown.get("ActiveState") != "deactivating" or time.monotonic() >= deadline:
            break
        time.sleep(UNIT_SETTLE_POLL)
    if shown.get("ActiveState") == "active":
        return None
    if shown.get("ActiveState") == "failed":
        state = f"{unit} failed ({shown.get('Result', '?')})"
    else:
        state = f"{unit} is {shown.get('ActiveState', '?')} ({shown.get('SubState', '?')})"
    why = shown.get("StatusText")
    return (
        f"{state}{': ' + why if why else ''}; see `systemctl status {unit}` and "
        f"`journalctl -u {unit}`"
    )


def _report(exc: CtlError, args: argparse.Namespace, path: str | None) -> int:
    """Print a failure; when the daemon is gone or not there, add what its unit says."""
    print(f"ixyd-ctl: {exc}", file=sys.stderr)
    instance = getattr(args, "instance", None)
    if instance is None and path is not None and not hasattr(args, "socket"):
        instance = os.path.basename(path).removesuffix(".sock")  # the only one running
    if instance and (exc.daemon_gone or exc.exit_code in (EXIT_NOT_RUNNING, EXIT_TIMEOUT)):
        hint = unit_hint(instance, UNIT_SETTLE if exc.exit_code != EXIT_TIMEOUT else 0.0)
        if hint:
            print(f"ixyd-ctl: {hint}", file=sys.stderr)
    return exc.exit_code


def _find_socket(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str]:
    """(socket path, how to name the daemon in messages)."""
    if hasattr(args, "socket"):
        return args.socket, "ixyd"
    if hasattr(args, "instance"):
        try:
            return socket_path(args.instance), f"ixyd instance '{args.instance}'"
        except ConfigError as exc:
            parser.error(str(exc))
    run_dir = os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR
    found = sorted(glob.glob(os.path.join(glob.escape(run_dir), "*.sock")))
    if not found:
        raise CtlError(
            f"no ixyd instance is running (no socket in {run_dir}); "
            "name one with -i INSTANCE or --socket PATH",
            EXIT_NOT_RUNNING,
        )
    if len(found) > 1:
        names = ", ".join(os.path.basename(p)[: -len(".sock")] for p in found)
        parser.error(f"several ixyd instances are running ({names}): choose one with -i INSTANCE")
    instance = os.path.basename(found[0])[: -len(".sock")]
    return found[0], f"ixyd instance '{instance}'"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "instance") and hasattr(args, "socket"):
        parser.error("give -i INSTANCE or --socket PATH, not both")
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    if not timeout > 0:
        parser.error(f"--timeout must be more than 0 seconds, got {timeout:g}")
    if args.command == "debug" and args.fault == "remove-port" and not args.port:
        parser.error("debug remove-port needs --port PORT")
    as_json = getattr(args, "json", False)
    path = None
    if args.command == "capture":
        try:
            path, args.who = _find_socket(args, parser)
            with ControlClient(path, timeout=timeout, who=args.who) as client:
                return run_capture(args, client)
        except CtlError as exc:
            return _report(exc, args, path)
        except RemoteError as exc:
            print(f"ixyd-ctl: {exc.message}", file=sys.stderr)
            return EXIT_PERMISSION if exc.code == ErrorCode.UNAUTHORIZED else EXIT_ERROR
    method, params_of, render = COMMANDS[args.command]
    if args.command == "call":
        method = args.method
    try:
        path, args.who = _find_socket(args, parser)
        with ControlClient(path, timeout=timeout, who=args.who) as client:
            result = client.call(method, params_of(args))
    except CtlError as exc:
        return _report(exc, args, path)
    except RemoteError as exc:
        if args.command == "debug" and exc.code == ErrorCode.METHOD_NOT_FOUND:
            exc.message = (
                f"{args.who} has fault injection off: set fault_injection = true in its "
                "configuration and restart it (a test aid, never for production)"
            )
        print(f"ixyd-ctl: {exc.message}", file=sys.stderr)
        return EXIT_PERMISSION if exc.code == ErrorCode.UNAUTHORIZED else EXIT_ERROR
    warnings = result.get("warnings") if isinstance(result, dict) else None
    for warning in warnings if isinstance(warnings, list) else ():
        print(f"ixyd-ctl: warning: {warning}", file=sys.stderr)  # e.g. a change not saved
    try:
        print(json.dumps(result, indent=2) if as_json else render(result, args))
        sys.stdout.flush()
    except BrokenPipeError:  # `ixyd-ctl stats | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        print(
            f"ixyd-ctl: {args.who} answered '{method}' in an unexpected shape ({exc!r}); "
            "use --json to see it",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
