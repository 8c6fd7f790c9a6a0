"""Instance configuration: `/etc/ixyd/<instance>.toml`, validated into dataclasses.

One ixyd process runs one instance; an instance owns one or more ports (the functions of
one IOMMU group must be owned by one process). `etc/ixyd/example.toml` documents every
key with its default. Every problem is a ConfigError naming the key (`port[1].rx_ring`)
and what is allowed, raised before any device is touched.

Instance names: a PCI address (`0000:03:00.0`) needs no file: without one, the instance
is that single function on the vfio backend. `demo` is built in (`demo_config`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from .control import FORWARD_MODES, MAX_FRAME, MIN_FRAME
from .device import parse_pci_address
from .drivers.config import MAX_QUEUES, PortConfig
from .errors import ConfigError

CONFIG_DIR = "/etc/ixyd"
DEFAULT_STATE_DIR = "/var/lib/ixyd"
BACKENDS = ("vfio", "model")
DEMO_INSTANCE = "demo"
DEMO_TRAFFIC_RATE = 10_000  # frames/s per direction: visible, and lossless on a 2-CPU box
MAX_IFNAME = 15  # IFNAMSIZ - 1
# The Prometheus endpoint: outside the exhausted 9100-9999 block of the default-port list,
# below the kernel's ephemeral range (32768-60999). One port per instance: docs/metrics.md.
DEFAULT_METRICS_PORT = 19911
DEFAULT_METRICS_ADDRESS = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
METRICS_OFF = ("", "off")
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9_@:.-]+")  # as control.py: a plain file name
_MODEL_ADDRESS = re.compile(r"(?P<nic>[A-Za-z0-9_-]+)\.(?P<index>[0-7])")  # `<nic>.<index>`
_FORWARD_KEYS = {  # set_forward's parameters per mode (docs/control.md)
    "port": {"to"},
    "reflect": {"swap_mac"},
    "drop": set(),
    "tap": {"ifname", "netns", "addresses", "mtu"},
    "generate": {"size", "rate", "count"},
}


@dataclass(frozen=True)
class Forward:
    """A port's forwarding: docs/control.md `Forward`. Checked by `Forward.parse`."""

    mode: str = "drop"
    to: str | None = None  # mode port
    swap_mac: bool = False  # mode reflect
    ifname: str | None = None  # mode tap
    netns: str | None = None  # mode tap: the network namespace to move the TAP into
    addresses: tuple[str, ...] = ()  # mode tap: addresses to give it ("10.0.0.1/24")
    mtu: int | None = None  # mode tap: its MTU (None: the kernel's default, 1500)
    size: int = MIN_FRAME  # mode generate: bytes without the FCS
    rate: int = 0  # mode generate: frames/s, 0 = as fast as possible
    count: int = 0  # mode generate: frames, 0 = no end

    @classmethod
    def parse(cls, value: Any, where: str = "forward") -> Forward:
        """A Forward from a mode string or a table/dict of set_forward's parameters
        (`port` excluded). Raises ConfigError naming `where` and the offending key. `to`
        is checked against the ports by the caller."""
        if isinstance(value, str):
            value = {"mode": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mode name or a table, got {value!r}")
        mode = value.get("mode")
        if mode not in FORWARD_MODES:
            raise ConfigError(
                f"{where}.mode must be one of {', '.join(FORWARD_MODES)}, got {mode!r}"
            )
        extra = sorted(set(value) - {"mode"} - _FORWARD_KEYS[mode])
        if extra:
            takes = ", ".join(sorted(_FORWARD_KEYS[mode])) or "no other keys"
            raise ConfigError(f"{where}: mode {mode} takes {takes}, not {', '.join(extra)}")
        args = {k: v for k, v in value.items() if k != "mode"}
        if mode == "port":
            if not isinstance(args.get("to"), str) or not args["to"]:
                raise ConfigError(f"{where}: mode port needs to = <port name or address>")
        if mode == "tap":
            ifname = args.get("ifname")
            if not isinstance(ifname, str) or not 1 <= len(ifname.encode()) <= MAX_IFNAME:
                raise ConfigError(
                    f"{where}: mode tap needs ifname = <interface name of 1..{MAX_IFNAME} bytes>"
                )
            netns = args.get("netns")
            if netns is not None and (
                not isinstance(netns, str) or not netns or "/" in netns or netns in (".", "..")
            ):
                raise ConfigError(
                    f"{where}.netns must be the name of a network namespace (ip netns list), "
                    f"got {netns!r}"
                )
            addresses = args.get("addresses", [])
            if not isinstance(addresses, list | tuple):
                raise ConfigError(f"{where}.addresses must be a list, got {addresses!r}")
            try:
                args["addresses"] = tuple(
                    str(ipaddress.ip_interface(a if isinstance(a, str) else None))
                    for a in addresses
                )
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where}.addresses must be addresses with prefix lengths "
                    f'("10.0.0.1/24", "fd00::1/64"), got {addresses!r}'
                ) from None
            mtu = args.get("mtu")
            if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)):
                raise ConfigError(f"{where}.mtu must be an integer, got {mtu!r}")
        if "swap_mac" in args and not isinstance(args["swap_mac"], bool):
            raise ConfigError(f"{where}.swap_mac must be true or false, got {args['swap_mac']!r}")
        for key, low, high in (
            ("size", MIN_FRAME, MAX_FRAME),
            ("rate", 0, None),
            ("count", 0, None),
        ):
            if key in args:
                v = args[key]
                if isinstance(v, bool) or not isinstance(v, int) or v < low or (high and v > high):
                    allowed = f"{low}..{high}" if high else f">= {low}"
                    raise ConfigError(f"{where}.{key} must be an integer {allowed}, got {v!r}")
        return cls(mode=mode, **args)

    def to_json(self) -> dict[str, Any]:
        """The docs/control.md `Forward` object (only the mode's own fields)."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "port":
            out["to"] = self.to
        elif self.mode == "reflect":
            out["swap_mac"] = self.swap_mac
        elif self.mode == "tap":
            out["ifname"] = self.ifname
            if self.netns is not None:
                out["netns"] = self.netns
            if self.addresses:
                out["addresses"] = list(self.addresses)
            if self.mtu is not None:
                out["mtu"] = self.mtu
        elif self.mode == "generate":
            out.update(size=self.size, rate=self.rate, count=self.count)
        return out


WIRE_KINDS = ("traffic", "cable", "tap", "none")


@dataclass(frozen=True)
class ModelWire:
    """What is plugged into a model port (docs: etc/ixyd/example.toml `wire`).

    traffic: the model's generator/checker ([model_traffic]); cable: another model port
    of the same card (`to`); tap: a kernel TAP interface (`ifname`) the model's wire reads
    and writes, so kernel traffic enters the port as if from the wire; none: nothing, the
    link stays down."""

    kind: str = "traffic"
    to: str | None = None  # cable
    ifname: str | None = None  # tap

    @classmethod
    def parse(cls, value: Any, where: str) -> ModelWire:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        kind, _, arg = value.partition(":")
        if kind in ("traffic", "none") and not arg:
            return cls(kind)
        if kind == "cable" and _MODEL_ADDRESS.fullmatch(arg):
            return cls(kind, to=arg)
        if kind == "tap" and 1 <= len(arg.encode()) <= MAX_IFNAME and "/" not in arg:
            return cls(kind, ifname=arg)
        raise ConfigError(
            f'{where} must be "traffic", "none", "cable:<card>.<index>" or '
            f'"tap:<interface name of 1..{MAX_IFNAME} bytes>", got {value!r}'
        )

    def to_text(self) -> str:
        arg = self.to or self.ifname
        return f"{self.kind}:{arg}" if arg else self.kind


@dataclass(frozen=True)
class PortSpec:
    """One port of the instance: where it is, how to bring it up, how to forward."""

    address: str
    backend: str
    port: PortConfig
    cpus: tuple[int, ...] = ()  # CPUs for this port's workers, one per RX queue, round-robin
    forward: Forward = field(default_factory=Forward)
    tx_queues: int | None = None  # None: one per worker of the instance
    wire: ModelWire | None = None  # model ports only (None for vfio); settled by build()

    @property
    def model_nic(self) -> str:
        """The model card's name (`demo` for `demo.0`)."""
        return self.address.rsplit(".", 1)[0]

    @property
    def model_index(self) -> int:
        return int(self.address.rsplit(".", 1)[1])


