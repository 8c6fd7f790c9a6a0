"""The ixgbe driver against the 82599 model: bring-up, link, filters, RSS, statistics,
removal and shutdown. Every test uses small rings and pools and takes well under a second
or two; the model runs in step mode (packets move only in nic.step()) or in thread mode
(like hardware, on its own)."""

from __future__ import annotations

import struct
import time

import pytest

from ixyd.device import PciIds
from ixyd.drivers import ixgbe_registers as r
from ixyd.drivers.config import PortConfig
from ixyd.drivers.ixgbe import IxgbePort, identify
from ixyd.drivers.registers import Mode, Register, RegisterFile
from ixyd.drivers.rings import free_packets, packet_data, write_packet
from ixyd.errors import (
    ConfigError,
    DeviceError,
    DeviceRemovedError,
    DeviceTimeoutError,
    UnsupportedDeviceError,
)
from ixyd.model.nic import ModelNic
from ixyd.toeplitz import INTEL_DEFAULT_KEY, reta_queue, rss_input_ipv4, toeplitz_hash

SMALL = {"rx_ring": 64, "tx_ring": 64, "pool_size": 128, "link_timeout": 2.0}
# Offsets of the generator's frame fields (ixyd/model/engine.c traffic_build).
FLOW_AT, SEQ_AT = 48, 52
FOREIGN_MAC = bytes.fromhex("020000abcdef")


def config(**overrides) -> PortConfig:
    return PortConfig(**{**SMALL, **overrides})


@pytest.fixture(params=["step", "thread"])
def nic(request):
    card = ModelNic(2, mode=request.param)
    yield card
    card.close()


@pytest.fixture
def step_nic():
    card = ModelNic(2, mode="step")
    yield card
    card.close()


def pump(nic: ModelNic) -> None:
    """Let the model move packets: one engine step, or a moment for its thread."""
    if nic.mode == "step":
        nic.step()
    else:
        time.sleep(0.0005)


