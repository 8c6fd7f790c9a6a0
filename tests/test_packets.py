"""The Python packet API (ixyd.packets) on two 82599 ports of the model in step mode."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ixyd.drivers.config import PortConfig
from ixyd.drivers.ixgbe import IxgbePort
from ixyd.drivers.rings import packet_data
from ixyd.model import ModelNic
from ixyd.packets import PacketBatch, allocate, receive, transmit

RING = 64  # the smallest ring: two TX clean-up batches
POOL = 256
CONFIG = PortConfig(rx_ring=RING, tx_ring=RING, pool_size=POOL, link_timeout=2.0)


def udp_like_frame(dst: bytes, seq: int, length: int = 60) -> bytes:
    """A frame whose bytes say which frame it is (the model does not parse it)."""
    body = seq.to_bytes(4, "little") + bytes((seq + k) & 0xFF for k in range(length - 18))
    return dst + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + body


@pytest.fixture
def nic():
    card = ModelNic(2, mode="step", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002)
    yield card
    card.close()


@pytest.fixture
def cabled(nic):
    """Ports A and B joined by a cable, both up."""
    a, b = nic.ports
    nic.connect(a, b)
    # A's link needs B's end set up too: do not let A's init wait for it
    ports = IxgbePort(a, replace(CONFIG, link_timeout=0)), IxgbePort(b, CONFIG)
    assert all(port.wait_for_link(2.0) for port in ports)
    yield ports
    nic.step(budget=RING)  # let queued frames leave, so shutdown need not wait for TX to drain
    for port in ports:
        port.shutdown()


def receive_all(nic, port: IxgbePort, expected: int) -> PacketBatch:
    nic.step(budget=RING)
    batch = receive(port.rx_queues[0], max_packets=RING)
    assert len(batch) == expected
    return batch


def test_received_frames_are_zero_copy_views_and_edits_are_transmitted(nic, cabled):
    A, B = cabled
    frames = [udp_like_frame(A.mac, seq) for seq in range(5)]
    for frame in frames:
        nic.ports[0].receive(frame)  # onto A's wire, towards A
    batch = receive_all(nic, A, 5)
    assert [bytes(view) for view in batch] == frames
    assert batch.lengths() == [60] * 5
    for view in batch:
        view[0:6] = B.mac  # re-address to B, in place
        view[20] ^= 0xFF
    assert packet_data(batch.packet(0))[0:6] == B.mac  # the view is the buffer itself
    assert transmit(A.tx_queues[0], batch) == 5 and len(batch) == 0
    received = receive_all(nic, B, 5)
    expected = [B.mac + f[6:20] + bytes([f[20] ^ 0xFF]) + f[21:] for f in frames]
    assert [bytes(view) for view in received] == expected
    received.free()
    assert nic.fault_count == 0


def test_allocated_batch_is_sent_as_one_burst(nic, cabled):
    A, B = cabled
    template = udp_like_frame(B.mac, 7, length=128)
    batch = allocate(A.rx_queues[0].pool, 20, template)
    assert len(batch) == 20 and all(bytes(view) == template for view in batch)
    batch.set_length(19, 64)
    assert len(batch[19]) == len(batch[-1]) == 64
    assert transmit(A.tx_queues[0], batch) == 20
    received = receive_all(nic, B, 20)
    assert received.lengths() == [128] * 19 + [64]
    assert bytes(received[0]) == template and bytes(received[19]) == template[:64]
    received.free()


def test_reflection_round_trip_has_no_loss_and_no_corruption(nic):
    port = nic.ports[0]
    endpoint = nic.attach_traffic(port)
    with IxgbePort(port, CONFIG) as reflector:
        endpoint.pair(endpoint)
        endpoint.configure(size=60, flows=8, count=3000, burst=32, window=RING // 2)
        endpoint.start()
        rxq, txq = reflector.rx_queues[0], reflector.tx_queues[0]
        for _ in range(400):
            nic.step()
            batch = receive(rxq)
            for frame in batch:  # swap the MAC addresses, as a reflector would
                frame[0:6], frame[6:12] = frame[6:12], frame[0:6]
            transmit(txq, batch)
        nic.step()
        stats = endpoint.stats
        assert stats["sent"] == stats["received"] == stats["valid"] == stats["unique"] == 3000
        assert stats["corrupt"] == stats["duplicates"] == stats["reordered"] == stats["gaps"] == 0
        assert txq.pointer.stats.drop_ring_full == 0 and nic.fault_count == 0


def test_free_and_transmit_return_exactly_the_buffers_taken(nic, cabled):
    A, B = cabled
    pool = A.rx_queues[0].pool
    idle = pool.free_count
    assert idle == POOL - RING  # the ring holds the rest
    batch = allocate(pool, 10, udp_like_frame(B.mac, 0))
    assert pool.free_count == idle - 10
    batch.free()
    assert pool.free_count == idle and len(batch) == 0

    for seq in range(7):
        nic.ports[0].receive(udp_like_frame(A.mac, seq))
    batch = receive_all(nic, A, 7)  # each frame's descriptor got a fresh buffer
    assert pool.free_count == idle - 7
    batch.free()
    assert pool.free_count == idle

    txq = A.tx_queues[0]
    assert transmit(txq, allocate(pool, 32, udp_like_frame(B.mac, 1))) == 32
    assert pool.free_count == idle - 32
    nic.step(budget=RING)  # sent; DD written on the 32nd descriptor
    transmit(txq, PacketBatch(pool))  # an empty batch still reclaims
    assert pool.free_count == idle and txq.in_flight == 0
    receive_all(nic, B, 32).free()


def test_transmit_frees_and_counts_what_a_full_ring_cannot_take(nic, cabled):
    A, B = cabled
    pool, txq = A.rx_queues[0].pool, A.tx_queues[0]
    idle = pool.free_count
    batch = allocate(pool, 100, udp_like_frame(B.mac, 0))
    assert transmit(txq, batch) == RING - 1  # TDT may not catch up with TDH
    assert txq.pointer.stats.drop_ring_full == 100 - (RING - 1)
    assert pool.free_count == idle - (RING - 1) and len(batch) == 0


def test_allocate_is_all_or_nothing(nic, cabled):
    A, _ = cabled
    pool = A.rx_queues[0].pool
    idle = pool.free_count
    batch = allocate(pool, idle + 1, b"\x00" * 60)
    assert len(batch) == 0 and pool.free_count == idle
    with pytest.raises(ValueError, match="does not fit"):
        allocate(pool, 1, bytes(2049))


def test_receive_reuses_its_batch_only_once_it_is_empty(nic, cabled):
    A, B = cabled
    rxq, txq = A.rx_queues[0], A.tx_queues[0]
    for seq in range(4):
        nic.ports[0].receive(udp_like_frame(A.mac, seq))
    nic.step()
    first = receive(rxq, max_packets=2)
    second = receive(rxq, max_packets=2)  # first still holds packets: a new batch
    assert second is not first
    assert [view[14] for view in first] + [view[14] for view in second] == [0, 1, 2, 3]
    transmit(txq, first)
    second.free()
    assert receive(rxq) in (first, second)  # an empty batch is refilled
    receive_all(nic, B, 2).free()


def test_batch_indexing_follows_sequence_rules(nic, cabled):
    A, B = cabled
    batch = allocate(A.rx_queues[0].pool, 3, udp_like_frame(B.mac, 9))
    assert bytes(batch[-1]) == bytes(batch[2])
    with pytest.raises(IndexError):
        batch[3]
    with pytest.raises(IndexError):
        batch.packet(-4)
    assert batch.packet(-1).len == 60
    batch.free()


def test_a_released_view_is_replaced_by_a_fresh_one(nic, cabled):
    A, B = cabled
    pool = A.rx_queues[0].pool
    batch = allocate(pool, 2, udp_like_frame(B.mac, 3))
    with batch[0] as view:  # leaving `with` releases the memoryview
        view[20] = 0xAB
    batch.free()
    batch = allocate(pool, 2, udp_like_frame(B.mac, 4))  # the same two buffers again
    assert [bytes(view) for view in batch] == [udp_like_frame(B.mac, 4)] * 2
    batch.free()


def test_a_batch_rejects_a_buffer_of_another_pool(nic, cabled):
    A, B = cabled
    foreign = allocate(B.rx_queues[0].pool, 1, udp_like_frame(A.mac, 6))
    batch = PacketBatch(A.rx_queues[0].pool)
    batch.pointers[0], batch.count = foreign.pointers[0], 1  # as native code might fill it
    foreign.count = 0  # the buffer now belongs to `batch`
    with pytest.raises(ValueError, match="not a buffer of this batch's pool"):
        batch[0]
    batch.free()  # a buffer goes back to its own pool
    assert B.rx_queues[0].pool.free_count == POOL - RING