@dataclass(frozen=True)
class ModelTraffic:
    """What the model's wires carry: a generator/checker per model port, paired 0<->1."""

    rate: int = DEMO_TRAFFIC_RATE  # frames/s per port, 0 = as fast as the engine can
    frames: int = 0  # frames per port, 0 = no end
    size: int = MIN_FRAME
    flows: int = 16


@dataclass(frozen=True)
class InstanceConfig:
    """A whole instance. `source` is the file it came from (None: built in)."""

    instance: str
    ports: tuple[PortSpec, ...]
    control_socket: str | None = None  # None: <run dir>/<instance>.sock
    state_dir: str = DEFAULT_STATE_DIR
    give_back: bool = True  # rebind VFIO devices to their kernel driver on exit
    force_bind: bool = False  # take a NIC even if its netdev is up with addresses
    fault_injection: bool = False  # serve inject_fault (a test aid: hangs workers, unplugs ports)
    metrics: str | None = None  # host:port or "off"; None: DEFAULT_METRICS_ADDRESS
    traffic: ModelTraffic = field(default_factory=ModelTraffic)
    source: str | None = None

    def find_port(self, name: str) -> PortSpec | None:
        return next((p for p in self.ports if p.address == name), None)

    @property
    def worker_count(self) -> int:
        """One worker per RX queue, over all ports."""
        return sum(p.port.rx_queues for p in self.ports)


