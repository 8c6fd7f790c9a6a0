"""The igb (82576) driver on the host, without a device: the device-ID table, the register
table, the shared PortConfig, and the init/run/shutdown sequence against `FakeIgb`, a
small register-level stand-in written from QEMU's `hw/net/igb_core.c` (the device the VM
tests use): RST clears itself inside the write, MDIC answers PHY address 1 at once,
STATUS.LU comes up a moment after an autonegotiation restart and never without one,
EECD.AUTO_RD is never set, queue 0 is enabled after reset, RXCSUM resets to IPOFL|TUOFL
and a UDP frame with a bad checksum then gets L4E (bit 29), the 64-bit counters clear
when their high half is read. The real proof is tests/vm/test_igb_guest.py."""

from __future__ import annotations

import ctypes
import struct
import time

import pytest

from ixyd.device import ALL_ONES, PciFunction, PciIds
from ixyd.dma import DmaMapper, DmaMemory
from ixyd.drivers import igb_registers as r
from ixyd.drivers import ixgbe_registers
from ixyd.drivers.config import PortConfig
from ixyd.drivers.igb import IgbPort, identify
from ixyd.drivers.registers import Mode, RegisterFile
from ixyd.drivers.rings import free_packets, packet_data, write_packet
from ixyd.errors import ConfigError, DeviceError, DeviceRemovedError, UnsupportedDeviceError
from ixyd.toeplitz import INTEL_DEFAULT_KEY

SMALL = {"rx_ring": 64, "tx_ring": 64, "pool_size": 128, "link_timeout": 2.0}
BROADCAST = b"\xff" * 6
FOREIGN_MAC = bytes.fromhex("020000abcdef")


def config(**overrides) -> PortConfig:
    return PortConfig(**{**SMALL, **overrides})


# =========================================================================================
# Device IDs
# =========================================================================================
@pytest.mark.parametrize("device_id", [0x10C9, 0x10E8, 0x1526, 0x150A])
def test_copper_82576_ids_are_supported(device_id):
    assert identify(PciIds(0x8086, device_id)).family == r.FAMILY_82576


@pytest.mark.parametrize("device_id", [0x10E6, 0x10E7, 0x150D, 0x1518])
def test_serdes_and_fiber_82576_are_refused_because_the_link_is_not_the_copper_phy(device_id):
    with pytest.raises(UnsupportedDeviceError, match="SerDes PCS"):
        identify(PciIds(0x8086, device_id))


@pytest.mark.parametrize("device_id", [0x1521, 0x1522, 0x1523, 0x1524])
def test_i350_is_named_but_refused_with_the_reason(device_id):
    with pytest.raises(UnsupportedDeviceError, match=r"I350 family.*82580 path"):
        identify(PciIds(0x8086, device_id))


@pytest.mark.parametrize("device_id", [0x10CA, 0x152D, 0x1520, 0x152F])
def test_virtual_functions_are_refused(device_id):
    with pytest.raises(UnsupportedDeviceError, match="virtual function.*give it the PF"):
        identify(PciIds(0x8086, device_id))


@pytest.mark.parametrize(
    "ids, message",
    [
        (PciIds(0x8086, 0x10FB), "unknown device ID 0x10fb"),  # an 82599 is ixgbe's
        (PciIds(0x8086, 0x1234), "unknown device ID 0x1234.*0x10c9"),
        (PciIds(0x15B3, 0x10C9), "not an Intel device"),
    ],
)
def test_unknown_and_foreign_devices_are_refused(ids, message):
    with pytest.raises(UnsupportedDeviceError, match=message):
        identify(ids)


def test_every_known_family_is_supported_or_has_a_reason():
    for info in r.DEVICES.values():
        assert info.supported or r.UNSUPPORTED_FAMILY_REASONS[info.family]
        assert info.device_id not in r.VIRTUAL_FUNCTIONS


# =========================================================================================
# Register table
# =========================================================================================
def _all_offsets() -> list[tuple[int, str]]:
    out = []
    for register in r.REGISTERS:
        for n in range(register.count):
            out.append((register.address(n), f"{register.name}[{n}]"))
            if register.mode is Mode.RC64:
                out.append((register.address(n) + register.high, f"{register.name}H[{n}]"))
    return out


