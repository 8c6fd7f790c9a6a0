"""The metrics face: a Prometheus endpoint that reads the counters of a running instance.

Nothing is counted for metrics' sake: the workers already publish their counters in
shared memory and the drivers keep 64-bit totals of the NIC's clear-on-read registers.
`IxydCollector` reads both when Prometheus scrapes, and only then. Names follow
node_exporter's `node_network_*` and the Prometheus naming guide (units in the name,
`_total` on counters, no `_created` series); docs/metrics.md lists every series.

Where each figure comes from, and who may wait for whom:
- worker counters (`Worker.stats`, `Worker.queue_stats`, `RxQueue.stats`, the mempool's
  free count): plain 64-bit loads of what the worker stores; no lock, the worker never
  notices a scrape;
- driver counters (`IntelPort.stats`, `queue_stats`, `link`): register reads under the
  port's own lock, which the control thread and the rate sampler take too, so no
  clear-on-read delta is lost between them; workers never take it;
- the model (demo): its IOMMU fault count and the traffic generator/checker on each wire.

A port whose registers cannot be read (shut down, or reading all-ones) loses only its
driver series for that scrape (`ixyd_scrape_device_success` says so); the rest is served.

The endpoint listens on `metrics` of the instance configuration (default
127.0.0.1:19911), or on the TCP socket systemd hands over as `metrics` (under
ixyd@.service always: ixyd-metrics@.socket binds the port, generator.py sets its
address). Whatever its clients do, it costs one thread and at most MAX_CONNECTIONS
descriptors (bounded_http.py).
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import platform
import pwd
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric

from . import __version__, activation
from .bounded_http import Answer, BoundedHttpServer, Request
from .errors import IxydError

log = logging.getLogger(__name__)

ACTIVATION_FD_NAME = "metrics"  # FileDescriptorName= in the socket unit
# Set by ixyd@.service to the socket unit that binds the metrics port (ixyd-metrics@.socket)
SOCKET_UNIT_ENV = "IXYD_METRICS_SOCKET"
BYTES_PER_MBIT = 125_000  # link speed: node_network_speed_bytes is bytes per second
CLOSE_TIMEOUT = 2.0  # seconds close() waits for the server thread
# What a client of the endpoint may cost (bounded_http.py). Prometheus opens one connection
# per scrape and sends its request at once; 8 slots leave room for a few scrapers and a
# curl, and cap the endpoint at 8 descriptors however many clients connect.
MAX_CONNECTIONS = 8
REQUEST_DEADLINE = 5.0  # seconds from accept to the end of the request header
RESPONSE_DEADLINE = 15.0  # seconds from accept to the last byte of the answer
LISTEN_BACKLOG = 128  # connections the kernel queues for accept (no descriptor of ours)
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket

# Per-queue traffic, as the NIC counts it (the driver's queue_stats): the frames it put in
# the RX rings and took from the TX rings. What the workers took out of the RX rings is
# ixyd_poll_packets_total; the difference is what waits in the rings.
_RING_COUNTERS = {
    "receive": ("rx", "Frames the NIC delivered to the RX ring"),
    "transmit": ("tx", "Frames the NIC sent from the TX ring"),
}
# Drop reasons of ixyd_receive_drop_total. Per RX queue, from the worker's queue counters:
_WORKER_DROPS = {
    "dropped_by_mode": "forward_drop",  # the port's forwarding mode is drop (or generate)
    "drop_tx_full": "tx_full",  # the TX ring it was to leave by was full
    "drop_exception_full": "host_busy",  # tap mode: the ring towards the host was full
}
# ... from the RX queue's own counters (the data path's receive side):
_RXQ_DROPS = {
    "drop_no_buffer": "no_buffer",  # the mempool was empty
    "drop_multi_descriptor": "multi_descriptor",  # frames spanning descriptors (no jumbo)
    "drop_errors": "error",  # the MAC flagged the frame (RXE)
}
# ... per RX queue from its TAP bridge (tap mode, ixyd/tap.py): frames from the wire it
# could not write to the TAP
_TAP_RECEIVE_DROPS = {"drop_write_full": "tap_full", "drop_write_error": "tap_error"}
# Drop reasons of ixyd_transmit_drop_total for frames from the kernel, per RX queue from its
# TAP bridge; and per port the TAP's queue in the kernel (tap_kernel_queue: it overflowed)
_TAP_TRANSMIT_DROPS = {"drop_oversize": "tap_oversize", "drop_stopped": "tap_bridge_stopped"}
# ... per RX queue from the NIC, and per port from the NIC:
_QUEUE_HW_DROPS = {"rx_no_descriptor": "no_descriptor"}  # the ring had no free descriptor
_PORT_HW_DROPS = {"rx_missed": "missed"}  # the packet buffer was full
# ixyd_receive_errors_total{type}: MAC error counters, where the family has them
_ERRORS = {
    "crc_errors": "crc",
    "illegal_byte_errors": "illegal_byte",
    "length_errors": "length",
    "rx_undersize": "undersize",
    "rx_fragments": "fragment",
    "rx_oversize": "oversize",
    "rx_jabber": "jabber",
    "rx_short_discards": "short",
    "alignment_errors": "alignment",
    "symbol_errors": "symbol",
    "rx_errors": "rx",
}
# ixyd_model_checker_problems_total{type}: what the checker at the far end of a wire saw
_CHECKER_PROBLEMS = {
    "corrupt": "corrupt",
    "reordered": "reordered",
    "duplicates": "duplicate",
    "foreign": "foreign",
}


class MetricsError(IxydError):
    """The metrics endpoint could not be set up (address in use, bad handed-over socket)."""


# ---------------------------------------------------------------------------- collector
class _Families:
    """The metric families of one scrape, built as the ports are walked."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._add(name, doc, "counter", name + "_total", labels, value)

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._add(name, doc, "gauge", name, labels, value)

    def _add(self, name, doc, kind, sample, labels, value) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Metric(name, doc, kind)
        family.add_sample(sample, labels, value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class IxydCollector:
    """A prometheus_client collector over the ports of a running instance.

    `ports()` returns the instance's ports at scrape time; each has `name`, `driver` (an
    IntelPort), `workers` ([(Worker, RxQueue, index)]), `forward.mode`, `spec.backend`
    and `traffic` (the model's TrafficEndpoint on its wire, or None). After `close()` a
    scrape returns only the build and instance info: the ports may be torn down from then
    on.
    """

    def __init__(self, ports: Callable[[], Sequence[Any]], instance: str):
        self._ports = ports
        self.instance = instance
        # held for a whole scrape; close() takes it, so teardown never overlaps a scrape
        self._lock = threading.Lock()
        self._closed = False
        self._unreadable: dict[str, str] = {}  # port -> why its registers could not be read
        self.scrapes = 0
        self.scrape_seconds = 0.0  # wall-clock time spent collecting, all scrapes
        self.scrape_cpu_seconds = 0.0  # CPU time of the threads that collected

    def close(self) -> None:
        """Stop reading the instance (waits for a scrape in progress)."""
        with self._lock:
            self._closed = True

    def describe(self) -> list:
        return []  # nothing to check at registration: families depend on the ports

    def collect(self) -> Iterator[Metric]:
        started, started_cpu = time.perf_counter(), time.thread_time()
        out = _Families()
        out.gauge(
            "ixyd_build_info",
            "ixyd's version and the Python running it",
            {"version": __version__, "python": platform.python_version()},
            1,
        )
        out.gauge("ixyd_instance_info", "The ixyd instance", {"ixyd_instance": self.instance}, 1)
        with self._lock:
            if not self._closed:
                dma_spaces: dict[int, Any] = {}
                cards: dict[int, Any] = {}
                for port in list(self._ports()):
                    try:
                        self._collect_port(port, out)
                    except Exception as exc:  # a bug, not a device state: serve the rest
                        self._report(port.name, exc, traceback=True)
                    dev = port.driver.dev
                    dma_spaces.setdefault(id(dev.dma), dev.dma)
                    if port.spec.backend == "model":
                        cards.setdefault(id(dev.nic), dev.nic)
                mapped = sum(m.size for dma in dma_spaces.values() for m in dma.mappings)
                out.gauge(
                    "ixyd_dma_mapped_bytes",
                    "Host memory mapped for device DMA through the IOMMU",
                    {},
                    mapped,
                )
                for card in cards.values():
                    if not card.closed:
                        out.counter(
                            "ixyd_iommu_faults",
                            "DMA the model's IOMMU refused (unmapped IOVA)",
                            {"card": card.name},
                            card.fault_count,
                        )
            self.scrapes += 1
            self.scrape_seconds += time.perf_counter() - started
            self.scrape_cpu_seconds += time.thread_time() - started_cpu
        yield from out

    # ------------------------------------------------------------------ one port
    def _collect_port(self, port: Any, out: _Families) -> None:
        device = port.name
        dev = {"device": device}
        out.gauge(
            "ixyd_port_info",
            "A port of the instance: driver, backend, MAC address, forwarding mode",
            {
                **dev,
                "driver": type(port.driver).__name__.removesuffix("Port").lower(),
                "backend": port.spec.backend,
                "address": port.driver.mac_address,
                "forward": port.forward.mode,
            },
            1,
        )
        for worker, rxq, _ in port.workers:
            self._collect_queue(dev, worker, rxq, out)
        if getattr(port, "tap_counts", None):
            self._collect_tap(dev, port, out)
        self._collect_driver(port, out)
        if port.traffic is not None:
            self._collect_wire(port, out)

    def _collect_queue(self, dev: dict, worker: Any, rxq: Any, out: _Families) -> None:
        """One RX queue and the worker that polls it (ixyd gives every RX queue its own
        worker, so the worker's loop counters are the queue's)."""
        labels = {**dev, "queue": str(rxq.index)}
        q = worker.queue_stats(rxq)
        loop = worker.stats
        rx = rxq.stats
        out.counter(
            "ixyd_poll_packets", "Frames the worker took from the RX ring", labels, q["packets"]
        )
        out.counter(
            "ixyd_forwarded_packets",
            "Received frames queued for sending (modes port and reflect)",
            labels,
            q["sent"],
        )
        for direction, key in (("to_host", "to_host"), ("from_host", "from_host")):
            out.counter(
                "ixyd_host_packets",
                "Frames exchanged with the host in tap mode",
                {**labels, "direction": direction},
                q[key],
            )
        drops = {reason: q[key] for key, reason in _WORKER_DROPS.items()}
        drops.update({reason: rx[key] for key, reason in _RXQ_DROPS.items()})
        for reason, value in drops.items():
            out.counter(
                "ixyd_receive_drop",
                "Frames dropped on receive, by reason",
                {**labels, "reason": reason},
                value,
            )
        out.counter(
            "ixyd_transmit_drop",
            "Frames from the host (tap mode) dropped, by reason",
            {**labels, "reason": "not_tap_mode"},
            q["drop_from_host"],
        )
        out.counter(
            "ixyd_poll_iterations", "Rounds of the worker's poll loop", labels, loop["iterations"]
        )
        out.counter("ixyd_poll_empty", "RX polls that found no frame", labels, loop["empty_polls"])
        out.gauge(
            "ixyd_mempool_free_buffers",
            "Packet buffers free in the RX queue's pool",
            labels,
            rxq.pool.free_count,
        )
        out.gauge(
            "ixyd_mempool_size_buffers",
            "Packet buffers in the RX queue's pool",
            labels,
            rxq.pool.count,
        )
        out.gauge(
            "ixyd_worker_running", "1 while the queue's worker thread runs", labels, worker.running
        )

    def _collect_tap(self, dev: dict, port: Any, out: _Families) -> None:
        """A port that has been in tap mode: its TAP bridges' drops per RX queue (their
        totals over every mode switch) and the kernel's at its TAPs' queues."""
        for (_, rxq, _), counts in zip(port.workers, port.tap_counts, strict=False):
            labels = {**dev, "queue": str(rxq.index)}
            for key, reason in _TAP_RECEIVE_DROPS.items():
                out.counter(
                    "ixyd_receive_drop",
                    "Frames dropped on receive, by reason",
                    {**labels, "reason": reason},
                    counts[key],
                )
            for key, reason in _TAP_TRANSMIT_DROPS.items():
                out.counter(
                    "ixyd_transmit_drop",
                    "Frames from the host (tap mode) dropped, by reason",
                    {**labels, "reason": reason},
                    counts[key],
                )
        out.counter(
            "ixyd_transmit_drop",
            "Frames from the host (tap mode) dropped, by reason",
            {**dev, "reason": "tap_kernel_queue"},
            sum(tap.kernel_drops() for tap in tuple(port.taps.values())),
        )

    def _collect_driver(self, port: Any, out: _Families) -> None:
        device = port.name
        dev = {"device": device}
        try:
            totals = port.driver.stats()
            queues = port.driver.queue_stats()
            up, speed_mbps = port.driver.link()
        except IxydError as exc:  # shut down, or reading all-ones: skip, serve the rest
            self._report(device, exc)
            out.gauge(
                "ixyd_scrape_device_success",
                "1 if the port's NIC registers could be read in this scrape",
                dev,
                0,
            )
            return
        if self._unreadable.pop(device, None) is not None:
            log.info("metrics: %s: all series back", device)
        out.gauge(
            "ixyd_scrape_device_success",
            "1 if the port's NIC registers could be read in this scrape",
            dev,
            1,
        )
        out.gauge("ixyd_link_up", "1 if the link is up", dev, up)
        out.gauge(
            "ixyd_link_speed_bytes",
            "Link speed in bytes per second",
            dev,
            speed_mbps * BYTES_PER_MBIT,
        )
        for direction, (key, doc) in _RING_COUNTERS.items():
            rings = zip(queues[f"{key}_packets"], queues[f"{key}_bytes"], strict=True)
            for i, (packets, octets) in enumerate(rings):
                labels = {**dev, "queue": str(i)}
                out.counter(f"ixyd_{direction}_packets", doc, labels, packets)
                out.counter(
                    f"ixyd_{direction}_bytes", "Bytes of those frames, no FCS", labels, octets
                )
        for key, reason in _QUEUE_HW_DROPS.items():
            for i, value in enumerate(queues[key]):
                out.counter(
                    "ixyd_receive_drop",
                    "Frames dropped on receive, by reason",
                    {**dev, "queue": str(i), "reason": reason},
                    value,
                )
        for key, reason in _PORT_HW_DROPS.items():
            out.counter(
                "ixyd_receive_drop",
                "Frames dropped on receive, by reason",
                {**dev, "reason": reason},
                totals[key],
            )
        for key, kind in _ERRORS.items():
            if key in totals:
                out.counter(
                    "ixyd_receive_errors",
                    "Frames the MAC received with an error, by type",
                    {**dev, "type": kind},
                    totals[key],
                )

    def _report(self, device: str, exc: Exception, traceback: bool = False) -> None:
        """Log why a port's series are (partly) missing: once, not on every scrape."""
        if self._unreadable.get(device) != str(exc):
            log.warning(
                "metrics: %s: series left out of the scrape: %s", device, exc, exc_info=traceback
            )
        self._unreadable[device] = str(exc)

    def _collect_wire(self, port: Any, out: _Families) -> None:
        """The model's generator and checker at the far end of the port's wire (demo)."""
        try:
            wire = port.traffic.stats
        except RuntimeError:  # unplugged, or the card is closed
            return
        dev = {"device": port.name}
        for direction, key in (("to_port", "sent"), ("from_port", "received")):
            out.counter(
                "ixyd_model_wire_packets",
                "Frames the model's traffic endpoint sent into the port / received from it",
                {**dev, "direction": direction},
                wire[key],
            )
        for key, kind in _CHECKER_PROBLEMS.items():
            out.counter(
                "ixyd_model_checker_problems",
                "Frames the model's checker found wrong, by type",
                {**dev, "type": kind},
                wire[key],
            )


# ---------------------------------------------------------------------------- server
class MetricsServer:
    """The HTTP endpoint: `GET /metrics` (any path) answers with the collector's series
    and the process's own (CPU, memory, file descriptors).

    Give `address` ((host, port), port 0: any free port) or `listen_socket` (a listening
    TCP socket, from socket activation). `serve()` starts the server thread, `close()`
    stops it and closes the collector. Whatever clients do, the endpoint holds at most
    MAX_CONNECTIONS connections and one thread (bounded_http.py).
    """

    def __init__(
        self,
        collector: IxydCollector,
        *,
        address: tuple[str, int] | None = None,
        listen_socket: socket.socket | None = None,
    ):
        if (address is None) == (listen_socket is None):
            raise ValueError("give exactly one of address and listen_socket")
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.registry.register(self)  # collect(): the endpoint's own connections
        ProcessCollector(registry=self.registry)
        self.activated = listen_socket is not None
        self._requested = address
        self._socket = listen_socket
        self._server: BoundedHttpServer | None = None
        self.address = "" if address is None else _format(*address)

    @classmethod
    def for_instance(
        cls,
        collector: IxydCollector,
        address: tuple[str, int] | None,
        environ: Mapping[str, str] = os.environ,
    ):
        """The socket systemd handed over as `metrics` if there is one, else a server on
        `address`; None if there is neither (metrics off).

        Under ixyd@.service ($IXYD_METRICS_SOCKET names the socket unit that binds the
        port) a fixed port must come from systemd: if that socket unit handed over nothing
        (it could not bind: someone else holds the port), raises MetricsError rather than
        binding the port itself or running without metrics. A handed-over socket on
        another address than `address` is served, with a warning (stale generated units).
        """
        sock = activation.activated_socket(
            ACTIVATION_FD_NAME,
            (socket.AF_INET, socket.AF_INET6),
            "a TCP socket",
            "use ListenStream=127.0.0.1:<port> in the socket unit (one port per instance)",
        )
        if sock is not None:
            bound = _format(*sock.getsockname()[:2])
            if address is not None and bound != _format(*address):
                log.warning(
                    "metrics: serving on %s, the socket systemd handed over, not on %s from "
                    "the configuration; `systemctl daemon-reload` and a restart of the "
                    "socket unit bring them together",
                    bound,
                    _format(*address),
                )
            return cls(collector, listen_socket=sock)
        if address is None:
            return None
        socket_unit = environ.get(SOCKET_UNIT_ENV)
        if socket_unit and address[1] != 0:
            raise MetricsError(
                f"{socket_unit} handed over no socket for {_format(*address)}: it could not "
                "bind the port (`systemctl status " + socket_unit + "` says why; if another "
                "process holds the port, stop it or give this instance another `metrics` "
                "port); not binding the port here, so nobody else's answers pass for ours"
            )
        return cls(collector, address=address)

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def serve(self) -> None:
        """Listen (unless handed a socket) and serve on the `ixyd-metrics` thread. Raises
        MetricsError if the address cannot be bound (naming who holds the port, if known)."""
        sock = self._socket if self._socket is not None else self._listen(*self._requested)
        self._socket = None  # the server owns it now
        self.address = _format(*sock.getsockname()[:2])  # port 0: the one it got
        self._server = BoundedHttpServer(
            sock,
            self._answer,
            max_connections=MAX_CONNECTIONS,
            request_deadline=REQUEST_DEADLINE,
            response_deadline=RESPONSE_DEADLINE,
            thread_name="ixyd-metrics",
        )
        self._server.start()
        log.info("metrics: serving on %s%s", self.url, " (socket-activated)" * self.activated)

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            # a restarted instance rebinds at once although the old answers are in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            holder = listening_uid(port) if exc.errno == errno.EADDRINUSE else None
            held = f" (a socket of {_user(holder)} listens on port {port})" * (holder is not None)
            raise MetricsError(
                f"cannot serve metrics on {_format(host, port)}: {exc.strerror or exc}{held}; "
                "stop that process, or give this instance another port with `metrics`"
            ) from exc
        return sock

    def _answer(self, request: Request) -> Answer:
        """Any path: the series, in the format the scraper asks for (text or OpenMetrics),
        gzipped if it accepts that (as prometheus_client's own handler does)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encode(self.registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return Answer(HTTPStatus.OK, headers, body)

    def collect(self) -> Iterator[Metric]:
        """The endpoint's own series: its open connections and those it refused."""
        server = self._server
        if server is None:
            return
        out = _Families()
        out.gauge(
            "ixyd_metrics_connections",
            f"Connections open to this metrics endpoint (at most {MAX_CONNECTIONS})",
            {},
            server.open_connections,
        )
        for reason, count in server.refused.items():
            out.counter(
                "ixyd_metrics_refused_connections",
                "Connections to this endpoint closed unanswered or answered with an error",
                {"reason": reason},
                count,
            )
        yield from out

    def close(self) -> None:
        """Stop serving and reading the instance; waits for a scrape in progress. Idempotent."""
        if self._server is not None:
            self._server.close(CLOSE_TIMEOUT)
            self._server = None
        elif self._socket is not None:
            self._socket.close()
        self._socket = None
        self.collector.close()


def listening_uid(port: int) -> int | None:
    """The uid owning a TCP socket that listens on `port` (any address), from
    /proc/net/tcp and tcp6 (proc(5): local address, state 0A = LISTEN, uid); None if
    none is found or /proc cannot be read."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 7 and fields[3] == TCP_LISTEN:
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return int(fields[7])
    return None


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _format(host: str, port: int) -> str:
    """host:port, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