def receive(
    nic: ModelNic, port: IxgbePort, count: int, timeout: float = 2.0
) -> list[tuple[int, bytes, int]]:
    """Receive `count` frames from all RX queues: (queue, frame, rss_hash) each."""
    got: list[tuple[int, bytes, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        pump(nic)
        for rxq in port.rx_queues:
            packets = rxq.rx_batch(32)
            got += [(rxq.index, packet_data(p), p.rss_hash) for p in packets]
            free_packets(packets)
    return got


def frame_to(dst: bytes, src: bytes, payload: bytes = b"") -> bytes:
    return dst + src + b"\x08\x00" + payload.ljust(46, b"\0")


# ---------------------------------------------------------------------------------- bring-up
def test_init_brings_link_up_at_10g_without_protocol_violations(nic):
    nic.attach_traffic(nic.ports[0])
    port = IxgbePort(nic.ports[0], config())
    try:
        assert port.link() == (True, 10000)
        assert port.mac == nic.ports[0].mac
        assert nic.ports[0].violations == []
        assert nic.fault_count == 0
        assert nic.ports[0].bus_master
    finally:
        port.shutdown()


def test_init_programs_the_ixy_rs_29_corrections_and_safe_thresholds(step_nic):
    dev = step_nic.ports[0]
    port = IxgbePort(dev, config(link_timeout=0))
    try:
        assert dev.read32(0x08100) == 0xFFF  # DTXMXSZRQ: bits 15:12 reserved
        rdrxctl = dev.read32(0x02F00)
        assert rdrxctl & r.RDRXCTL_RSCFRSTSIZE == 0
        assert rdrxctl & (r.RDRXCTL_RSCACKC | r.RDRXCTL_FCOE_WRFIX | r.RDRXCTL_CRCSTRIP) == (
            r.RDRXCTL_RSCACKC | r.RDRXCTL_FCOE_WRFIX | r.RDRXCTL_CRCSTRIP
        )
        srrctl = dev.read32(0x02100)
        assert srrctl & 0x1F == 2 and srrctl & r.SRRCTL_DROP_EN
        txdctl = dev.read32(0x06028)
        assert (txdctl & 0x7F, txdctl >> 8 & 0x7F, txdctl >> 16 & 0x7F) == (32, 1, 0)
        assert dev.read32(0x02200) & (1 << 12) == 0  # DCA_RXCTRL reserved bit
        assert dev.read32(0x03000) & r.RXCTRL_RXEN
        assert dev.read32(0x01018) == 63  # RDT: all descriptors but one to the device
    finally:
        port.shutdown()


@pytest.mark.parametrize(
    "device_id",
    [
        0x10F7,
        0x10F8,
        0x10F9,
        0x10FB,
        0x10FC,
        0x1507,
        0x1514,
        0x1517,
        0x151C,
        0x1529,
        0x152A,
        0x154D,
        0x154A,
        0x1557,
        0x1558,
    ],
)
def test_every_82599_and_x520_device_id_is_supported(device_id):
    assert identify(PciIds(0x8086, device_id)).family == r.FAMILY_82599


def test_unknown_device_id_is_rejected_before_touching_the_device():
    with ModelNic(1, mode="step", device_id=0x1234) as card:
        with pytest.raises(UnsupportedDeviceError, match="unknown device ID 0x1234"):
            IxgbePort(card.ports[0], config())
        assert card.ports[0].violations == [] and not card.ports[0].bus_master


def test_virtual_function_is_rejected_as_not_supported():
    with (
        ModelNic(1, mode="step", device_id=0x10ED) as card,
        pytest.raises(UnsupportedDeviceError, match="virtual function"),
    ):
        IxgbePort(card.ports[0], config())


@pytest.mark.parametrize(
    "device_id, family", [(0x1528, "X540"), (0x1563, "X550"), (0x15AD, "X550EM_x")]
)
def test_x540_and_x550_are_named_but_refused(device_id, family):
    with pytest.raises(UnsupportedDeviceError, match=f"{family} family"):
        identify(PciIds(0x8086, device_id))


def test_removed_device_fails_init_at_once_without_leaking(step_nic):
    dev = step_nic.ports[0]
    dev.surprise_remove()
    start = time.monotonic()
    with pytest.raises(DeviceRemovedError, match="all-ones|0xFFFFFFFF"):
        IxgbePort(dev, config())
    assert time.monotonic() - start < 0.5
    assert step_nic.mapping_count == 0 and not dev.bus_master


@pytest.mark.parametrize(
    "bad",
    [
        {"rx_ring": 100},
        {"tx_ring": 32},
        {"rx_ring": 8192},
        {"rx_queues": 0},
        {"rx_queues": 17},
        {"tx_queues": 2.5},
        {"pool_size": 64},
        {"rss_key": b"short"},
        {"link_timeout": -1},
        {"promisc": "yes"},
        {"rx_ring": True},
    ],
)
def test_bad_config_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        config(**bad)


def test_default_config_follows_ixy_sizes():
    cfg = PortConfig()
    assert (cfg.rx_ring, cfg.tx_ring, cfg.buffers_per_rx_queue) == (512, 512, 4096)
    assert cfg.promisc and cfg.drop_en and not cfg.rss_enabled
    assert PortConfig(rx_queues=4).rss_enabled


# ---------------------------------------------------------------------------------- link
def test_port_without_cable_inits_link_down_and_works_once_connected(nic):
    a_dev, b_dev = nic.ports
    a = IxgbePort(a_dev, config(link_timeout=0.05))
    b = IxgbePort(b_dev, config(link_timeout=0.05))
    try:
        assert a.link() == (False, 0) and b.link() == (False, 0)
        nic.connect(a_dev, b_dev)
        assert a.wait_for_link(2.0) and b.wait_for_link(2.0)
        frames = [frame_to(b.mac, a.mac, bytes([i]) * 10) for i in range(20)]
        packets = a.rx_queues[0].pool.alloc(len(frames))
        for packet, frame in zip(packets, frames, strict=True):
            write_packet(packet, frame)
        assert a.tx_queues[0].tx_batch(packets) == len(frames)
        assert [f for _, f, _ in receive(nic, b, len(frames))] == frames
        assert a_dev.violations == [] and b_dev.violations == []
    finally:
        a.shutdown()
        b.shutdown()


# ---------------------------------------------------------------------------------- filters
def test_promisc_decides_whether_foreign_unicast_is_received(step_nic):
    dev = step_nic.ports[0]
    generator = step_nic.attach_traffic(dev)
    port = IxgbePort(dev, config(promisc=False))
    try:
        generator.configure(dst_mac=FOREIGN_MAC, count=40).start()
        assert receive(step_nic, port, 40, timeout=0.3) == []
        assert dev.counters["rx_filtered"] == 40

        port.set_promisc(True)
        generator.configure(dst_mac=FOREIGN_MAC, count=80).start()  # 40 more
        assert len(receive(step_nic, port, 40)) == 40
        assert dev.counters["rx_filtered"] == 40

        port.set_promisc(False)
        generator.configure(dst_mac=FOREIGN_MAC, count=120).start()
        assert receive(step_nic, port, 40, timeout=0.3) == []
        assert dev.counters["rx_filtered"] == 80
        assert dev.violations == []  # FCTRL only ever written with RXEN = 0
    finally:
        port.shutdown()


# ---------------------------------------------------------------------------------- statistics
def test_stats_equal_what_the_model_counted(step_nic):
    dev = step_nic.ports[0]
    generator = step_nic.attach_traffic(dev)
    port = IxgbePort(dev, config())
    try:
        # 200 frames while nobody drains the 64-descriptor ring: 63 land, the rest are
        # dropped for lack of descriptors (DROP_EN) and counted in QPRDC.
        generator.configure(count=200, size=128).start()
        for _ in range(10):
            step_nic.step()
        first = port.stats()
        received = receive(step_nic, port, 63)
        generator.configure(count=300, size=128).start()  # 100 more, drained as they come
        received += receive(step_nic, port, 100)
        packets = port.rx_queues[0].pool.alloc(50)
        for packet in packets:
            write_packet(packet, frame_to(b"\x02\x00\x00\x00\x00\x01", port.mac, b"x" * 70))
        assert port.tx_queues[0].tx_batch(packets) == 50
        for _ in range(5):
            step_nic.step()

        stats, truth = port.stats(), dev.counters
        assert stats["rx_packets"] == truth["rx_delivered"] == len(received) == 163
        assert stats["rx_bytes"] == truth["rx_delivered_bytes"] == 163 * 128
        assert stats["rx_no_descriptor"] == truth["rx_no_descriptor"] == 137
        assert stats["rx_good_packets"] == truth["rx_accepted"] == 300
        assert stats["rx_missed"] == truth["rx_missed"]
        assert stats["tx_packets"] == truth["tx_frames"] == 50
        assert stats["tx_bytes"] == truth["tx_bytes"] == 50 * 84
        assert stats["tx_good_bytes"] == 50 * (84 + 4)  # the MAC counts the FCS
        assert first["rx_no_descriptor"] > 0  # totals accumulate across reads ...
        assert port.stats() == stats  # ... and nothing is counted twice
        assert port.queue_stats()["rx_packets"] == [163]
    finally:
        port.shutdown()


# ---------------------------------------------------------------------------------- RSS
def test_rss_steers_each_flow_to_the_queue_its_toeplitz_hash_selects(nic):
    dev = nic.ports[0]
    generator = nic.attach_traffic(dev)
    port = IxgbePort(dev, config(rx_queues=4, rx_ring=256, pool_size=320))
    reta = [entry % 4 for entry in range(128)]  # round-robin over the four queues
    try:
        generator.configure(flows=64, count=256, rate=20_000).start()
        got = receive(nic, port, 256)
        # A receiver descheduled for long (thread mode on a loaded host) may let a ring
        # overflow; those frames are counted, and everything received must be steered right.
        assert len(got) + port.stats()["rx_no_descriptor"] == 256 and len(got) >= 192
        for queue, frame, rss_hash in got:
            flow = struct.unpack_from("<H", frame, FLOW_AT)[0]
            seq = struct.unpack_from("<Q", frame, SEQ_AT)[0]
            assert frame == generator.frame(flow, seq)
            src, dst = ".".join(map(str, frame[26:30])), ".".join(map(str, frame[30:34]))
            sport, dport = struct.unpack_from(">HH", frame, 34)
            expected = toeplitz_hash(INTEL_DEFAULT_KEY, rss_input_ipv4(src, dst, sport, dport))
            assert rss_hash == expected
            assert queue == reta_queue(expected, reta)
        assert {queue for queue, _, _ in got} == {0, 1, 2, 3}
        assert sum(port.queue_stats()["rx_packets"]) == len(got)
        assert dev.violations == []
    finally:
        port.shutdown()


# ---------------------------------------------------------------------------------- removal
def test_removal_during_traffic_raises_device_removed_and_shutdown_still_cleans_up():
    with ModelNic(1, mode="thread") as card:
        dev = card.ports[0]
        generator = card.attach_traffic(dev)
        port = IxgbePort(dev, config())
        generator.configure(rate=200_000).start()
        assert receive(card, port, 50)
        dev.surprise_remove()
        start = time.monotonic()
        with pytest.raises(DeviceRemovedError):
            port.stats()
        with pytest.raises(DeviceRemovedError):
            port.link()
        with pytest.raises(DeviceRemovedError):
            port.check_removed()
        port.rx_queues[0].rx_batch(32)  # the data path keeps running on host memory
        port.shutdown()
        assert time.monotonic() - start < 1.0
        assert card.mapping_count == 0 and not dev.bus_master


# ---------------------------------------------------------------------------------- shutdown
def test_shutdown_stops_dma_and_frees_every_mapping(nic):
    nic.attach_traffic(nic.ports[0])
    ports = [IxgbePort(dev, config(link_timeout=0.05)) for dev in nic.ports]
    assert nic.mapping_count > 0
    for port in ports:
        port.shutdown()
        port.shutdown()  # idempotent
    assert nic.mapping_count == 0
    assert not any(dev.bus_master for dev in nic.ports)
    assert all(dev.violations == [] for dev in nic.ports)
    with pytest.raises(DeviceError, match="shut down"):
        ports[0].stats()


def test_pool_outlives_its_port_while_another_ports_tx_ring_holds_its_buffers(step_nic):
    a_dev, b_dev = step_nic.ports
    generator = step_nic.attach_traffic(a_dev)
    a = IxgbePort(a_dev, config())
    b = IxgbePort(b_dev, config(link_timeout=0))  # no cable: what b queues never leaves
    generator.configure(count=40).start()
    for _ in range(4):
        step_nic.step()
    received = a.rx_queues[0].rx_batch(64)
    assert len(received) == 40
    assert b.tx_queues[0].tx_batch(received) == 40  # a forwarder's a -> b step
    pool = a.rx_queues[0].pool

    a.shutdown()  # b's TX ring still holds 40 of a's buffers: the pool's memory stays
    assert not pool.released
    b.shutdown()  # returns a's buffers, then a's pool goes too
    assert pool.released
    assert step_nic.mapping_count == 0 and step_nic.fault_count == 0


# ---------------------------------------------------------------------------------- registers
def test_wait_on_a_removed_device_raises_instead_of_succeeding_on_all_ones(step_nic):
    dev = step_nic.ports[0]
    regs = RegisterFile(dev, r.REGISTERS)
    dev.surprise_remove()
    # ixy's wait_set_reg32 would return at once here: 0xFFFFFFFF has every bit set
    with pytest.raises(DeviceRemovedError, match="EEC and STATUS read 0xFFFFFFFF"):
        regs.EEC.wait_set(r.EEC_ARD, timeout=1.0)
    with pytest.raises(DeviceRemovedError):  # remembered: no further device access needed
        regs.CTRL.wait_clear(r.CTRL_RST, timeout=1.0)


def test_wait_timeout_names_register_bits_and_last_value(step_nic):
    regs = RegisterFile(step_nic.ports[0], r.REGISTERS)
    with pytest.raises(
        DeviceTimeoutError, match=r"LINKS \(0x042a4\).*0x40000000.*last value 0x00000000"
    ):
        regs.LINKS.wait_set(r.LINKS_UP, timeout=0.02)


def test_register_modes_are_enforced_and_counters_accumulate_to_64_bits(step_nic):
    dev = step_nic.ports[0]
    regs = RegisterFile(dev, r.REGISTERS)
    with pytest.raises(TypeError, match="write-only"):
        regs.EIMC.read()
    with pytest.raises(TypeError, match="cannot be written"):
        regs.GPRC.write(0)
    assert regs.SRRCTL[3].offset == 0x0210C and regs.SRRCTL[16].offset == 0x01414
    assert regs.RDBAL[64].offset == 0x0D000 and regs.RAL[16].offset == 0x0A280
    counter = Register("PAIR", 0x100, Mode.RC64, "a test pair")
    table = RegisterFile(_FixedReads(dev, {0x100: 0xFFFFFFFF, 0x104: 0x2}), [*r.REGISTERS, counter])
    assert table.PAIR.accumulate() == 0x2_FFFFFFFF  # all-ones low half, STATUS fine: a value
    assert table.PAIR.accumulate() == 2 * 0x2_FFFFFFFF


class _FixedReads:
    """A device whose listed offsets read fixed values; everything else goes to `dev`."""

    def __init__(self, dev, values: dict[int, int]):
        self._dev, self._values = dev, values
        self.address = dev.address

    def read32(self, offset: int) -> int:
        return self._values[offset] if offset in self._values else self._dev.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        self._dev.write32(offset, value)