def test_no_two_register_instances_share_an_offset():
    offsets = _all_offsets()
    seen: dict[int, str] = {}
    for offset, name in offsets:
        assert offset not in seen, f"{name} and {seen[offset]} both at {offset:#07x}"
        seen[offset] = name
        assert offset % 4 == 0 and offset < 0x20000  # aligned, inside QEMU's 128 KiB BAR0


@pytest.mark.parametrize("n", [0, 1, 7, 15])
def test_per_queue_registers_follow_the_82576_layout(n):
    table = {reg.name: reg for reg in r.REGISTERS}
    rx = {
        "RDBAL": 0x00, "RDBAH": 0x04, "RDLEN": 0x08, "SRRCTL": 0x0C,
        "RDH": 0x10, "RXCTL": 0x14, "RDT": 0x18, "RXDCTL": 0x28, "RQDPC": 0x30,
    }  # fmt: skip
    tx = {
        "TDBAL": 0x00, "TDBAH": 0x04, "TDLEN": 0x08, "TDH": 0x10, "TXCTL": 0x14,
        "TDT": 0x18, "TXDCTL": 0x28, "TDWBAL": 0x38, "TDWBAH": 0x3C,
    }  # fmt: skip
    for name, delta in rx.items():
        assert table[name].count == 16
        assert table[name].address(n) == 0xC000 + 0x40 * n + delta, name
    for name, delta in tx.items():
        assert table[name].address(n) == 0xE000 + 0x40 * n + delta, name


def test_82576_specific_offsets_and_modes():
    table = {reg.name: reg for reg in r.REGISTERS}
    assert (table["MPC"].address(), table["MPC"].count, table["MPC"].mode) == (0x4010, 1, Mode.RC)
    for name, low in (("GORC", 0x4088), ("GOTC", 0x4090), ("TOR", 0x40C0), ("TOT", 0x40C8)):
        assert (table[name].address(), table[name].high, table[name].mode) == (low, 4, Mode.RC64)
    assert table["RAL"].address(15) == 0x5478 and table["RAL"].address(16) == 0x54E0
    assert table["RAH"].address(23) == 0x54E0 + 8 * 7 + 4
    expected = {
        "CTRL": 0x0, "STATUS": 0x8, "EECD": 0x10, "CTRL_EXT": 0x18, "MDIC": 0x20,
        "ICR": 0xC0, "IMS": 0xD0, "IMC": 0xD8, "RCTL": 0x100, "TCTL": 0x400, "TIPG": 0x410,
        "RXPBS": 0x2404, "TXPBS": 0x3404, "EIMS": 0x1524, "EIMC": 0x1528, "EICR": 0x1580,
        "RXCSUM": 0x5000, "MTA": 0x5200, "MRQC": 0x5818, "RETA": 0x5C00, "RSSRK": 0x5C80,
    }  # fmt: skip
    assert {name: table[name].address() for name in expected} == expected
    assert table["IMC"].mode is Mode.WO and table["EIMC"].mode is Mode.WO


def test_bits_that_differ_from_the_82599_are_the_82576_ones():
    assert r.SRRCTL_DROP_EN == 0x80000000 != ixgbe_registers.SRRCTL_DROP_EN
    assert r.DCTL_THRESH_MASK == 0x1F != ixgbe_registers.TXDCTL_THRESH_MASK
    assert (r.RXD_ERR_L4E, r.RXD_ERR_IPE, r.RXD_ERR_RXE) == (1 << 29, 1 << 30, 1 << 31)
    assert r.MRQC_ENABLE_RSS == 0x2 and r.RCTL_EN == 0x2 and r.RCTL_SECRC == 1 << 26
    assert r.TIPG_COPPER == 0x00702008  # verified on QEMU (docs/reference/82576.md#tx-set-up)
    assert r.RSS_DEFAULT_KEY == INTEL_DEFAULT_KEY


# =========================================================================================
# PortConfig is shared with ixgbe
# =========================================================================================
@pytest.mark.parametrize(
    "bad",
    [{"rx_ring": 100}, {"tx_ring": 32}, {"rx_queues": 17}, {"pool_size": 64}, {"drop_en": 1}],
)
def test_bad_config_is_refused_before_the_device_is_touched(bad):
    with pytest.raises(ConfigError):
        config(**bad)