# ---------------------------------------------------------------------------- loading


def config_path(instance: str) -> str:
    return os.path.join(CONFIG_DIR, f"{instance}.toml")


def load(instance: str | None, path: str | None = None) -> InstanceConfig:
    """The configuration of `instance`: from `path` if given, else /etc/ixyd/<instance>.toml
    if it exists, else built in (a PCI address: that function on vfio). Raises ConfigError
    for a missing or unreadable file, bad TOML or a bad key."""
    if path is None and instance is not None:
        check_instance_name(instance)
        candidate = config_path(instance)
        if os.path.exists(candidate):
            path = candidate
    if path is None:
        if instance is None:
            raise ConfigError("name an instance (a PCI address or a config name), or use --demo")
        try:
            address = parse_pci_address(instance)
        except ValueError:
            raise ConfigError(
                f"no configuration for instance {instance!r}: {config_path(instance)} does not "
                "exist (and the name is not a PCI address); see etc/ixyd/example.toml"
            ) from None
        return build({"instance": address, "port": [{"address": address}]}, None)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if instance is not None:
        data.setdefault("instance", instance)
    elif "instance" not in data:
        data["instance"] = os.path.splitext(os.path.basename(path))[0]
    try:
        return build(data, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def demo_config(state_dir: str = DEFAULT_STATE_DIR, **traffic: int) -> InstanceConfig:
    """The `ixyd --demo` instance: two model ports forwarding to each other, with traffic."""
    return build(
        {
            "instance": DEMO_INSTANCE,
            "state_dir": state_dir,
            "model_traffic": traffic,
            "port": [
                {
                    "address": "demo.0",
                    "backend": "model",
                    "forward": {"mode": "port", "to": "demo.1"},
                },
                {
                    "address": "demo.1",
                    "backend": "model",
                    "forward": {"mode": "port", "to": "demo.0"},
                },
            ],
        },
        None,
    )


def check_instance_name(name: str) -> None:
    if not isinstance(name, str) or not _INSTANCE_NAME.fullmatch(name):
        raise ConfigError(
            f"instance name {name!r} must be a plain file name (letters, digits, _ @ : . -)"
        )


_TOP_KEYS = {
    "instance",
    "control_socket",
    "state_dir",
    "give_back",
    "force_bind",
    "fault_injection",
    "metrics",
    "port",
    "model_traffic",
}
_PORT_KEYS = {
    "address",
    "backend",
    "rx_queues",
    "tx_queues",
    "rx_ring",
    "tx_ring",
    "pool_size",
    "promisc",
    "cpus",
    "forward",
    "link_timeout",
    "wire",
}
_TRAFFIC_KEYS = {"rate", "frames", "size", "flows"}


def build(data: dict[str, Any], source: str | None) -> InstanceConfig:
    """Validate parsed TOML into an InstanceConfig (ConfigError naming the key)."""
    _no_unknown(data, _TOP_KEYS, "")
    instance = data.get("instance")
    check_instance_name(instance)
    ports_data = data.get("port")
    if not isinstance(ports_data, list) or not ports_data:
        raise ConfigError("[[port]]: an instance needs at least one port ([[port]] address = ...)")
    ports = [_port(p, f"port[{i}]") for i, p in enumerate(ports_data)]
    names = [p.address for p in ports]
    if len(set(names)) != len(names):
        raise ConfigError(f"port: an address is listed twice ({', '.join(names)})")
    for i, p in enumerate(ports):
        if p.forward.mode == "port":
            if p.forward.to not in names:
                raise ConfigError(
                    f"port[{i}].forward.to: no port {p.forward.to!r} (ports: {', '.join(names)})"
                )
            if p.forward.to == p.address:
                raise ConfigError(f"port[{i}].forward.to names the port itself; use mode reflect")
    ports = _settle_wires(ports)
    workers = sum(p.port.rx_queues for p in ports)
    for i, p in enumerate(ports):
        if p.tx_queues is not None and p.tx_queues < workers:
            raise ConfigError(
                f"port[{i}].tx_queues must be at least {workers} (one per worker of the "
                f"instance, so that every worker can send on every port), got {p.tx_queues}"
            )
        if workers > MAX_QUEUES:
            raise ConfigError(
                f"port: {workers} RX queues in all; every port needs a TX queue per worker, "
                f"at most {MAX_QUEUES}"
            )
    socket_path = data.get("control_socket")
    if socket_path is not None and (
        not isinstance(socket_path, str) or not socket_path.startswith("/")
    ):
        raise ConfigError(f"control_socket must be an absolute path, got {socket_path!r}")
    state_dir = data.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir:
        raise ConfigError(f"state_dir must be a directory path, got {state_dir!r}")
    flags = {}
    for key, default in (("give_back", True), ("force_bind", False), ("fault_injection", False)):
        flags[key] = data.get(key, default)
        if not isinstance(flags[key], bool):
            raise ConfigError(f"{key} must be true or false, got {flags[key]!r}")
    metrics = data.get("metrics")
    if metrics is not None:
        parse_listen_address(metrics)
    return InstanceConfig(
        instance=instance,
        ports=tuple(ports),
        control_socket=socket_path,
        state_dir=state_dir,
        metrics=metrics,
        traffic=_traffic(data.get("model_traffic", {})),
        source=source,
        **flags,
    )


def parse_listen_address(text: Any, where: str = "metrics") -> tuple[str, int] | None:
    """`host:port` (IPv6 as `[::1]:port`) as (host, port), port 0 meaning any free port;
    None for "" or "off". Raises ConfigError naming `where` for anything else."""
    if isinstance(text, str) and text.strip().lower() in METRICS_OFF:
        return None
    host, sep, port = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        if ":" in host and not bracketed:  # "::1:5": which colon ends the address?
            raise ValueError(host)
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError(port)
    except ValueError:
        raise ConfigError(
            f"{where} must be an IP address and a port, e.g. {DEFAULT_METRICS_ADDRESS!r} or "
            f"'[::1]:{DEFAULT_METRICS_PORT}', or 'off'; got {text!r}"
        ) from None
    return host, int(port)


def _port(data: Any, where: str) -> PortSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    _no_unknown(data, _PORT_KEYS, where + ".")
    address = data.get("address")
    if not isinstance(address, str):
        raise ConfigError(f"{where}.address is required: a PCI address or <model>.<index>")
    backend = data.get("backend")
    if backend is None:
        backend = "model" if _MODEL_ADDRESS.fullmatch(address) else "vfio"
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vfio":
        try:
            address = parse_pci_address(address)
        except ValueError as exc:
            raise ConfigError(f"{where}.address: {exc}") from None
    elif not _MODEL_ADDRESS.fullmatch(address):
        raise ConfigError(
            f"{where}.address: a model port is <card>.<index 0-7>, e.g. demo.0; got {address!r}"
        )
    settings = {
        key: data[key]
        for key in ("rx_queues", "rx_ring", "tx_ring", "pool_size", "promisc", "link_timeout")
        if key in data
    }
    tx_queues = data.get("tx_queues")
    if tx_queues is not None and (isinstance(tx_queues, bool) or not isinstance(tx_queues, int)):
        raise ConfigError(f"{where}.tx_queues must be an integer, got {tx_queues!r}")
    try:
        # tx_queues is settled once the instance's worker count is known (service.py)
        port = PortConfig(**settings, tx_queues=tx_queues or 1)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cpus = data.get("cpus", [])
    if not isinstance(cpus, list) or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cpus
    ):
        raise ConfigError(f"{where}.cpus must be a list of CPU numbers, got {cpus!r}")
    forward = Forward.parse(data.get("forward", "drop"), f"{where}.forward")
    wire = None
    if "wire" in data:
        if backend != "model":
            raise ConfigError(f"{where}.wire: only a model port has a wire to configure")
        wire = ModelWire.parse(data["wire"], f"{where}.wire")
    return PortSpec(address, backend, port, tuple(cpus), forward, tx_queues, wire)


