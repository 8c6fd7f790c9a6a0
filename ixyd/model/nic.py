"""The 82599 model's control side: register semantics, reset and link timing, wires, faults.

A `ModelNic` is a card with N ports behind one IOMMU. Each port is a `PciFunction`, the
same seam the VFIO backend implements, so a driver cannot tell it from silicon. The packet
engine (engine.c) runs either in a background thread that reacts to tail writes like
hardware, or one `step()` at a time for deterministic tests and instruction counts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..device import ALL_ONES, PciFunction, PciIds
from ..dma import DmaMapper, DmaMemory
from ..errors import DmaError
from . import registers as r
from ._engine import ffi, lib

INTEL = 0x8086
DEVICE_82599_SFP = 0x10FB
# Like an x86 IOMMU: the MSI window 0xFEE00000-0xFEEFFFFF is reserved and the address
# width is 39 bits. IOVAs are allocated from the bottom, far away from any host VA, so a
# driver that writes a virtual address into a descriptor faults instead of working.
DEFAULT_IOVA_RANGES = [(0x0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]


def _mac(index: int, card: int = 0) -> bytes:
    # locally administered, unicast
    return bytes([0x02, 0x1B, 0x21, 0x99, card & 0xFF, index & 0xFF])


class ModelIommu(DmaMapper):
    """The model's IOMMU: the translation table every device DMA goes through."""

    def __init__(self, nic: ModelNic, ranges: list[tuple[int, int]]):
        self._nic = nic
        self._ranges = list(ranges)
        self.map_calls = 0
        self.unmap_calls = 0

    def valid_iova_ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        if not any(lo <= iova and iova + size - 1 <= hi for lo, hi in self._ranges):
            raise DmaError(f"IOVA {iova:#x}+{size:#x} is outside the valid IOVA ranges")
        rc = lib.model_iommu_map(self._nic._m, iova, size, vaddr)
        if rc:
            raise DmaError(f"model IOMMU refused to map IOVA {iova:#x}+{size:#x}: error {-rc}")
        self.map_calls += 1

    def unmap_dma(self, iova: int, size: int) -> None:
        rc = lib.model_iommu_unmap(self._nic._m, iova, size)
        if rc:
            raise DmaError(f"model IOMMU has no mapping at IOVA {iova:#x}+{size:#x}")
        self.unmap_calls += 1

    @property
    def mapping_count(self) -> int:
        return 0 if self._nic.closed else lib.model_iommu_count(self._nic._m)


@dataclass(frozen=True)
class Fault:
    """A DMA the IOMMU refused, like a DMAR fault record."""

    iova: int
    length: int
    port: int
    write: bool