def test_the_82576_has_as_many_queues_as_port_config_allows():
    assert r.HW_QUEUES == r.RSS_MAX_QUEUES == PortConfig(rx_queues=16, tx_queues=16).rx_queues


# =========================================================================================
# A QEMU-like 82576 on the host
# =========================================================================================
class FakeMapper(DmaMapper):
    """An IOMMU that maps everything it is asked to and translates IOVAs for FakeIgb."""

    def __init__(self):
        self.maps: dict[int, tuple[int, int]] = {}

    def valid_iova_ranges(self):
        return [(0, (1 << 48) - 1)]

    def map_dma(self, vaddr, iova, size):
        self.maps[iova] = (vaddr, size)

    def unmap_dma(self, iova, size):
        del self.maps[iova]

    def host(self, iova: int, size: int) -> int:
        for base, (vaddr, length) in self.maps.items():
            if base <= iova and iova + size <= base + length:
                return vaddr + iova - base
        raise AssertionError(f"DMA to unmapped IOVA {iova:#x}")


# register offsets the fake treats specially
CTRL, STATUS, EECD, MDIC, ICR, RCTL, RXCSUM, TCTL, EICR = (
    0x0, 0x8, 0x10, 0x20, 0xC0, 0x100, 0x5000, 0x400, 0x1580
)  # fmt: skip
CLEAR_ON_READ = {0x4074, 0x4078, 0x407C, 0x4080, 0x40A4, 0x40AC, 0x40D0, 0x40D4, 0x40F0, 0x40F4}
CLEAR_ON_READ |= {0xC030 + 0x40 * n for n in range(16)} | {ICR, EICR}
HIGH_HALVES = {0x408C, 0x4094, 0x40C4, 0x40CC}  # reading one clears both halves
RING_REGISTERS = {0x0, 0x4, 0x8, 0xC}  # base low/high, length, SRRCTL: queue must be off


