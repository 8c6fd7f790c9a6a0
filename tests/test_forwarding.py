"""Two model ports forwarding through the ixgbe driver and the native data path."""

import time

import pytest
from hosttools import wait_until
from ixyd._datapath import ffi, lib

from ixyd.drivers.config import PortConfig
from ixyd.drivers.ixgbe import IxgbePort
from ixyd.errors import ConfigError, DeviceRemovedError
from ixyd.forward import ForwardWorker
from ixyd.model import ModelNic

FAST = dict(reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.005)


class Bed:
    """Two model ports, each facing a traffic generator/checker (the MoonGen setup)."""

    def __init__(self, mode, config, **nic_kwargs):
        self.nic = ModelNic(2, mode=mode, **FAST, **nic_kwargs)
        self.traffic = [self.nic.attach_traffic(p) for p in self.nic.ports]
        self.ports = [IxgbePort(p, config) for p in self.nic.ports]

    def close(self):
        for port in self.ports:
            port.shutdown()
        self.nic.close()


@pytest.fixture
def bed_factory():
    beds = []

    def make(mode="thread", config=None, **kwargs):
        bed = Bed(
            mode,
            config or PortConfig(rx_ring=256, tx_ring=256, pool_size=1024, link_timeout=2),
            **kwargs,
        )
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.close()


def test_bidirectional_forwarding_has_zero_loss_and_zero_faults(bed_factory):
    bed = bed_factory()
    a, b = bed.ports
    gen_a, gen_b = bed.traffic
    total = 50_000
    gen_a.configure(size=60, flows=16, count=total, window=192, stream=1)
    gen_b.configure(size=300, flows=16, count=total, window=192, stream=2)
    gen_a.pair(gen_b)  # A's frames are checked where B transmits
    gen_b.pair(gen_a)
    workers = [
        ForwardWorker(a.rx_queues[0], b.tx_queues[0], name="fwd-ab"),
        ForwardWorker(b.rx_queues[0], a.tx_queues[0], name="fwd-ba"),
    ]
    for w in workers:
        w.start()
    gen_a.start()
    gen_b.start()
    wait_until(
        lambda: gen_b.stats["unique"] == total and gen_a.stats["unique"] == total,
        what="all frames forwarded both ways",
    )
    for w in workers:
        w.stop()
    for checker, generator in ((gen_b, gen_a), (gen_a, gen_b)):
        s = checker.stats
        assert generator.stats["sent"] == total
        assert s["unique"] == total and s["duplicates"] == s["reordered"] == 0
        assert s["corrupt"] == s["foreign"] == s["gaps"] == 0
    assert bed.nic.fault_count == 0
    assert all(p.violations == [] for p in bed.nic.ports)
    assert workers[0].stats["packets"] == total and workers[1].stats["packets"] == total


def test_rings_wrap_around_hundreds_of_times(bed_factory):
    config = PortConfig(rx_ring=64, tx_ring=64, pool_size=256, link_timeout=2)
    bed = bed_factory(config=config)
    a, b = bed.ports
    gen_a, gen_b = bed.traffic
    total = 40_000  # 625 trips around a 64-descriptor ring
    # below capacity: the window plus up to 31 sent-but-unreclaimed descriptors (RS on every
    # 32nd) must fit the 63 usable TX descriptors
    gen_a.configure(count=total, window=24)
    gen_a.pair(gen_b)
    worker = ForwardWorker(a.rx_queues[0], b.tx_queues[0])
    worker.start()
    gen_a.start()
    wait_until(lambda: gen_b.stats["unique"] == total, what="40000 frames")
    worker.stop()
    s = gen_b.stats
    assert s["gaps"] == s["duplicates"] == s["corrupt"] == 0
    assert bed.nic.fault_count == 0
    assert (
        a.rx_queues[0].pool.free_count + 64 + b.tx_queues[0].in_flight == 256
    )  # every slot holds one; none lost