class ModelPort(PciFunction):
    """One 82599 port of the model, behind the device seam."""

    def __init__(self, nic: ModelNic, index: int, mac: bytes, device_id: int):
        self.nic = nic
        self.index = index
        self.address = f"{nic.name}.{index}"
        self.ids = PciIds(INTEL, device_id, INTEL, 0x0003, revision=1)
        self.dma = nic.dma
        self.bar0_size = r.BAR0_SIZE
        self.mac = mac
        self.violations: list[str] = []
        self._p = lib.model_port(nic._m, index)
        self._bus_master = False
        self._gio_disabled = False
        self._removed = False
        self._closed = False
        self._reset_done = 0.0
        self._eeprom_done = 0.0
        self._high_halves: dict[int, int] = {}
        self._reset_image = r.reset_image(mac)
        self._image = ffi.new("uint32_t[]", self._reset_image)
        self._read_special = self._build_read_table()
        self._write_special = self._build_write_table()
        self._software_reset()
        self._reset_done = self._eeprom_done = 0.0  # power-on: the reset already happened

    # ---------------------------------------------------------------- the seam
    @property
    def regs_address(self) -> int:
        return int(ffi.cast("uintptr_t", lib.model_port_regs(self._p)))

    def read32(self, offset: int) -> int:
        self.check_offset(offset)
        if self._removed or self._closed:
            return ALL_ONES
        offset = r.canonical(offset)
        handler = self._read_special.get(offset)
        return handler(offset) if handler else lib.model_reg_load(self._p, offset)

    def write32(self, offset: int, value: int) -> None:
        self.check_offset(offset)
        if not 0 <= value <= ALL_ONES:
            raise ValueError(
                f"{self.address}: register value {value!r} is not a 32-bit unsigned integer"
            )
        if self._removed or self._closed:
            return
        offset = r.canonical(offset)
        if offset != r.CTRL and time.monotonic() < self._reset_done:
            self._violation(
                f"write of {value:#x} to {offset:#x} while the device is still in reset"
            )
            return
        handler = self._write_special.get(offset)
        if handler:
            handler(offset, value)
        else:
            lib.model_reg_store(self._p, offset, value)
            lib.model_config_changed(self._p)

    def set_bus_master(self, enabled: bool) -> None:
        self._bus_master = bool(enabled)
        self._update_dma()

    @property
    def bus_master(self) -> bool:
        return self._bus_master

    def close(self) -> None:
        """Release the function: like vfio-pci on release, stop DMA and reset the device."""
        if self._closed or self.nic.closed:
            self._closed = True
            return
        self.set_bus_master(False)
        if not self._removed:
            self._software_reset()
        self._closed = True

    # ---------------------------------------------------------------- fault hooks
    def surprise_remove(self) -> None:
        """Hot-unplug: every read returns all-ones, writes are dropped, DMA stops."""
        self._removed = True
        lib.model_port_remove(self._p)

    def set_link(self, up: bool) -> None:
        """Force the link down now (up=False), or lift that again (up=True)."""
        lib.model_port_set_link(self._p, 1 if up else 0)

    # ---------------------------------------------------------------- inspection
    @property
    def link_up(self) -> bool:
        return not self._removed and bool(lib.model_port_link_up(self._p))

    @property
    def counters(self) -> dict[str, int]:
        """The model's own 64-bit truth counters (never cleared by register reads)."""
        c = ffi.new("struct model_port_counters *")
        lib.model_port_counters(self._p, c)
        out = {
            name: getattr(c, name)
            for name in dir(c)
            if not name.startswith("rx_queue") and not name.startswith("tx_queue")
        }
        out["rx_queue_frames"] = list(c.rx_queue_frames)
        out["tx_queue_frames"] = list(c.tx_queue_frames)
        return out

    def receive(self, frame: bytes) -> None:
        """Put one frame (without FCS) on this port's wire, towards its MAC."""
        if lib.model_receive_frame(self._p, frame, len(frame)) < 0:
            raise ValueError(f"frame of {len(frame)} bytes exceeds the model's 16 KiB limit")

    # ---------------------------------------------------------------- semantics
    def _violation(self, text: str) -> None:
        self.violations.append(text)

    def _update_dma(self) -> None:
        lib.model_port_set_dma_enabled(self._p, int(self._bus_master and not self._gio_disabled))

    def _software_reset(self) -> None:
        """CTRL.RST (datasheet 4.6.3.2): registers to their reset values, queues and link off."""
        lib.model_load_register_image(self._p, self._image)
        lib.model_port_flush(self._p)
        self._gio_disabled = False
        self._high_halves.clear()
        self._update_dma()
        now = time.monotonic()
        self._reset_done = now + self.nic.reset_delay
        self._eeprom_done = self._reset_done + self.nic.eeprom_delay

    def _build_read_table(self) -> dict:
        table = {
            r.CTRL: self._read_ctrl,
            r.STATUS: self._read_status,
            r.EEC: self._read_eec,
            r.RDRXCTL: self._read_rdrxctl,
            r.LINKS: self._read_links,
            r.EICR: lambda off: lib.model_reg_take(self._p, off),
            r.EIMC: lambda off: 0,  # write-only
        }
        for offset in r.RC32.values():
            table[offset] = lambda off: lib.model_reg_take(self._p, off)
        for low, high, which in r.RC64.values():
            table[low] = lambda off, w=which, h=high: self._read_rc64_low(w, h)
            table[high] = lambda off: self._high_halves.pop(off, 0)
        return table

    def _build_write_table(self) -> dict:
        ignore = lambda off, value: None  # noqa: E731 - read-only registers
        table = {
            r.CTRL: self._write_ctrl,
            r.STATUS: ignore,
            r.LINKS: ignore,
            r.EICR: lambda off, v: lib.model_reg_and(self._p, off, ~v & ALL_ONES),
            r.EICS: lambda off, v: lib.model_reg_or(self._p, r.EICR, v),
            r.EIMS: lambda off, v: lib.model_reg_or(self._p, r.EIMS, v),
            r.EIMC: lambda off, v: lib.model_reg_and(self._p, r.EIMS, ~v & ALL_ONES),
            r.AUTOC: self._write_autoc,
            r.FCTRL: self._write_fctrl,
            r.DMATXCTL: self._write_plain,
        }
        for offset in r.RC32.values():
            table[offset] = ignore
        for low, high, _ in r.RC64.values():
            table[low] = table[high] = ignore
        for q in range(r.QUEUES):
            rx, tx = r.rx_block(q), r.tx_block(q)
            table[rx + r.RXDCTL] = lambda off, v, q=q: self._write_dctl(off, v, q, "RX")
            table[tx + r.TXDCTL] = lambda off, v, q=q: self._write_dctl(off, v, q, "TX")
            for reg in (rx + r.RDH, rx + r.RDT, tx + r.TDH, tx + r.TDT):
                table[reg] = self._write_index
        return table

    def _write_plain(self, offset: int, value: int) -> None:
        lib.model_reg_store(self._p, offset, value)
        lib.model_config_changed(self._p)

    def _read_ctrl(self, offset: int) -> int:
        value = lib.model_reg_load(self._p, offset)
        if time.monotonic() < self._reset_done:
            value |= r.CTRL_RST  # RST self-clears once the reset completes
        return value

    def _read_status(self, offset: int) -> int:
        value = (self.index & 1) << r.STATUS_LAN_ID_SHIFT
        if self._bus_master and not self._gio_disabled:
            value |= r.STATUS_GIO  # no master requests pending once GIO_DIS is set
        return value

    def _read_eec(self, offset: int) -> int:
        value = lib.model_reg_load(self._p, offset)
        return value | r.EEC_ARD if time.monotonic() >= self._eeprom_done else value & ~r.EEC_ARD

    def _read_rdrxctl(self, offset: int) -> int:
        value = lib.model_reg_load(self._p, offset)
        return value | r.RDRXCTL_DMAIDONE if time.monotonic() >= self._eeprom_done else value

    def _read_links(self, offset: int) -> int:
        if lib.model_port_link_up(self._p):
            return r.LINKS_UP | r.LINKS_SPEED_10G | r.LINKS_KX_AN_COMP
        return 0

    def _read_rc64_low(self, which: int, high: int) -> int:
        value = lib.model_stat64_take(self._p, which)
        self._high_halves[high] = value >> 32
        return value & ALL_ONES

    def _write_ctrl(self, offset: int, value: int) -> None:
        if value & (r.CTRL_RST | r.CTRL_LRST):
            if value & r.CTRL_RST:
                self._software_reset()
            else:  # link reset only: the link must be renegotiated
                lib.model_port_link_enable(self._p, -1)
                self._reset_done = time.monotonic() + self.nic.reset_delay
            value &= ~(r.CTRL_RST | r.CTRL_LRST)
        self._gio_disabled = bool(value & r.CTRL_GIO_DIS)
        self._update_dma()
        lib.model_reg_store(self._p, offset, value)

    def _write_autoc(self, offset: int, value: int) -> None:
        if value & r.AUTOC_AN_RESTART:
            # AN_RESTART is a trigger: it reads back 0 (UNVERIFIED) and starts link setup
            lib.model_port_link_enable(self._p, int(self.nic.link_delay * 1e9))
            value &= ~r.AUTOC_AN_RESTART
        lib.model_reg_store(self._p, offset, value)

    def _write_fctrl(self, offset: int, value: int) -> None:
        if lib.model_reg_load(self._p, r.RXCTRL) & r.RXCTRL_RXEN:
            self._violation(
                "FCTRL written while RXCTRL.RXEN = 1 (filters may only change with RX off)"
            )
        self._write_plain(offset, value)

    def _write_dctl(self, offset: int, value: int, queue: int, kind: str) -> None:
        value &= ~r.QUEUE_SWFLSH  # software flush completes at once
        if value & r.QUEUE_ENABLE:
            block = r.rx_block(queue) if kind == "RX" else r.tx_block(queue)
            length = lib.model_reg_load(self._p, block + r.RDLEN)
            base = lib.model_reg_load(self._p, block + r.RDBAL)
            if length == 0 or length % 128:
                self._violation(
                    f"{kind} queue {queue} enabled with length {length} (not a multiple of 128)"
                )
            if base % 16:
                self._violation(
                    f"{kind} queue {queue} enabled with base {base:#x} not 16-byte aligned"
                )
            if kind == "TX" and not lib.model_reg_load(self._p, r.DMATXCTL) & r.DMATXCTL_TE:
                self._violation(f"TX queue {queue} enabled before DMATXCTL.TE (datasheet 4.6.8)")
            if kind == "RX" and not lib.model_reg_load(self._p, block + r.SRRCTL) & 0x1F:
                self._violation(f"RX queue {queue} enabled with SRRCTL.BSIZEPACKET = 0")
        self._write_plain(offset, value)

    def _write_index(self, offset: int, value: int) -> None:
        # head/tail registers hold 16-bit indexes; not configuration, so no refresh needed
        lib.model_reg_store(self._p, offset, value & 0xFFFF)


