"""`ixyd`: the daemon. One instance per process: its ports, pinned workers, the control socket.

    ixyd 0000:03:00.0              the instance for that function (/etc/ixyd/<name>.toml)
    ixyd NAME --config FILE        an instance described by FILE
    ixyd --demo                    two model ports with traffic, forwarding to each other

Life cycle: load the configuration, lay the persisted runtime state over it, open the
devices (VFIO or the model), bring every port up with its driver, build one worker per RX
queue (each can send on a TX queue of every port), set the forwarding, start the workers,
serve the control socket, then wait. SIGTERM / SIGINT / the `shutdown` method stop it:
control socket, workers (bounded), ports, devices (given back to their kernel driver when
configured). SIGHUP re-reads the configuration.

Threads: the main thread waits and samples rates; control handlers run on the
`ixyd-control` thread and only flip forwarding entries and read counters; workers never
wait for either.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from . import __version__
from .capture import CaptureSession, CaptureSource
from .config import (
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_STATE_DIR,
    DEMO_INSTANCE,
    Forward,
    InstanceConfig,
    PortSpec,
    demo_config,
    load,
    parse_listen_address,
)
from .control import IXYD_METHODS, ControlServer, ErrorCode, RpcError, Stream
from .drivers import ixgbe
from .drivers.port import IntelPort
from .drivers.rings import Mempool, RxQueue
from .drivers.selection import driver_for
from .errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    ConfigError,
    DeviceRemovedError,
    IxydError,
    UnsupportedDeviceError,
)
from .metrics import IxydCollector, MetricsError, MetricsServer
from .sdnotify import Notifier, ProgressWatchdog, status_text
from .state import StateStore
from .worker import QUEUE_STATS_FIELDS, ForwardingTable, Worker

log = logging.getLogger("ixyd")

NETLINK_TIMEOUT = 5.0  # seconds a TAP interface may take to be created or removed
RATE_INTERVAL = 1.0  # seconds between rate samples (stats `rates`)
CAPTURE_STOP_TIMEOUT = 2.0  # seconds a capture may take to disarm and end
WORKER_STOP_TIMEOUT = 2.0  # seconds each worker gets to leave its loop
CHANGE_WAIT = 2.0  # seconds a control request waits for another change before BUSY
GENERATOR_ETHERTYPE = 0x88B5  # IEEE 802 local experimental: never mistaken for real traffic
GENERATOR_SEQ_OFFSET = 14  # the sequence number right after the Ethernet header
BROADCAST = b"\xff" * 6
# per-RX-queue worker counters added to a port's `counters`: every drop and exception
# counter of the worker; packets and bytes come from the driver, `sent` is `forwarded`
WORKER_COUNTERS = tuple(f for f in QUEUE_STATS_FIELDS if f not in ("packets", "bytes", "sent"))
EXIT_DEVICE = EXIT_FAILED  # the device or the host refused: a restart may help
INIT_TIMEOUT_MARGIN = 15.0  # seconds a port's init may take besides its link wait (systemd)


class ServicePort:
    """One running port: its driver, the workers that poll its RX queues, its forwarding."""

    def __init__(self, spec: PortSpec, driver: IntelPort, backend_handle: Any = None):
        self.spec = spec
        self.name = spec.address
        self.driver = driver
        self.backend_handle = backend_handle  # VfioDevice, or None for the model
        self.forward = Forward()
        self.workers: list[tuple[Worker, RxQueue, int]] = []  # (worker, its RX queue, index k)
        self.generating: tuple[Worker, Any] | None = None  # (worker, TX queue) of the generator
        self.generators: list[Any] = []  # every Generator started on this port, for counters
        # mode tap: (TapInterface, [a TapBridge per RX queue]); the bridges share the TAP's
        # fd (each read and write is one whole frame), each serves its worker's channel
        self.tap: tuple[Any, list[Any]] | None = None
        # every TAP made for this port, by name: kept with its namespace, addresses and MTU
        # until the instance stops, so leaving tap mode and coming back cuts no kernel peer
        # off; and what its bridges counted, per RX queue, across their lifetimes
        self.taps: dict[str, Any] = {}
        self.tap_counts: list[dict[str, int]] = []
        self.baseline: dict[str, int] = {}
        self.rates: dict[str, float] | None = None
        self.traffic = None  # the model's TrafficEndpoint on this port's wire, demo only
        # Set when the NIC is found gone (reads all-ones: unplugged, PCIe link lost, reset
        # by someone else): the reason. The port's NIC counters stay at their last values,
        # its link reads down and the instance serves its other ports; a restart is needed
        # to use the NIC again.
        self.removed: str | None = None
        self.last_driver_stats: dict[str, int] = {}

    @property
    def present(self) -> bool:
        return self.removed is None


class Instance:
    """A running ixyd instance. `start()`, then `run()` until stopped, then `stop()`."""

    def __init__(
        self,
        config: InstanceConfig,
        *,
        run_dir: str | None = None,
        config_path=None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.notifier = notifier or Notifier(None)  # systemd: READY, STATUS, watchdog
        self.config_path = config_path
        self.run_dir = run_dir
        self.state = "starting"
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.table = ForwardingTable()
        self.ports: list[ServicePort] = []
        # runtime changes come from the control thread (ixyd-ctl) and from SIGHUP reloads
        # (main thread): one at a time
        self._changes = threading.Lock()
        self._reloading = threading.Lock()  # SIGHUP (main thread) or `reload` (control)
        self.workers: list[Worker] = []
        self.store = StateStore(config.state_dir, config.instance)
        self.server: ControlServer | None = None
        self.failure: str | None = None  # why run() gave up; main() then exits EXIT_FAILED
        self.metrics: MetricsServer | None = None
        self._model_nics: dict[str, Any] = {}
        self._vfio_container = None
        self._bindings: list[Any] = []
        self._wire_taps: list[Any] = []  # TAP interfaces plugged into model ports' wires
        self._last_sample: tuple[float, dict[str, dict[str, int]]] | None = None
        self._captures: dict[str, CaptureSession] = {}  # by port name: one capture per port
        self._captures_lock = threading.Lock()  # sessions end on their own threads

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Bring everything up; on failure release what was set up and re-raise."""
        try:
            self.server = self._control_server()
            # a second start of a running instance stops here, before it opens the devices
            # the first one drives (a VFIO group, or a NIC it would reset)
            self.server.check_not_running()
            saved = self.store.load()
            self._open_ports()
            self._build_workers()
            for port in self.ports:
                self._restore(port, saved.get(port.name, {}))
            for worker in self.workers:
                worker.start()
            self._start_traffic()
            self._serve_metrics()
            # running before the socket serves: with socket activation a client is already
            # waiting, and its first status must not say "starting" about a running instance
            self.state = "running"
            self._serve_control()
            log.info(
                "instance %s running: %d ports, %d workers",
                self.config.instance,
                len(self.ports),
                len(self.workers),
            )
        except BaseException:
            self.stop()
            raise

    def _open_ports(self) -> None:
        workers = self.config.worker_count
        devices = [self._open_device(spec) for spec in self.config.ports]
        # a model port's link is up only with something on its wire: plug the wires in
        # before the driver waits for the link
        wires = {
            spec.address: self._plug_wire(spec, dev)
            for spec, dev in zip(self.config.ports, devices, strict=True)
            if spec.backend == "model"
        }
        for spec, dev in zip(self.config.ports, devices, strict=True):
            config = dataclasses.replace(spec.port, tx_queues=spec.tx_queues or workers)
            driver_class = _driver_class(dev)
            log.info(
                "%s: bringing up (%s backend)",
                spec.address,
                spec.backend,
                extra={"DEVICE": spec.address},
            )
            # the driver waits up to link_timeout for the link: tell systemd's start timeout
            self.notifier.extend_timeout(config.link_timeout + INIT_TIMEOUT_MARGIN)
            driver = driver_class(dev, config)
            port = ServicePort(spec, driver, dev if spec.backend == "vfio" else None)
            port.last_driver_stats = dict(driver.stats())  # what a NIC gone later keeps
            port.traffic = wires.get(spec.address)
            self.ports.append(port)

    def _plug_wire(self, spec: PortSpec, dev):
        """Plug the configured wire into model port `dev`; the TrafficEndpoint for a
        generator/checker, else None."""
        wire = spec.wire
        if wire.kind == "traffic":
            return dev.nic.attach_traffic(dev)
        if wire.kind == "cable":
            if spec.model_index < int(wire.to.rsplit(".", 1)[1]):  # once per cable
                peer = self._open_device(self.config.find_port(wire.to))
                dev.nic.connect(dev, peer)
        elif wire.kind == "tap":
            from .tap import TapInterface

            tap = TapInterface.create(wire.ifname)
            self._wire_taps.append(tap)  # removed after the model card stops (stop())
            dev.nic.attach_tap(dev, tap.fd)
            log.info("%s: wire plugged into TAP interface %s", spec.address, wire.ifname)
        return None

    def _open_device(self, spec: PortSpec):
        if spec.backend == "model":
            from .model import ModelNic  # the model is only loaded when a port uses it

            nic = self._model_nics.get(spec.model_nic)
            if nic is None:
                count = 1 + max(
                    p.model_index
                    for p in self.config.ports
                    if p.backend == "model" and p.model_nic == spec.model_nic
                )
                nic = ModelNic(count, mode="thread", name=spec.model_nic)
                self._model_nics[spec.model_nic] = nic
            return nic.ports[spec.model_index]
        from .pci import bind_vfio
        from .vfio import VfioContainer, VfioDevice

        self._bindings.append(bind_vfio(spec.address, force=self.config.force_bind))
        if self._vfio_container is None:
            self._vfio_container = VfioContainer()
        return VfioDevice.open(spec.address, self._vfio_container)

    def _build_workers(self) -> None:
        """One worker per RX queue; worker k sends on TX queue k of every port."""
        allowed = sorted(os.sched_getaffinity(0))
        k = 0
        for port in self.ports:
            cpus = list(port.spec.cpus)
            for q, rxq in enumerate(port.driver.rx_queues):
                cpu = cpus[q % len(cpus)] if cpus else allowed[k % len(allowed)]
                worker = Worker(
                    self.table,
                    [rxq],
                    [p.driver.tx_queues[k] for p in self.ports],
                    cpu=cpu,
                    name=f"ixyd-w{k}-{port.name}.q{q}",
                    exception_queues=[rxq],
                )
                self.workers.append(worker)
                port.workers.append((worker, rxq, k))
                k += 1

    def _restore(self, port: ServicePort, saved: dict[str, Any]) -> None:
        """Lay the saved settings of `port` over its configuration. A saved forwarding that
        cannot be applied (it makes no sense, names a port that is gone, or needs a TAP the
        sandbox or another interface's name forbids) is logged and set aside in the state
        file, and the configuration's forwarding is used: a state file never stops a start."""
        restored = False
        if "forward" in saved:
            try:
                forward = Forward.parse(saved["forward"], f"state {port.name}.forward")
                self._check_target(port, forward)
                log.info("%s: restoring forwarding %s", port.name, forward.to_json())
                self._apply_forward(port, forward)
                restored = True
            except (IxydError, RpcError) as exc:  # ConfigError, TapError, DeviceError ...
                log.warning(
                    "%s: cannot restore the saved forwarding, using the configuration's: %s",
                    port.name,
                    exc,
                )
                self.store.set_aside_setting(port.name, "forward", exc)
        if not restored:
            self._apply_forward(port, port.spec.forward)
        promisc = saved.get("promisc")
        if isinstance(promisc, bool) and promisc != port.driver.promisc:
            port.driver.set_promisc(promisc)

    def _start_traffic(self) -> None:
        """Each model port faces a generator/checker; ports 2i and 2i+1 of a card are paired:
        what one generator sends into its port is checked leaving the other."""
        t = self.config.traffic
        model = {(p.spec.model_nic, p.spec.model_index): p for p in self.ports if p.traffic}
        for (_, index), port in model.items():
            port.traffic.configure(
                size=t.size, flows=t.flows, count=t.frames, rate=t.rate, stream=index + 1
            )
        for (nic, index), port in model.items():
            peer = model.get((nic, index ^ 1))
            if peer is not None:
                port.traffic.pair(peer.traffic)
        for port in model.values():
            port.traffic.start()

    def _control_server(self) -> ControlServer:
        if self.config.control_socket:
            return ControlServer(self.config.control_socket)
        return ControlServer.for_instance(self.config.instance, run_dir=self.run_dir)

    def _serve_control(self) -> None:
        server = self.server
        assert server is not None
        handlers = {
            "status": self.rpc_status,
            "ports": self.rpc_ports,
            "stats": self.rpc_stats,
            "link": self.rpc_link,
            "get_forward": self.rpc_get_forward,
            "set_forward": self.rpc_set_forward,
            "reset_stats": self.rpc_reset_stats,
            "set_promisc": self.rpc_set_promisc,
            "shutdown": self.rpc_shutdown,
            "reload": self.rpc_reload,
            "inject_fault": self.rpc_inject_fault,
            "capture": self.rpc_capture,
        }
        if self.config.fault_injection:
            log.warning(
                "fault injection is on (fault_injection = true): a test aid, not for production"
            )
        else:  # off: the method does not exist (docs/control.md, inject_fault)
            del handlers["inject_fault"]
        for name, spec in IXYD_METHODS.items():
            if name not in handlers:
                continue
            server.register(
                name,
                handlers[name],
                params_schema=spec.params,
                mutating=spec.mutating,
                streaming=spec.streaming,
            )
        server.serve()

    def _serve_metrics(self) -> None:
        """The Prometheus endpoint (metrics.py): the socket systemd hands over as `metrics`,
        else the configured address. Only the built-in default may be taken by someone
        else (a second instance, a test): the instance then runs without metrics and says
        so; an address the configuration asked for must be served or the start fails (exit
        1: the port may be free on the next try). Under ixyd@.service the port must come
        from ixyd-metrics@.socket (MetricsServer.for_instance)."""
        configured = self.config.metrics
        address = parse_listen_address(
            DEFAULT_METRICS_ADDRESS if configured is None else configured
        )
        collector = IxydCollector(lambda: self.ports, self.config.instance)
        server = MetricsServer.for_instance(collector, address)
        if server is None:
            log.info("metrics: off")
            return
        try:
            server.serve()
        except MetricsError as exc:
            if configured is not None or server.activated:
                raise
            log.warning(
                "%s; running without metrics (set `metrics` in the configuration, or "
                "--metrics ADDR)",
                exc,
            )
            return
        self.metrics = server

    # ------------------------------------------------------------------ forwarding
    def _find(self, name: str) -> ServicePort:
        for port in self.ports:
            if name in (port.name, port.driver.dev.address):
                return port
        names = ", ".join(p.name for p in self.ports)
        raise RpcError(ErrorCode.NOT_FOUND, f"no port {name!r} (ports: {names})")

    def _check_target(self, port: ServicePort, forward: Forward) -> None:
        if forward.mode == "port":
            target = self._find(forward.to)
            if target is port:
                raise ConfigError(f"{port.name}: 'to' names the port itself; use mode reflect")

    def _apply_forward(self, port: ServicePort, forward: Forward) -> None:
        """Steer every RX queue of `port`; workers pick the change up between two batches.
        Raises ConfigError / RpcError before anything changes when the setting is refused."""
        tap = self._open_tap(port, forward) if forward.mode == "tap" else None
        target = self._find(forward.to) if forward.mode == "port" else None
        if forward.mode != "generate" and port.generating is not None:
            worker, txq = port.generating
            worker.stop_generator(txq)
            port.generating = None
        for _, rxq, k in port.workers:
            if forward.mode == "port":
                self.table.set(rxq, "port", tx=target.driver.tx_queues[k])
            elif forward.mode == "tap":
                self.table.set(rxq, "exception", tx=port.driver.tx_queues[k])
            elif forward.mode == "reflect":
                self.table.set(
                    rxq, "reflect", tx=port.driver.tx_queues[k], swap_mac=forward.swap_mac
                )
            else:  # drop, and generate (what arrives is dropped while we send)
                self.table.set(rxq, "drop")
        if forward.mode == "generate":
            self._start_generator(port, forward)
        if port.tap is not None and port.tap is not tap:
            self._close_tap(port)  # after the entry changed: the worker sends what it holds
        port.tap = tap
        port.forward = forward

    def _open_tap(self, port: ServicePort, forward: Forward):
        """The TAP interface and its bridges for mode tap (the current ones if unchanged).
        A TAP this port made before is bridged again as it is (its namespace, addresses,
        MTU and whatever an administrator set stay), after applying what `forward` asks
        for; only a new name makes a new TAP. Raises RpcError DEVICE_ERROR when
        ixyd/tap.py is missing or the TAP cannot be made or configured."""
        if port.tap is not None and port.forward == forward:
            return port.tap
        if importlib.util.find_spec("ixyd.tap") is None:
            raise RpcError(ErrorCode.DEVICE_ERROR, "tap mode is not available in this build")
        from .tap import TapBridge, TapInterface, new_bridge_counts

        settings = dict(netns=forward.netns, mtu=forward.mtu, addresses=forward.addresses)
        tap = port.taps.get(forward.ifname)
        if tap is not None and not tap.attached:  # someone deleted it: make it anew
            log.warning("%s: TAP interface %s was deleted; creating it again", port.name, tap.name)
            if port.tap is not None and port.tap[0] is tap:
                self._close_tap(port)
            del port.taps[tap.name]
            self._off_loop(tap.close)
            tap = None
        try:
            if tap is None:
                tap = self._off_loop(
                    lambda: TapInterface.create(forward.ifname, mac=port.driver.mac, **settings)
                )
                port.taps[tap.name] = tap
            elif any(v for v in settings.values()):  # nothing asked: no netlink at all
                self._off_loop(lambda: tap.configure(**settings))
        except OSError as exc:  # no netlink socket: RestrictAddressFamilies= of the unit
            raise RpcError(
                ErrorCode.DEVICE_ERROR,
                f"cannot create TAP interface {forward.ifname}: {exc.strerror or exc}; TAP "
                "needs netlink and CAP_NET_ADMIN (under systemd: `ixyd-host install --tap`)",
            ) from None
        if port.tap is not None:
            if port.tap[0] is tap:
                return port.tap
            self._close_tap(port)  # another interface: one bridge per exception channel
        while len(port.tap_counts) < len(port.workers):
            port.tap_counts.append(new_bridge_counts())
        bridges = []
        try:
            for (worker, rxq, _), counts in zip(port.workers, port.tap_counts, strict=False):
                name = f"ixyd-tap-{forward.ifname}.q{len(bridges)}"
                bridges.append(TapBridge(worker.exception(rxq), tap, name=name, counts=counts))
                bridges[-1].start()
        except BaseException:
            for bridge in bridges:
                _quietly(bridge.stop, f"stopping {bridge.name}")
            raise
        log.info("%s: TAP interface %s bridged (%d queues)", port.name, tap.name, len(bridges))
        return (tap, bridges)

    def _off_loop(self, action):
        """Run `action` on a helper thread and return its result: pyroute2 runs an asyncio
        loop of its own, which cannot start on the control thread (its loop is running)."""
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ixyd-netlink") as pool:
            return pool.submit(action).result(NETLINK_TIMEOUT)

    def _close_tap(self, port: ServicePort) -> None:
        """Stop bridging the port's TAP; the interface stays (port.taps) until stop(): what
        the kernel sends meanwhile waits in the TAP's queue, which counts its overflow."""
        _, bridges = port.tap
        port.tap = None
        for bridge in bridges:
            _quietly(bridge.stop, f"stopping the TAP bridge {bridge.name}")

    @staticmethod
    def _tap_counters(port: ServicePort) -> dict[str, int]:
        """For a port that has been in tap mode: its bridges' totals over every RX queue
        and bridge lifetime (ixyd/tap.py's BRIDGE_STATS_FIELDS, as `tap_<field>`), and
        `tap_drop_kernel_queue`, the frames the kernel dropped at its TAPs' full queues."""
        if not port.tap_counts:
            return {}
        fields = port.tap_counts[0]
        out = {f"tap_{name}": sum(c[name] for c in port.tap_counts) for name in fields}
        out["tap_drop_kernel_queue"] = sum(t.kernel_drops() for t in tuple(port.taps.values()))
        return out

    def _start_generator(self, port: ServicePort, forward: Forward) -> None:
        worker, _, k = port.workers[0]
        txq = port.driver.tx_queues[k]
        frame = (BROADCAST + port.driver.mac + GENERATOR_ETHERTYPE.to_bytes(2, "big")).ljust(
            forward.size, b"\0"
        )
        settings = dict(rate=forward.rate, count=forward.count, seq_offset=GENERATOR_SEQ_OFFSET)
        if port.generators:  # the pool of the last one: no new DMA memory per switch
            generator = worker.restart_generator(txq, frame, **settings)
        else:
            pool = Mempool(port.driver.dev.dma, max(1024, 2 * txq.size))
            generator = worker.generate(txq, frame, pool=pool, **settings)
        port.generators.append(generator)  # the worker keeps it (and its pool) until close
        port.generating = (worker, txq)

    # ------------------------------------------------------------------ counters
    def _gone(self, port: ServicePort, exc: DeviceRemovedError) -> None:
        """Note that port's NIC is gone; said once, in the log and to systemd's status."""
        if port.removed is None:
            port.removed = str(exc)
            log.error(
                "%s; port %s keeps its last counters and the other ports carry on; restart "
                "the instance once the device is back",
                exc,
                port.name,
            )

    def _link(self, port: ServicePort) -> tuple[bool, int]:
        """(up, speed in Mb/s) of a port; down for a port whose NIC is gone."""
        if port.removed is None:
            try:
                return port.driver.link()
            except DeviceRemovedError as exc:
                self._gone(port, exc)
        return False, 0

    def _counters(self, port: ServicePort) -> dict[str, int]:
        """Raw totals since start: the driver's stats plus the workers' per-queue counters.
        For a port whose NIC is gone, the NIC's part is what it last read."""
        if port.removed is None:
            try:
                port.last_driver_stats = dict(port.driver.stats())
            except DeviceRemovedError as exc:
                self._gone(port, exc)
        counters = dict(port.last_driver_stats)
        for name in WORKER_COUNTERS:
            counters[name] = 0
        counters["forwarded"] = 0
        counters["capture_copied"] = counters["capture_dropped"] = 0  # frames, not lost
        for worker, rxq, _ in port.workers:
            q = worker.queue_stats(rxq)
            for name in WORKER_COUNTERS:
                counters[name] += q[name]
            counters["forwarded"] += q["sent"]
            capture = worker.capture_stats(rxq)
            counters["capture_copied"] += capture["captured"]
            counters["capture_dropped"] += capture["dropped"]
        counters["generated"] = sum(g.stats["sent"] for g in port.generators)
        counters.update(self._tap_counters(port))
        return counters

    def sample_rates(self) -> None:
        """Per-second rates over the last RATE_INTERVAL (main thread)."""
        now = time.monotonic()
        current = {p.name: self._counters(p) for p in self.ports}
        if self._last_sample is not None:
            then, before = self._last_sample
            dt = now - then
            if dt > 0:
                for port in self.ports:
                    a, b = before[port.name], current[port.name]
                    port.rates = {
                        "rx_pps": (b["rx_packets"] - a["rx_packets"]) / dt,
                        "rx_bps": 8 * (b["rx_bytes"] - a["rx_bytes"]) / dt,
                        "tx_pps": (b["tx_packets"] - a["tx_packets"]) / dt,
                        "tx_bps": 8 * (b["tx_bytes"] - a["tx_bytes"]) / dt,
                    }
        self._last_sample = (now, current)

    # ------------------------------------------------------------------ control methods
    def _selected(self, port: str | None) -> list[ServicePort]:
        return self.ports if port is None else [self._find(port)]

    def rpc_status(self) -> dict:
        return {
            "instance": self.config.instance,
            "version": __version__,
            "pid": os.getpid(),
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "ports": [p.name for p in self.ports],
            "removed_ports": [p.name for p in self.ports if p.removed],
            "workers": sum(w.running for w in self.workers),
            "config": self.config.source or "(built in)",
            "state_file": self.store.path,
            "metrics": self.metrics.url if self.metrics is not None else None,
        }

    def rpc_ports(self) -> dict:
        out = []
        for p in self.ports:
            up, speed = self._link(p)
            out.append(
                {
                    "name": p.name,
                    "present": p.present,
                    "address": p.driver.dev.address,
                    "backend": p.spec.backend,
                    "driver": "ixgbe" if isinstance(p.driver, ixgbe.IxgbePort) else "igb",
                    "device": p.driver.info.name,
                    "mac": p.driver.mac_address,
                    "link": {"up": up, "speed_mbps": speed},
                    "promisc": p.driver.promisc,
                    "rx_queues": len(p.driver.rx_queues),
                    "tx_queues": len(p.driver.tx_queues),
                    "forward": p.forward.to_json(),
                    **({"removed": p.removed} if p.removed else {}),
                }
            )
        return {"ports": out}

    def rpc_stats(self, port: str | None = None) -> dict:
        result: dict[str, Any] = {"ports": []}
        for p in self._selected(port):
            raw = self._counters(p)
            entry: dict[str, Any] = {
                "name": p.name,
                "present": p.present,
                "counters": {k: v - p.baseline.get(k, 0) for k, v in raw.items()},
            }
            if p.rates is not None:
                entry["rates"] = p.rates
            result["ports"].append(entry)
        traffic = [
            {"port": p.name, **{k: int(v) for k, v in p.traffic.stats.items()}}
            for p in self.ports
            if p.traffic is not None
        ]
        if traffic:  # the model's generator/checker on each wire (demo): sent into the
            result["traffic"] = traffic  # port, and what the port transmitted, checked
        return result

    def rpc_link(self, port: str | None = None) -> dict:
        out = []
        for p in self._selected(port):
            up, speed = self._link(p)
            out.append({"name": p.name, "up": up, "speed_mbps": speed, "present": p.present})
        return {"ports": out}

    def rpc_get_forward(self, port: str | None = None) -> dict:
        return {
            "ports": [
                {"name": p.name, "forward": p.forward.to_json()} for p in self._selected(port)
            ]
        }

    def rpc_set_forward(self, port: str, mode: str, **args: Any) -> dict:
        p = self._find(port)
        forward = Forward.parse({"mode": mode, **args}, "set_forward")
        with self._change():
            unsaved = self._set_forward(p, forward)
        return _with_warning({"name": p.name, "forward": p.forward.to_json()}, unsaved)

    @contextlib.contextmanager
    def _change(self):
        """One runtime change at a time; a control request that would wait long for
        another one (a SIGHUP reload, a TAP being created) is answered BUSY instead of
        stalling the control socket."""
        if not self._changes.acquire(timeout=CHANGE_WAIT):
            raise RpcError(
                ErrorCode.BUSY, "another change to this instance is in progress; try again"
            )
        try:
            yield
        finally:
            self._changes.release()

    def _set_forward(self, p: ServicePort, forward: Forward) -> str | None:
        """Apply and persist; a warning if it could not be persisted (see _persist)."""
        self._check_target(p, forward)
        if forward.mode == "port":
            forward = dataclasses.replace(forward, to=self._find(forward.to).name)
        self._apply_forward(p, forward)
        log.info("%s: forwarding now %s", p.name, forward.to_json(), extra={"DEVICE": p.name})
        return self._persist(p.name, forward=forward.to_json())

    def rpc_reset_stats(self, port: str | None = None) -> dict:
        selected = self._selected(port)
        for p in selected:
            p.baseline = self._counters(p)
        return {"ports": [p.name for p in selected]}

    def rpc_set_promisc(self, port: str, on: bool) -> dict:
        p = self._find(port)
        with self._change():
            try:
                p.driver.set_promisc(on)
            except DeviceRemovedError as exc:
                self._gone(p, exc)
                raise
            unsaved = self._persist(p.name, promisc=on)
        return _with_warning({"name": p.name, "promisc": p.driver.promisc}, unsaved)

    def rpc_capture(
        self, port: str, count: int = 0, duration: float = 0.0, snaplen: int | None = None
    ) -> Stream:
        """Mirror what `port`'s RX queues receive to the caller as pcap (ixyd/capture.py);
        BUSY while another capture of the port runs. The stream ends after `count` frames,
        `duration` seconds (0: no limit), or when the client stops or leaves."""
        p = self._find(port)
        with self._captures_lock:
            if p.name in self._captures:
                raise RpcError(
                    ErrorCode.BUSY,
                    f"{p.name} is being captured already (one capture per port at a time)",
                )
            sources = [CaptureSource(worker, rxq) for worker, rxq, _ in p.workers]
            options = dict(count=count, duration=duration)
            if snaplen is not None:
                options["snaplen"] = snaplen

            def sink(event: str, params: dict) -> bool:  # on the session's thread
                if event == "end":
                    stream.end("capture.end", params)
                    return True
                return stream.send(f"capture.{event}", params)

            session = CaptureSession(
                sources,
                sink,
                name=f"ixyd-capture-{p.name}",
                on_done=lambda: self._capture_done(p.name),
                **options,
            )
            result = {
                "port": p.name,
                "queues": len(sources),
                "snaplen": session.snaplen,
                "count": count,
                "duration": duration,
                "format": "pcap, nanosecond timestamps, LINKTYPE_ETHERNET",
            }
            stream = Stream(result, on_close=session.stop)  # before the session starts
            self._captures[p.name] = session
        session.start()
        log.info("%s: capture started (%s)", p.name, stream.result, extra={"DEVICE": p.name})
        return stream

    def _capture_done(self, name: str) -> None:
        with self._captures_lock:
            session = self._captures.pop(name, None)
        if session is not None:
            log.info(
                "%s: capture ended (%s): %d frames, %d copies dropped",
                name,
                session.reason,
                session.frames,
                session.dropped,
                extra={"DEVICE": name},
            )

    def rpc_reload(self) -> dict:
        """`reload`: what SIGHUP does, answered when done (ExecReload= of ixyd@.service)."""
        return self.reload()

    def rpc_shutdown(self) -> dict:
        log.info("shutdown requested over the control socket")
        self.stop_requested.set()
        return {"stopping": True}

    def rpc_inject_fault(self, fault: str, worker: int | None = None, port: str | None = None):
        """Test aids (docs/control.md): `stall` makes worker number `worker` hang; `remove`
        unplugs model port `port` (its NIC reads all-ones from then on)."""
        if fault == "remove":
            if port is None:
                raise RpcError(ErrorCode.INVALID_PARAMS, "fault 'remove' needs 'port'")
            target_port = self._find(port)
            if target_port.spec.backend != "model":
                raise RpcError(
                    ErrorCode.INVALID_PARAMS,
                    f"{port} is a {target_port.spec.backend} port: only a model port can be "
                    "unplugged by a command",
                )
            log.warning("inject_fault: unplugging model port %s (test aid)", port)
            target_port.driver.dev.surprise_remove()
            return {"fault": fault, "port": port}
        if worker is None:
            raise RpcError(ErrorCode.INVALID_PARAMS, "fault 'stall' needs 'worker'")
        running = [w for w in self.workers if w.running]
        if worker >= len(self.workers) or not self.workers[worker].running:
            raise RpcError(
                ErrorCode.NOT_FOUND, f"no running worker {worker} ({len(running)} running)"
            )
        target = self.workers[worker]
        log.warning("inject_fault: stalling worker %s (test aid)", target.name)
        target.stall()
        return {"fault": fault, "worker": target.name}

    def _persist(self, port: str, **settings: Any) -> str | None:
        """Record a change in the state file; if that fails (the state directory full or
        read-only), log it and return a warning for the caller: the change is in effect,
        only its survival of a restart is at stake."""
        try:
            self.store.update(port, **settings)
        except OSError as exc:
            log.error("cannot write the state file %s: %s", self.store.path, exc)
            return (
                f"{port}: the change is in effect but not saved: cannot write "
                f"{self.store.path} ({exc.strerror or exc}); a restart will undo it"
            )
        return None

    # ------------------------------------------------------------------ running
    def run(self) -> None:
        """Wait for a stop request, sampling rates, serving SIGHUP reloads and telling
        systemd the status; the watchdog is fed only while every worker makes progress.
        Returns early, with `failure` set, if a worker's loop ends on its own."""
        watchdog = ProgressWatchdog(self.notifier, lambda: self.workers)
        period = min(RATE_INTERVAL, (self.notifier.watchdog_period or 3 * RATE_INTERVAL) / 3)
        while not self.stop_requested.wait(period):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                with contextlib.suppress(IxydError, RpcError):  # reload() logged why
                    self.reload()
            try:
                self.sample_rates()
                self.notifier.status(self.status_text())
            except IxydError as exc:
                log.error("sampling counters: %s", exc)
            watchdog.check()
            ended = [w for w in self.workers if not w.running]
            if ended:  # only stop() stops workers: a port has lost its poll loop
                self.failure = "; ".join(
                    f"worker {w.name} ended" + (f": {w.error!r}" if w.error else "") for w in ended
                )
                log.error("%s: stopping the instance, to be restarted", self.failure)
                return

    def status_text(self) -> str:
        """systemd's STATUS= line: link and rates of every port."""
        return status_text(
            (p.name, *self._link(p), p.rates, p.removed is not None) for p in self.ports
        )

    def reload(self) -> dict:
        """Re-read the configuration and apply the forwarding and promisc settings the file
        changed since it was loaded; what ixyd-ctl set for keys the file did not change
        stays. For SIGHUP (main thread) and the `reload` method (control thread: systemd's
        ExecReload=, which fails when this raises). Returns {"config": path, "applied":
        [what changed]}. Raises ConfigError, with the running configuration untouched, when
        the file is refused (syntax, a key, a value) or its ports changed (that needs a
        restart); IxydError naming the settings that were refused, after the others were
        applied; RpcError BUSY while another reload is in progress."""
        source = self.config_path or self.config.source
        if source is None:
            log.info("reload: built-in configuration, nothing to reload")
            return {"config": None, "applied": []}
        if not self._reloading.acquire(timeout=CHANGE_WAIT):
            raise RpcError(ErrorCode.BUSY, "a reload is in progress already; try again")
        self.state = "reloading"
        self.notifier.reloading()
        try:
            return self._reload(source)
        except (IxydError, RpcError) as exc:
            log.error("reload of %s refused: %s", source, exc)
            raise
        finally:
            self.state = "running"
            self.notifier.ready(self.status_text())
            self._reloading.release()

    def _reload(self, source) -> dict:
        new = load(self.config.instance, source)  # ConfigError: nothing changed

        def layout(spec: PortSpec) -> PortSpec:
            live = dataclasses.replace(spec.port, promisc=False)
            return dataclasses.replace(spec, forward=Forward(), port=live)

        if [layout(p) for p in new.ports] != [layout(p) for p in self.config.ports]:
            raise ConfigError(
                f"the ports changed in {new.source}; restart the instance to apply that "
                "(the running configuration stays)"
            )
        applied, refused = self._apply_config_changes(self.config, new)
        self.config = new
        log.info(
            "reload: configuration %s re-read; applied: %s",
            new.source,
            ", ".join(applied) or "nothing changed",
        )
        if refused:
            raise IxydError(
                f"configuration {new.source} re-read, but not applied: {'; '.join(refused)}"
                + (f" (applied: {', '.join(applied)})" if applied else "")
            )
        return {"config": new.source, "applied": applied}

    def _apply_config_changes(
        self, old: InstanceConfig, new: InstanceConfig
    ) -> tuple[list[str], list[str]]:
        """Apply the per-port settings that differ between two configurations of the same
        port layout; a refused one is logged and skipped. Returns (what was applied, what
        was refused and why)."""
        applied, refused = [], []
        with self._changes:
            for before, after, port in zip(old.ports, new.ports, self.ports, strict=True):
                try:
                    if after.forward != before.forward:
                        self._set_forward(port, after.forward)
                        applied.append(f"{port.name} forward {after.forward.to_json()}")
                    if after.port.promisc != before.port.promisc:
                        port.driver.set_promisc(after.port.promisc)
                        self._persist(port.name, promisc=after.port.promisc)
                        applied.append(f"{port.name} promisc {after.port.promisc}")
                except (IxydError, RpcError) as exc:
                    log.error("reload: %s: not applied: %s", port.name, exc)
                    refused.append(f"{port.name}: {exc}")
        return applied, refused

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Socket, workers, ports, devices, bindings; never raises, logs what failed."""
        self.state = "stopping"
        self.notifier.stopping()
        if self.metrics is not None:  # first: no scrape may see the ports go away
            self.metrics.close()
            self.metrics = None
        if self.server is not None:
            self.server.close()
            self.server = None
        with self._captures_lock:
            captures = list(self._captures.values())
        for session in captures:  # before the workers: they copy into the sessions' rings
            session.stop()
            if not session.join(CAPTURE_STOP_TIMEOUT):
                log.error("capture thread %s did not stop", session.name)
        for port in self.ports:
            if port.traffic is not None:
                _quietly(port.traffic.stop, "stopping the model traffic")
        taps = [p.tap for p in self.ports if p.tap is not None]
        for _, bridges in taps:  # while the workers run: they take the bridges' buffers back
            for bridge in bridges:
                _quietly(bridge.stop, f"stopping {bridge.name}")
        for worker in self.workers:
            try:
                worker.stop(WORKER_STOP_TIMEOUT)
            except TimeoutError as exc:
                log.error("%s; leaving it (the process is exiting)", exc)
        for worker in self.workers:
            if not worker.running:
                _quietly(worker.close, f"closing worker {worker.name}")
        for tap in (t for p in self.ports for t in p.taps.values()):  # the main thread:
            _quietly(tap.close, f"removing TAP interface {tap.name}")  # no pyroute2 loop
        for port in self.ports:
            _quietly(port.driver.shutdown, f"shutting {port.name} down")
            if port.backend_handle is not None:
                _quietly(port.backend_handle.close, f"closing {port.name}")
        for nic in self._model_nics.values():
            held = nic.mapping_count  # what the ports and workers did not unmap
            _quietly(nic.stop, f"stopping model card {nic.name}")
            _quietly(nic.dma.close, f"releasing the DMA memory of model card {nic.name}")
            left = nic.mapping_count  # the model's IOMMU, before the card is freed
            log.info("model card %s: %d DMA mappings at exit, %d remain", nic.name, held, left)
            _quietly(nic.close, f"closing model card {nic.name}")
        for tap in self._wire_taps:  # the engine no longer reads or writes their fds
            _quietly(tap.close, f"removing TAP interface {tap.name}")
        self._wire_taps = []
        if self._vfio_container is not None:
            _quietly(self._vfio_container.close, "closing the VFIO container")
        if self.config.give_back:
            from .pci import release

            for binding in self._bindings:
                if binding.original_driver:
                    _quietly(
                        lambda b=binding: release(b.address),
                        f"giving {binding.address} back to {binding.original_driver}",
                    )
        self.ports, self.workers, self._model_nics, self._bindings = [], [], {}, []
        self._vfio_container = None


def _quietly(action, what: str) -> None:
    try:
        action()
    except Exception:
        log.exception("%s failed", what)


def freeze_startup_objects() -> None:
    """Collect garbage, then leave every object alive now out of Python's cyclic garbage
    collection (gc.freeze, Python docs "gc"): what start() made lives as long as the
    process, and full collections scanning it again and again each held the control
    thread for 16 ms and more (docs/control.md "Fairness"). Later objects are collected as
    usual."""
    gc.collect()
    gc.freeze()


def _with_warning(result: dict, warning: str | None) -> dict:
    """A method's result with `warning` in its "warnings" list (docs/control.md: a change
    that took effect with a caveat; ixyd-ctl prints each on stderr)."""
    return {**result, "warnings": [warning]} if warning else result


def _driver_class(dev) -> type[IntelPort]:
    """The driver for a function, by its device ID (drivers.selection.driver_for)."""
    return driver_for(dev.address, dev.ids)


# ---------------------------------------------------------------------------- entry point


def setup_logging(instance: str, verbose: bool = False) -> None:
    """To the journal with INSTANCE (and per record DEVICE) fields under systemd, else stderr."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="ixyd", INSTANCE=instance)
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"ixyd[{instance}] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ixyd", description=__doc__.splitlines()[0])
    parser.add_argument("instance", nargs="?", help="a PCI address or a config name in /etc/ixyd")
    parser.add_argument("--config", help="the config file (default /etc/ixyd/<instance>.toml)")
    parser.add_argument("--demo", action="store_true", help="two model ports with traffic")
    parser.add_argument("--run-dir", help="control socket directory ($IXYD_RUN_DIR, /run/ixyd)")
    parser.add_argument("--state-dir", help=f"runtime state (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--demo-rate", type=int, help="demo traffic, frames/s per direction")
    parser.add_argument(
        "--demo-frames", type=int, help="demo traffic, frames per direction, 0 = no end"
    )
    parser.add_argument(
        "--metrics",
        metavar="ADDR",
        help=f"Prometheus endpoint host:port, or off (default {DEFAULT_METRICS_ADDRESS})",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = DEMO_INSTANCE if args.demo else (args.instance or "ixyd")
    setup_logging(name, args.verbose)
    try:
        if args.demo:
            traffic = {
                k: v
                for k, v in (("rate", args.demo_rate), ("frames", args.demo_frames))
                if v is not None
            }
            config = demo_config(**traffic)
        else:
            config = load(args.instance, args.config)
        if args.state_dir:
            config = dataclasses.replace(config, state_dir=args.state_dir)
        if args.metrics is not None:
            parse_listen_address(args.metrics, "--metrics")
            config = dataclasses.replace(config, metrics=args.metrics)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        print(f"ixyd: {exc}", file=sys.stderr)
        Notifier.from_environment().status(f"configuration refused: {exc}")  # for systemctl
        return EXIT_CONFIG
    notifier = Notifier.from_environment()
    instance = Instance(config, run_dir=args.run_dir, config_path=args.config, notifier=notifier)
    stopping = instance.stop_requested

    def on_stop(signum, _frame) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda *_: instance.reload_requested.set())
    try:
        instance.start()
        freeze_startup_objects()
    except (ConfigError, UnsupportedDeviceError) as exc:  # the same device fails the same way
        log.error("configuration: %s", exc)
        notifier.status(f"configuration refused: {exc}")
        return EXIT_CONFIG
    except IxydError as exc:
        log.error("cannot start instance %s: %s", config.instance, exc)
        notifier.status(f"cannot start: {exc}")
        return EXIT_DEVICE
    notifier.ready(instance.status_text())
    try:
        instance.run()
    finally:
        instance.stop()
        log.info("instance %s stopped", config.instance)
    return EXIT_FAILED if instance.failure else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