def test_forwarding_survives_pool_exhaustion(bed_factory):
    config = PortConfig(rx_ring=64, tx_ring=64, pool_size=96, link_timeout=2)
    bed = bed_factory(mode="step", config=config)
    a, b = bed.ports
    gen_a, gen_b = bed.traffic
    stats = ffi.new("struct ixyd_fwd_stats *")
    rxq, txq = a.rx_queues[0], b.tx_queues[0]
    bed.nic.unplug(bed.nic.ports[1])  # B's TX stalls: its ring keeps the buffers
    gen_a.configure(count=0, burst=32)
    gen_a.start()
    for _ in range(40):
        bed.nic.step()
        lib.ixyd_forward_iterations(rxq.pointer, txq.pointer, 32, 1, stats)
    assert rxq.stats["drop_no_buffer"] > 0  # pool empty: frames dropped, ring kept armed
    assert rxq.pool.free_count < 32
    gen_a.stop()
    gen_b = bed.nic.attach_traffic(bed.nic.ports[1])  # plug B in again
    wait_until(lambda: b.link()[0], what="B's link")
    gen_a.configure(count=gen_a.stats["sent"] + 500, burst=16)  # count is a lifetime total
    gen_a.pair(gen_b)
    gen_a.start()
    before = stats.packets
    for _ in range(200):
        bed.nic.step()
        lib.ixyd_forward_iterations(rxq.pointer, txq.pointer, 32, 1, stats)
    # traffic flows again; with only rx_ring + 32 buffers the pool refills 32 at a time, so
    # some frames still find it empty, but nothing stays stuck and no buffer is lost
    assert stats.packets - before >= 250
    assert gen_b.stats["unique"] == stats.packets  # incl. the frames held in TX while unplugged
    assert rxq.pool.free_count + 64 + txq.in_flight == 96
    assert gen_b.stats["corrupt"] == 0 and bed.nic.fault_count == 0


def test_removal_during_traffic_gives_a_clean_error_and_no_hang(bed_factory):
    bed = bed_factory()
    a, b = bed.ports
    gen_a, gen_b = bed.traffic
    gen_a.configure(count=0, rate=50_000)
    worker = ForwardWorker(a.rx_queues[0], b.tx_queues[0])
    worker.start()
    gen_a.start()
    wait_until(lambda: worker.stats["packets"] > 1000, what="traffic")
    bed.nic.ports[0].surprise_remove()
    started = time.monotonic()
    with pytest.raises(DeviceRemovedError):
        a.stats()
    with pytest.raises(DeviceRemovedError):
        a.link()
    worker.stop(timeout=2)
    a.shutdown()  # bounded even though every register reads all-ones
    assert time.monotonic() - started < 5
    b.stats()  # the other port carries on


def test_shutdown_leaves_no_mapping_and_bus_mastering_off(bed_factory):
    bed = bed_factory()
    a, b = bed.ports
    gen_a, gen_b = bed.traffic
    gen_a.configure(count=5000, window=100)
    gen_a.pair(gen_b)
    worker = ForwardWorker(a.rx_queues[0], b.tx_queues[0])
    worker.start()
    gen_a.start()
    wait_until(lambda: gen_b.stats["unique"] == 5000, what="traffic")
    worker.stop()
    assert bed.nic.mapping_count > 0
    for port in bed.ports:
        port.shutdown()
    assert bed.nic.mapping_count == 0
    assert not any(p.bus_master for p in bed.nic.ports)


def test_worker_rejects_a_cpu_that_does_not_exist(bed_factory):
    bed = bed_factory(mode="step")
    a, b = bed.ports
    with pytest.raises(ConfigError, match="CPU 4096"):
        ForwardWorker(a.rx_queues[0], b.tx_queues[0], cpu=4096)
    with pytest.raises(ConfigError, match="batch"):
        ForwardWorker(a.rx_queues[0], b.tx_queues[0], batch=0)


def test_frame_spanning_descriptors_is_dropped_and_counted(bed_factory):
    bed = bed_factory(mode="step")
    a, b = bed.ports
    gen_a, gen_b = bed.traffic
    # accept jumbo frames at the MAC while the rings keep 2 KB buffers: a 5000-byte frame
    # then spans three descriptors, which the data path does not reassemble
    dev = bed.nic.ports[0]
    dev.write32(0x4240, dev.read32(0x4240) | 0x4)  # HLREG0.JUMBOEN
    dev.write32(0x4268, 9018 << 16)  # MAXFRS
    stats = ffi.new("struct ixyd_fwd_stats *")
    rxq, txq = a.rx_queues[0], b.tx_queues[0]
    frame = gen_a.frame(0, 0)
    bed.nic.ports[0].receive(frame[:12] + b"\x88\xb5" + bytes(5000))
    gen_a.configure(count=100, burst=100)
    gen_a.pair(gen_b)
    gen_a.start()
    for _ in range(10):
        bed.nic.step()
        lib.ixyd_forward_iterations(rxq.pointer, txq.pointer, 32, 1, stats)
    assert rxq.stats["drop_multi_descriptor"] == 1
    assert stats.packets == 100 and gen_b.stats["unique"] == 100