class TrafficEndpoint:
    """A generator and checker at the far end of one port's wire (MoonGen-style).

    The generator sends sequence-numbered frames *into* the port; the checker verifies the
    frames the port *transmits*: loss, duplicates, reordering and corruption per flow.
    """

    def __init__(self, nic: ModelNic, port: ModelPort):
        self.nic = nic
        self.port = port
        self._t = lib.model_wire_traffic(port._p)
        if self._t == ffi.NULL:
            raise MemoryError("cannot allocate the traffic endpoint")

    def configure(
        self,
        *,
        size: int = 60,
        flows: int = 1,
        count: int = 0,
        rate: int = 0,
        burst: int = 32,
        window: int = 0,
        dst_mac: bytes | None = None,
        src_mac: bytes | None = None,
        stream: int | None = None,
        ip_base: str = "10.0.0.0",
    ) -> TrafficEndpoint:
        """Set up the generator.

        size: frame length without FCS (60 = a 64-byte frame on the wire); flows: number of
        UDP flows (source address and port vary); count: frames to send over the endpoint's
        lifetime (0 = no limit);
        rate: frames per second (0 = `burst` frames per engine step); window: at most this
        many frames in flight towards the paired checker (0 = open loop).
        """
        self._check()
        if not 60 <= size <= 16384:
            raise ValueError("frame size must be 60..16384 bytes")
        if not 1 <= flows <= 4096:
            raise ValueError("flows must be 1..4096")
        dst = dst_mac or self.port.mac
        src = src_mac or bytes([0x02, 0x00, 0x00, 0x7E, 0x00, self.port.index])
        stream = self.port.index if stream is None else stream
        base = int.from_bytes(bytes(int(x) for x in ip_base.split(".")), "big")
        lib.model_traffic_configure(
            self._t, dst, src, size, flows, count, rate, burst, window, stream, base
        )
        self.stream = stream
        return self

    def pair(self, checker: TrafficEndpoint) -> None:
        """Tell the generator where its frames are checked (needed for `window`)."""
        self._check()
        lib.model_traffic_pair(self._t, checker._t)
        checker.expect_stream(self.stream)

    def expect_stream(self, stream: int | None) -> None:
        self._check()
        lib.model_traffic_expect_stream(self._t, -1 if stream is None else stream)

    def start(self) -> None:
        self._check()
        lib.model_traffic_start(self._t)

    def stop(self) -> None:
        self._check()
        lib.model_traffic_stop(self._t)

    @property
    def stats(self) -> dict[str, int]:
        self._check()
        s = ffi.new("struct model_traffic_stats *")
        lib.model_traffic_stats(self._t, s)
        return {name: getattr(s, name) for name in dir(s)}

    def frame(self, flow: int, seq: int) -> bytes:
        """The exact frame the generator sends for (flow, seq)."""
        self._check()
        out = ffi.new("uint8_t[16384]")
        n = lib.model_traffic_frame(self._t, flow, seq, out)
        return bytes(ffi.buffer(out, n))

    def _check(self) -> None:
        if self.nic.closed or self.nic._traffic.get(self.port.index) is not self:
            raise RuntimeError("this traffic endpoint was unplugged")