def _settle_wires(ports: list[PortSpec]) -> list[PortSpec]:
    """Every model port's wire: as configured, or the far end of a cable the other port
    declares, else the traffic generator. A cable joins two model ports of one card that
    are both in this instance; its far end names it back or leaves `wire` out."""
    by_address = {p.address: (i, p) for i, p in enumerate(ports)}
    wires = {p.address: p.wire for p in ports if p.backend == "model"}
    for i, p in enumerate(ports):
        if p.wire is None or p.wire.kind != "cable":
            continue
        where = f"port[{i}].wire"
        far = by_address.get(p.wire.to)
        if far is None or far[1].backend != "model":
            raise ConfigError(f"{where}: {p.wire.to!r} is not a model port of this instance")
        j, peer = far
        if peer is p:
            raise ConfigError(f"{where}: a cable needs two ports, not {p.address} twice")
        if peer.model_nic != p.model_nic:
            raise ConfigError(
                f"{where}: {p.address} and {peer.address} are on different model cards; "
                "a cable joins two ports of one card"
            )
        if peer.wire is not None and peer.wire != ModelWire("cable", to=p.address):
            raise ConfigError(
                f"{where}: {peer.address} (port[{j}]) has wire {peer.wire.to_text()!r}; "
                f"leave it out or make it 'cable:{p.address}'"
            )
        wires[peer.address] = ModelWire("cable", to=p.address)
    taps = [w.ifname for w in wires.values() if w is not None and w.kind == "tap"]
    if len(set(taps)) != len(taps):
        raise ConfigError(f"port wire: a TAP interface is named twice ({', '.join(taps)})")
    return [
        p if p.backend != "model" else replace(p, wire=wires[p.address] or ModelWire())
        for p in ports
    ]


def _traffic(data: Any) -> ModelTraffic:
    if not isinstance(data, dict):
        raise ConfigError("[model_traffic] must be a table")
    _no_unknown(data, _TRAFFIC_KEYS, "model_traffic.")
    for key, low, high in (
        ("rate", 0, 10**9),
        ("frames", 0, 2**63),
        ("size", 60, 1514),
        ("flows", 1, 4096),
    ):
        v = data.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high
        ):
            raise ConfigError(f"model_traffic.{key} must be an integer {low}..{high}, got {v!r}")
    return ModelTraffic(**data)


def _no_unknown(data: dict, allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed: {', '.join(sorted(allowed))}"
        )