class FakeIgb(PciFunction):
    """Registers and DMA of one QEMU igb port, as far as the driver can tell."""

    bar0_size = 0x20000

    def __init__(self, mapper: FakeMapper, dma: DmaMemory, index: int, device_id=0x10C9):
        self.address = f"fake-igb{index}"
        self.ids = PciIds(0x8086, device_id)
        self.dma = dma
        self.mac = bytes.fromhex(f"5254000000{index + 1:02x}")
        self._mapper = mapper
        self._bar = (ctypes.c_uint32 * (self.bar0_size // 4))()
        self._bus_master = False
        self.removed = False
        self.cable = True  # autonegotiation completes only with a cable
        self.phy_address = 1
        self.autoneg_delay = 0.05
        self._link_at: float | None = None
        self.peer: FakeIgb | None = None
        self.violations: list[str] = []
        self.rctl_writes: list[int] = []
        # BMCR: 1000 Mb/s, full duplex, AUTOEN; and powered down, as Linux igb leaves it
        self.phy = {0: 0x1140 | r.BMCR_PDOWN, 1: 0x796D, 2: 0x02A8}
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        """CTRL.RST: MAC registers to their reset values, autonegotiation cancelled. The PHY
        keeps its registers, as on hardware (QEMU re-initialises it too, which hides a
        driver that forgets to power the PHY up)."""
        ctypes.memset(self._bar, 0, self.bar0_size)
        self._link_at = None
        regs = {
            CTRL: 0x1 | r.CTRL_LRST | 0x200 | 0x100000,
            STATUS: 0x400 | 1 << 31,
            EECD: r.EECD_PRES,
            RXCSUM: r.RXCSUM_IPOFL | r.RXCSUM_TUOFL,
            TCTL: r.TCTL_PSP | 0xF << 4 | 0x40 << 12,
            0x2404: 0x40,
            0x3404: 0x28,
            0xC028: r.RXDCTL_ENABLE | 1 << 16,  # queue 0 enabled after reset
            0xE028: r.TXDCTL_ENABLE,
            0x5400: int.from_bytes(self.mac[:4], "little"),
            0x5404: int.from_bytes(self.mac[4:], "little") | r.RAH_AV,
        }
        for offset, value in regs.items():
            self._bar[offset // 4] = value

    def reg(self, offset: int) -> int:
        """A register's stored value, without side effects."""
        return self._bar[offset // 4]

    @property
    def link_up(self) -> bool:
        return self._link_at is not None and self.cable and time.monotonic() >= self._link_at

    # ------------------------------------------------------------------ PciFunction
    @property
    def regs_address(self) -> int:
        return ctypes.addressof(self._bar)

    def set_bus_master(self, enabled: bool) -> None:
        self._bus_master = enabled

    @property
    def bus_master(self) -> bool:
        return self._bus_master

    def close(self) -> None:
        pass

    def surprise_remove(self) -> None:
        self.removed = True

    def read32(self, offset: int) -> int:
        self.check_offset(offset)
        if self.removed:
            return ALL_ONES
        value = self._bar[offset // 4]
        if offset == STATUS:
            gio = 0 if self.reg(CTRL) & (r.CTRL_GIO_DIS | r.CTRL_LRST) else r.STATUS_GIO
            value |= 0x1 | 2 << 6 | gio | (r.STATUS_LU if self.link_up else 0)
        elif offset in CLEAR_ON_READ:
            self._bar[offset // 4] = 0
        elif offset in HIGH_HALVES:
            self._bar[offset // 4] = self._bar[offset // 4 - 1] = 0
        return value

    def write32(self, offset: int, value: int) -> None:
        self.check_offset(offset)
        if self.removed:
            return
        queue_block = offset >= 0xC000 and offset & 0x3F in RING_REGISTERS
        if queue_block and self.reg(offset & ~0x3F | 0x28) & r.RXDCTL_ENABLE:
            self.violations.append(f"ring register {offset:#x} written with its queue enabled")
        if offset == CTRL:
            self._bar[0] = value & ~r.CTRL_RST
            if value & r.CTRL_RST:
                self._reset()
        elif offset == MDIC:
            self._write_mdic(value)
        elif offset == RCTL:
            old = self.reg(RCTL)
            filters = r.RCTL_UPE | r.RCTL_MPE | r.RCTL_BAM
            if old & r.RCTL_EN and (old ^ value) & filters:
                self.violations.append(f"RCTL filters changed with EN set: {old:#x} -> {value:#x}")
            self.rctl_writes.append(value)
            self._bar[offset // 4] = value
        else:
            self._bar[offset // 4] = value

    def _write_mdic(self, value: int) -> None:
        register = value >> r.MDIC_REG_SHIFT & 0x1F
        if value >> r.MDIC_PHY_SHIFT & 0x1F != self.phy_address:
            value = self.reg(MDIC) | r.MDIC_ERROR
        elif value & r.MDIC_OP_READ:
            value = value & ~r.MDIC_DATA_MASK | self.phy.get(register, 0)
        elif value & r.MDIC_OP_WRITE:
            data = value & r.MDIC_DATA_MASK
            self.phy[register] = data & ~(r.BMCR_ANRESTART | 0x3F)
            if register == 0 and data & r.BMCR_ANRESTART and data & r.BMCR_AUTOEN:
                self._link_at = time.monotonic() + self.autoneg_delay  # QEMU: 500 ms timer
        self._bar[MDIC // 4] = value | r.MDIC_READY

    # ------------------------------------------------------------------ packets
    def _count(self, offset: int, amount: int = 1) -> None:
        self._bar[offset // 4] = self._bar[offset // 4] + amount & ALL_ONES

    def transmit(self) -> int:
        """Run every enabled TX ring from TDH to TDT, as a TDT write does in QEMU."""
        sent = 0
        if not self.reg(TCTL) & r.TCTL_EN or not self._bus_master:
            return 0
        for q in range(16):
            base = 0xE000 + 0x40 * q
            if not self.reg(base + 0x28) & r.TXDCTL_ENABLE or not self.reg(base + 0x8):
                continue
            ring = self.reg(base) | self.reg(base + 4) << 32
            size = self.reg(base + 0x8) // 16
            frame = b""
            while self.reg(base + 0x10) != self.reg(base + 0x18):
                head = self.reg(base + 0x10)
                desc = self._mapper.host(ring + 16 * head, 16)
                address, cmd, olinfo = struct.unpack("<QII", ctypes.string_at(desc, 16))
                frame += ctypes.string_at(self._mapper.host(address, cmd & 0xFFFF), cmd & 0xFFFF)
                if cmd & 0x01000000:  # EOP
                    self._count(0x4080)  # GPTC
                    self._count(0x4090, len(frame) + 4)  # GOTC, with FCS
                    if self.peer is not None and self.link_up:
                        self.peer.receive(frame)
                    frame, sent = b"", sent + 1
                if cmd & 0x08000000:  # RS: write back with DD
                    ctypes.memmove(desc + 12, struct.pack("<I", olinfo | 1), 4)
                self._bar[(base + 0x10) // 4] = (head + 1) % size
        return sent

    def receive(self, frame: bytes) -> None:
        """One frame from the wire into RX queue 0, with QEMU's write-back."""
        rctl = self.reg(RCTL)
        if not (rctl & r.RCTL_EN and self.link_up and self._bus_master):
            return
        dst = frame[:6]
        if not (rctl & r.RCTL_UPE or dst == self.mac or dst == BROADCAST and rctl & r.RCTL_BAM):
            return
        base = 0xC000
        head, tail = self.reg(base + 0x10), self.reg(base + 0x18)
        if not self.reg(base + 0x28) & r.RXDCTL_ENABLE or head == tail:
            return
        ring = self.reg(base) | self.reg(base + 4) << 32
        desc = self._mapper.host(ring + 16 * head, 16)
        address = struct.unpack("<Q", ctypes.string_at(desc, 8))[0]
        ctypes.memmove(self._mapper.host(address, len(frame)), frame, len(frame))
        status = 0x3  # DD | EOP
        if self.reg(RXCSUM) & r.RXCSUM_TUOFL and _udp_checksum_is_bad(frame):
            status |= r.RXD_ERR_L4E  # igb_verify_csum_in_sw
        ctypes.memmove(desc, struct.pack("<IIIHH", 0, 0, status, len(frame), 0), 16)
        self._bar[(base + 0x10) // 4] = (head + 1) % (self.reg(base + 0x8) // 16)
        self._count(0x4074)  # GPRC
        self._count(0x4088, len(frame) + 4)  # GORC, with FCS


def _udp_sum(frame: bytes) -> int:
    """One's-complement sum of an IPv4/UDP frame's pseudo-header and UDP datagram."""
    udp = frame[34:]
    length = struct.unpack(">H", udp[4:6])[0]
    data = frame[26:34] + struct.pack(">BBH", 0, 17, length) + udp[:length]
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _udp_checksum_is_bad(frame: bytes) -> bool:
    """What QEMU's net_rx_pkt_validate_l4_csum decides for an IPv4/UDP frame (20-byte IP
    header); other frames carry no checksum to verify."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 17 or frame[40:42] == b"\0\0":
        return False
    return _udp_sum(frame) != 0xFFFF


def udp_frame(dst: bytes, src: bytes, seq: int, good_checksum: bool = True) -> bytes:
    """An IPv4/UDP frame carrying seq; its UDP checksum right, or deliberately wrong."""
    payload = struct.pack(">Q", seq) + bytes(22)
    udp_len = 8 + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, seq & 0xFFFF, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    frame = dst + src + b"\x08\x00" + ip + struct.pack(">HHHH", 4000, 5000, udp_len, 0) + payload
    checksum = ~_udp_sum(frame) & 0xFFFF or 0xFFFF
    if not good_checksum:
        checksum ^= 0x5A5A
    frame = frame[:40] + struct.pack(">H", checksum) + frame[42:]
    assert _udp_checksum_is_bad(frame) != good_checksum
    return frame


@pytest.fixture
def card():
    """Two fake ports behind one DMA allocator (one VFIO container), cabled to each other."""
    mapper = FakeMapper()
    dma = DmaMemory(mapper, prefer_hugepages=False)
    a, b = FakeIgb(mapper, dma, 0), FakeIgb(mapper, dma, 1)
    a.peer, b.peer = b, a
    yield a, b, mapper
    dma.close()


def test_init_brings_the_link_up_through_the_phy_and_programs_82576_values(card):
    dev, _, _ = card
    start = time.monotonic()
    with IgbPort(dev, config()) as port:
        assert port.link() == (True, 1000)
        assert time.monotonic() - start < 1.0  # no blocking on EECD.AUTO_RD
        assert port.mac == dev.mac and port.mac_address == "52:54:00:00:00:01"
        assert dev.phy[0] & r.BMCR_PDOWN == 0 and dev.phy[0] & r.BMCR_AUTOEN
        assert dev.reg(0xC00C) == 0x80000000 | 0x02000000 | 2  # SRRCTL: DROP_EN bit 31
        assert dev.reg(RXCSUM) == 0  # no checksum offload: L4E can never be reported
        assert dev.reg(RCTL) == r.RCTL_EN | r.RCTL_BAM | r.RCTL_SECRC | r.RCTL_UPE | r.RCTL_MPE
        assert dev.reg(TCTL) == r.TCTL_EN | r.TCTL_PSP | 0xF << 4 | 0x3F << 12
        assert dev.reg(0x410) == 0x00702008
        txdctl, rxdctl = dev.reg(0xE028), dev.reg(0xC028)
        assert txdctl & 0x1F1F1F == 8 | 1 << 8 and txdctl & r.TXDCTL_ENABLE  # WTHRESH 0
        assert rxdctl & 0x1F1F1F == 8 | 8 << 8 | 1 << 16 and rxdctl & r.RXDCTL_ENABLE
        assert dev.reg(0xC018) == 63 and dev.reg(0xE018) == dev.reg(0xE010) == 0
        assert dev.reg(CTRL) & (r.CTRL_SLU | r.CTRL_LRST) == r.CTRL_SLU
        assert dev.bus_master and dev.violations == []
    assert not dev.bus_master and dev.reg(RCTL) & r.RCTL_EN == 0


def test_queue_zero_enabled_after_reset_is_disabled_before_its_ring_is_programmed(card):
    dev, _, _ = card
    with IgbPort(dev, config(rx_queues=2, tx_queues=2)):
        assert dev.violations == []
        assert dev.reg(0xC000) and dev.reg(0xC040)  # both rings programmed


def test_link_that_never_comes_up_is_reported_down_not_fatal(card):
    dev, _, _ = card
    dev.cable = False
    start = time.monotonic()
    with IgbPort(dev, config(link_timeout=0.2)) as port:
        assert 0.2 <= time.monotonic() - start < 1.0
        assert port.link() == (False, 0) and not port.wait_for_link(0.05)
        dev.cable = True
        assert port.wait_for_link(1.0)


def test_phy_that_does_not_answer_fails_init_with_a_clear_error_and_no_leak(card):
    dev, _, mapper = card
    dev.phy_address = 2
    with pytest.raises(DeviceError, match="MDIC read of PHY 1 register 0 failed"):
        IgbPort(dev, config())
    assert mapper.maps == {} and not dev.bus_master


def test_removed_device_fails_init_at_once_without_leaking(card):
    dev, _, mapper = card
    dev.surprise_remove()
    start = time.monotonic()
    with pytest.raises(DeviceRemovedError, match="0xFFFFFFFF"):
        IgbPort(dev, config())
    assert time.monotonic() - start < 0.5 and mapper.maps == {} and not dev.bus_master


def test_rss_programs_the_82576_enable_value_key_and_byte_reta(card):
    dev, _, _ = card
    with IgbPort(dev, config(rx_queues=4, pool_size=128)):
        assert dev.reg(0x5818) & r.MRQC_ENABLE_MASK == r.MRQC_ENABLE_RSS
        assert dev.reg(0x5818) & r.MRQC_IPV4_TCP and dev.reg(0x5818) & r.MRQC_IPV6_UDP
        assert dev.reg(RXCSUM) == r.RXCSUM_PCSD  # QEMU hashes only with PCSD
        assert dev.reg(0x5C00) == 0x03020100 and dev.reg(0x5C7C) == 0x03020100
        key = b"".join(dev.reg(0x5C80 + 4 * i).to_bytes(4, "little") for i in range(10))
        assert key == INTEL_DEFAULT_KEY


def forward(sender: IgbPort, receiver: IgbPort, frames: list[bytes]) -> list[bytes]:
    packets = sender.rx_queues[0].pool.alloc(len(frames))
    for packet, frame in zip(packets, frames, strict=True):
        write_packet(packet, frame)
    assert sender.tx_queues[0].tx_batch(packets) == len(frames)
    sender.dev.transmit()
    sender.tx_queues[0].reclaim()  # sent buffers back to the sender's pool, 32 at a time
    got = []
    for _ in range(10):
        batch = receiver.rx_queues[0].rx_batch(64)
        got += [packet_data(p) for p in batch]
        free_packets(batch)
    return got


def test_frames_cross_both_ways_through_the_data_path_and_the_counters_agree(card):
    a_dev, b_dev, _ = card
    with IgbPort(a_dev, config()) as a, IgbPort(b_dev, config()) as b:
        there = [udp_frame(b.mac, a.mac, seq) for seq in range(40)]
        back = [udp_frame(a.mac, b.mac, seq) for seq in range(40, 80)]
        assert forward(a, b, there) == there
        assert forward(b, a, back) == back
        sa, sb = a.stats(), b.stats()
        assert sa["tx_packets"] == sb["rx_packets"] == sa["tx_good_packets"] == 40
        assert sb["rx_good_packets"] == 40 and sb["rx_good_bytes"] == 40 * (len(there[0]) + 4)
        assert sb["rx_bytes"] == 40 * len(there[0])
        assert a.queue_stats() == {
            "rx_packets": [40], "rx_bytes": [40 * len(back[0])], "rx_no_descriptor": [0],
            "tx_packets": [40], "tx_bytes": [40 * len(there[0])],
        }  # fmt: skip
        assert a.stats()["rx_good_packets"] == 40  # accumulated, not counted twice


def test_bad_udp_checksums_are_not_taken_for_mac_errors(card):
    """On the 82576 write-back bit 29 is L4E (a bad TCP/UDP checksum), on the 82599 it is
    RXE. The RX queues of an igb port drop on the 82576's RXE (bit 31) only, so a frame
    with a bad checksum reaches software, whether or not checksum offload marks it."""
    a_dev, b_dev, _ = card
    with IgbPort(a_dev, config()) as a, IgbPort(b_dev, config()) as b:
        bad = [udp_frame(b.mac, a.mac, seq, good_checksum=False) for seq in range(8)]
        assert forward(a, b, bad) == bad
        b_dev._bar[RXCSUM // 4] = r.RXCSUM_TUOFL  # offload on: the fake now sets L4E
        assert forward(a, b, bad) == bad
        assert b.rx_queues[0].stats["drop_errors"] == 0


def test_promisc_off_filters_foreign_unicast_and_filters_change_only_with_rx_off(card):
    a_dev, b_dev, _ = card
    with IgbPort(a_dev, config()) as a, IgbPort(b_dev, config(promisc=False)) as b:
        foreign = [udp_frame(FOREIGN_MAC, a.mac, seq) for seq in range(4)]
        assert forward(a, b, foreign) == []
        b.set_promisc(True)
        assert forward(a, b, foreign) == foreign
        b.set_promisc(False)
        assert forward(a, b, [udp_frame(BROADCAST, a.mac, 9)])  # broadcast still accepted
        assert b_dev.violations == []
        assert b_dev.rctl_writes[-1] == r.RCTL_EN | r.RCTL_BAM | r.RCTL_SECRC


def test_removal_while_running_raises_and_shutdown_still_frees_everything(card):
    dev, _, mapper = card
    port = IgbPort(dev, config())
    dev.surprise_remove()
    with pytest.raises(DeviceRemovedError):
        port.stats()
    with pytest.raises(DeviceRemovedError):
        port.link()
    start = time.monotonic()
    port.shutdown()
    assert time.monotonic() - start < 0.5
    assert mapper.maps == {} and not dev.bus_master


def test_shutdown_is_idempotent_and_a_shut_port_refuses_work(card):
    dev, _, mapper = card
    port = IgbPort(dev, config())
    port.shutdown()
    port.shutdown()
    assert mapper.maps == {}
    with pytest.raises(DeviceError, match="shut down"):
        port.stats()
    assert "shut down" in repr(port)


def test_64_bit_counters_are_read_low_then_high_because_the_high_read_clears_both(card):
    dev, _, _ = card
    regs = RegisterFile(dev, r.REGISTERS)
    dev._bar[0x4088 // 4], dev._bar[0x408C // 4] = 0xFFFFFFF0, 0x1
    assert regs.GORC.accumulate() == 0x1_FFFFFFF0
    assert dev.reg(0x4088) == dev.reg(0x408C) == 0
    assert regs.GORC.accumulate() == 0x1_FFFFFFF0  # nothing counted twice