class ModelNic:
    """An 82599 card of `ports` ports behind one IOMMU, with its packet engine.

    mode="thread" runs the engine in a background thread (started at once);
    mode="step" moves packets only inside `step()`.
    Delays are in seconds: reset (CTRL.RST self-clear), EEPROM auto-read after reset, and
    link establishment after AUTOC.AN_RESTART.
    """

    _count = 0

    def __init__(
        self,
        ports: int = 2,
        *,
        mode: str = "thread",
        name: str | None = None,
        device_id: int = DEVICE_82599_SFP,
        macs: list[bytes] | None = None,
        iova_ranges: list[tuple[int, int]] | None = None,
        reset_delay: float = 0.001,
        eeprom_delay: float = 0.002,
        link_delay: float = 0.05,
        prefer_hugepages: bool = True,
    ):
        if mode not in ("thread", "step"):
            raise ValueError("mode must be 'thread' or 'step'")
        if not 1 <= ports <= 8:
            raise ValueError("a model card has 1..8 ports")
        card = ModelNic._count
        ModelNic._count += 1
        self.name = name or f"model{card}"
        self.mode = mode
        self.reset_delay, self.eeprom_delay, self.link_delay = reset_delay, eeprom_delay, link_delay
        self.closed = False
        self._m = lib.model_new(ports)
        if self._m == ffi.NULL:
            raise MemoryError("cannot allocate the device model")
        self.iommu = ModelIommu(self, iova_ranges or DEFAULT_IOVA_RANGES)
        self.dma = DmaMemory(self.iommu, prefer_hugepages=prefer_hugepages)
        macs = macs or [_mac(i, card) for i in range(ports)]
        self.ports = [ModelPort(self, i, macs[i], device_id) for i in range(ports)]
        self._traffic: dict[int, TrafficEndpoint] = {}
        self._stop = ffi.new("uint32_t *")
        self._thread: threading.Thread | None = None
        if mode == "thread":
            self.start()

    # ---------------------------------------------------------------- wires
    def connect(self, a: ModelPort, b: ModelPort) -> None:
        """Join two ports with a cable."""
        self._forget(a, b)
        lib.model_wire_cable(a._p, b._p)

    def attach_traffic(self, port: ModelPort) -> TrafficEndpoint:
        """Connect a traffic generator/checker to a port."""
        self._forget(port)
        endpoint = TrafficEndpoint(self, port)
        self._traffic[port.index] = endpoint
        endpoint.configure()
        return endpoint

    def attach_tap(self, port: ModelPort, fd: int) -> None:
        """Connect a port to a TAP file descriptor (must be non-blocking)."""
        self._forget(port)
        lib.model_wire_tap(port._p, fd)

    def unplug(self, port: ModelPort) -> None:
        """Pull the port's wire: its link (and a cable peer's) goes down."""
        self._forget(port)
        lib.model_wire_none(port._p)

    def _forget(self, *ports: ModelPort) -> None:
        for port in ports:
            self._traffic.pop(port.index, None)

    # ---------------------------------------------------------------- running
    def start(self) -> None:
        if self._thread:
            return
        self._stop[0] = 0
        self._thread = threading.Thread(
            target=lib.model_run,
            args=(self._m, self._stop),
            name=f"{self.name}-engine",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            self._stop[0] = 1
            self._thread.join()
            self._thread = None

    def step(self, budget: int = 64) -> int:
        """Run the engine once (step mode): returns the amount of work done."""
        if self._thread:
            raise RuntimeError("step() is for step mode; the engine thread is running")
        return lib.model_step(self._m, budget)

    # ---------------------------------------------------------------- inspection
    @property
    def fault_count(self) -> int:
        return lib.model_fault_count(self._m)

    @property
    def faults(self) -> list[Fault]:
        """The most recent IOMMU faults (up to 64), oldest first."""
        buf = ffi.new("struct model_fault[64]")
        n = lib.model_fault_log(self._m, buf, 64)
        return [Fault(f.iova, f.length, f.port, bool(f.write)) for f in buf[0:n]]

    @property
    def mapping_count(self) -> int:
        return self.iommu.mapping_count

    def close(self) -> None:
        if self.closed:
            return
        self.stop()
        for port in self.ports:
            port.close()
        self.dma.close()
        self.closed = True
        self._traffic.clear()
        lib.model_free(self._m)
        self._m = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
