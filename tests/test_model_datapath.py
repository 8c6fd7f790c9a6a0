"""The 82599 model's packet engine: TX ring -> cable -> RX filters -> RX ring, per the datasheet."""

import struct
import time
import zlib

import pytest
from ringdriver import DD, EOP, TX_CMD, RingPort, rx, tx, wait_for

from ixyd.model import ModelNic
from ixyd.toeplitz import INTEL_DEFAULT_KEY, key_to_rssrk, rss_input_ipv4, toeplitz_hash

HLREG0, MAXFRS, FCTRL, RXCTRL, MRQC, RXCSUM = 0x4240, 0x4268, 0x5080, 0x3000, 0x5818, 0x5000
QPRDC0, MPC0, ROC, RUC = 0x1430, 0x3FA0, 0x40AC, 0x40A4


def udp_frame(
    dst: bytes,
    src_ip: str = "10.1.2.3",
    dst_ip: str = "10.9.8.7",
    sport: int = 1000,
    dport: int = 2000,
    payload: bytes = b"ixyd" * 10,
) -> bytes:
    ip_len = 20 + 8 + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        ip_len,
        0,
        0,
        64,
        17,
        0,
        bytes(int(x) for x in src_ip.split(".")),
        bytes(int(x) for x in dst_ip.split(".")),
    )
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return dst + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + ip + udp + payload


@pytest.fixture
def nic():
    card = ModelNic(2, mode="step", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002)
    yield card
    card.close()


def cable(nic, **kwargs):
    a, b = nic.ports
    nic.connect(a, b)
    A, B = RingPort(a, **kwargs), RingPort(b, **kwargs)
    wait_for(lambda: a.link_up and b.link_up, what="link up")
    return A, B


def test_frame_arrives_bit_exact_with_a_correct_write_back(nic):
    A, B = cable(nic)
    frame = udp_frame(B.dev.mac, payload=bytes(range(256)))
    index = A.send(frame)
    assert not A.tx_done(index)  # nothing moves until the engine runs
    nic.step()
    assert A.tx_done(index) and A.dev.read32(tx(0, 0x10)) == 1  # DD written back, TDH advanced
    data, wb = B.poll()
    assert data == frame
    assert wb["status"] == DD | EOP and wb["length"] == len(frame)
    assert wb["lo"] == 0x10 | 0x200  # packet type IPv4 + UDP, no RSS type without MRQC
    assert B.dev.read32(rx(0, 0x10)) == 1  # RDH advanced
    assert nic.fault_count == 0


def test_rings_wrap_around_many_times_in_order(nic):
    A, B = cable(nic, rx_size=64, tx_size=64)
    sent = received = 0
    while received < 64 * 20:
        while sent - received < 40 and sent < 64 * 20:
            A.send(udp_frame(B.dev.mac, payload=sent.to_bytes(4, "little") * 8))
            sent += 1
        nic.step()
        while (got := B.poll()) is not None:
            data, wb = got
            assert data[42:46] == received.to_bytes(4, "little")
            assert wb["index"] == received % 64
            received += 1
    assert B.dev.counters["rx_delivered"] == 64 * 20 and nic.fault_count == 0


def test_full_ring_with_drop_en_counts_qprdc_drops(nic):
    A, B = cable(nic, rx_size=64, tx_size=128, drop_en=True)
    for _ in range(80):
        A.send(udp_frame(B.dev.mac))
    nic.step(budget=128)
    # RDT = RDH means no free descriptor: the ring holds size - 1 frames
    assert B.dev.counters["rx_delivered"] == 63
    assert B.dev.read32(QPRDC0) == 17 and B.dev.counters["rx_no_descriptor"] == 17
    assert B.dev.read32(MPC0) == 0
    assert sum(1 for _ in iter(B.poll, None)) == 63


def test_full_ring_without_drop_en_buffers_then_counts_missed(nic):
    A, B = cable(nic, rx_size=64, tx_size=128, drop_en=False)
    B.dev.write32(RXCTRL, 0)
    B.dev.write32(0x3C00, 8 << 10)  # RXPBSIZE0 = 8 KB: room for 40 frames of 200 bytes
    B.dev.write32(RXCTRL, 1)
    for _ in range(127):
        A.send(udp_frame(B.dev.mac, payload=bytes(158)))  # 200-byte frames
    nic.step(budget=128)
    counters = B.dev.counters
    assert counters["rx_delivered"] == 63 and counters["rx_buffered"] == 8192 // 200
    assert counters["rx_missed"] == 127 - 63 - 8192 // 200 == B.dev.read32(MPC0)
    assert counters["rx_no_descriptor"] == 0
    received = 0
    while received < 63 + 8192 // 200:  # the buffered frames follow once descriptors come back
        received += sum(1 for _ in iter(B.poll, None))
        nic.step()
    assert B.dev.counters["rx_buffered"] == 0


def test_crc_stays_in_the_buffer_unless_stripped(nic):
    A, B = cable(nic, strip_crc=False)
    frame = udp_frame(B.dev.mac)
    A.send(frame)
    nic.step()
    data, wb = B.poll()
    assert wb["length"] == len(frame) + 4
    assert data == frame + struct.pack("<I", zlib.crc32(frame))


def test_jumbo_frame_spans_descriptors_with_eop_on_the_last(nic):
    A, B = cable(nic)
    for dev in (A.dev, B.dev):
        dev.write32(HLREG0, dev.read32(HLREG0) | 0x4)  # JUMBOEN
        dev.write32(MAXFRS, 9018 << 16)
    frame = udp_frame(B.dev.mac, payload=bytes(i & 0xFF for i in range(5000)))
    buf = A.tx_bufs[0]
    chunks = [frame[:1500], frame[1500:3000], frame[3000:]]
    for k, chunk in enumerate(chunks):  # gather: three data descriptors, EOP on the last
        b = A.tx_bufs[k]
        b.view()[: len(chunk)] = chunk
        cmd = (TX_CMD & ~0x01000000 if k < 2 else TX_CMD) | len(chunk)
        struct.pack_into("<QII", A.tx_ring.view(), 16 * k, b.iova, cmd, len(frame) << 14)
    assert buf
    A.tx_tail = 3
    A.dev.write32(tx(0, 0x18), 3)
    nic.step()
    parts = [B.poll() for _ in range(3)]
    assert [wb["length"] for _, wb in parts] == [2048, 2048, len(frame) - 4096]
    assert [wb["status"] & EOP for _, wb in parts] == [0, 0, EOP]
    assert b"".join(data for data, _ in parts) == frame


def test_oversize_and_runt_frames_are_counted_not_delivered(nic):
    A, B = cable(nic)
    B.dev.receive(udp_frame(B.dev.mac, payload=bytes(1600)))  # > 1518 with FCS, no JUMBOEN
    B.dev.receive(B.dev.mac + bytes(40))  # 46 bytes: a runt
    assert B.dev.read32(ROC) == 1 and B.dev.read32(RUC) == 1
    assert B.poll() is None and B.dev.counters["rx_size_errors"] == 2


def test_short_frames_are_padded_to_60_bytes_with_txpaden(nic):
    A, B = cable(nic)
    short = B.dev.mac + bytes(6) + b"\x88\xb5" + b"hi"
    A.send(short)
    nic.step()
    data, wb = B.poll()
    assert wb["length"] == 60 and data == short + bytes(60 - len(short))


@pytest.mark.parametrize(
    "fctrl,accepted",
    [
        (0, {"own"}),
        (0x400, {"own", "broadcast"}),
        (0x100, {"own", "multicast"}),
        (0x200, {"own", "foreign"}),
        (0x700, {"own", "broadcast", "multicast", "foreign"}),
    ],
)
def test_l2_filters_follow_fctrl(nic, fctrl, accepted):
    a, b = nic.ports
    nic.connect(a, b)
    B = RingPort(b, fctrl=fctrl)
    RingPort(a)
    wait_for(lambda: b.link_up, what="link up")
    frames = {
        "own": b.mac,
        "broadcast": b"\xff" * 6,
        "multicast": b"\x01\x00\x5e\x00\x00\x01",
        "foreign": b"\x02\x11\x22\x33\x44\x55",
    }
    got = set()
    for name, dst in frames.items():
        b.receive(udp_frame(dst, payload=name.encode().ljust(20)))
        result = B.poll()
        if result:
            got.add(result[0][42:62].decode().strip())
    assert got == accepted
    assert b.counters["rx_filtered"] == 4 - len(accepted)


def test_rss_writes_the_toeplitz_hash_and_picks_the_reta_queue(nic):
    a, b = nic.ports
    nic.connect(a, b)
    RingPort(a)
    B = RingPort(b, queues=4)
    wait_for(lambda: b.link_up, what="link up")
    b.write32(RXCTRL, 0)
    for i, word in enumerate(key_to_rssrk(INTEL_DEFAULT_KEY)):
        b.write32(0x5C80 + 4 * i, word)
    reta = [i % 4 for i in range(128)]
    for i in range(32):
        b.write32(0x5C00 + 4 * i, int.from_bytes(bytes(reta[4 * i : 4 * i + 4]), "little"))
    b.write32(MRQC, 1 | (1 << 16) | (1 << 17) | (1 << 22))  # RSS, IPv4, IPv4/TCP, IPv4/UDP
    b.write32(RXCSUM, 1 << 13)  # PCSD: the hash replaces the checksum in the write-back
    b.write32(RXCTRL, 1)
    vectors = [
        ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x51CCC178),
        ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xC626B0EA),
        ("24.19.198.95", 12898, "12.22.207.184", 38024, 0x5C2B394A),
        ("38.27.205.30", 48228, "209.142.163.6", 2217, 0xAFC7327F),
        ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x10E828A2),
    ]
    for src, sport, dst, dport, expected in vectors:
        assert toeplitz_hash(INTEL_DEFAULT_KEY, rss_input_ipv4(src, dst, sport, dport)) == expected
        b.receive(udp_frame(b.mac, src, dst, sport, dport))
        queue = reta[expected & 0x7F]
        data, wb = B.poll(queue)
        assert wb["hash"] == expected and wb["lo"] & 0xF == 7  # RSS type IPv4/UDP
        assert all(B.poll(q) is None for q in range(4))


def test_rx_dma_to_an_unmapped_iova_faults_and_moves_no_data(nic):
    A, B = cable(nic)
    victim = B.dev.dma.alloc(2048)
    victim.view()[:8] = b"UNTOUCHD"
    # the ixy bug class: a virtual address where an IOVA belongs
    struct.pack_into("<QQ", B.rx_rings[0].view(), 0, victim.vaddr, 0)
    A.send(udp_frame(B.dev.mac))
    nic.step()
    assert nic.fault_count == 1
    fault = nic.faults[0]
    assert fault.iova == victim.vaddr and fault.write and fault.port == 1
    assert bytes(victim.view()[:8]) == b"UNTOUCHD"
    assert B.dev.counters["dma_faults"] == 1


def test_tx_from_an_unmapped_iova_faults_and_sends_nothing(nic):
    A, B = cable(nic)
    struct.pack_into("<QII", A.tx_ring.view(), 0, 0x7F0000000000, TX_CMD | 64, 64 << 14)
    A.tx_tail = 1
    A.dev.write32(tx(0, 0x18), 1)
    nic.step()
    assert nic.fault_count == 1 and not nic.faults[0].write
    assert A.dev.counters["tx_frames"] == 0 and A.dev.counters["tx_malformed"] == 1
    assert B.poll() is None


def test_no_dma_without_bus_master(nic):
    A, B = cable(nic)
    A.dev.set_bus_master(False)
    A.send(udp_frame(B.dev.mac))
    nic.step()
    assert A.dev.counters["tx_frames"] == 0 and not A.tx_done(0)
    A.dev.set_bus_master(True)
    nic.step()
    assert A.tx_done(0) and B.poll() is not None


def test_tx_head_write_back_reports_the_head(nic):
    A, B = cable(nic)
    wb = A.dev.dma.alloc(128)
    A.dev.write32(tx(0, 0x38), wb.iova & 0xFFFFFFFF | 1)
    A.dev.write32(tx(0, 0x3C), wb.iova >> 32)
    for _ in range(3):
        A.send(udp_frame(B.dev.mac))
    nic.step()
    assert struct.unpack_from("<I", wb.view())[0] == 3


def test_iova_ranges_exclude_the_virtual_addresses(nic):
    for mapping in nic.dma.mappings:
        assert mapping.iova != mapping.vaddr
        assert any(lo <= mapping.iova <= hi for lo, hi in nic.iommu.valid_iova_ranges())


def test_threaded_engine_moves_100000_sequenced_frames_without_loss():
    with ModelNic(
        2, mode="thread", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002
    ) as nic:
        a, b = nic.ports
        nic.connect(a, b)
        A, B = (
            RingPort(a, rx_size=512, tx_size=512),
            RingPort(b, rx_size=512, tx_size=512, drop_en=False),
        )
        wait_for(lambda: a.link_up and b.link_up, what="link up")
        total, sent, received = 100_000, 0, 0
        template = udp_frame(b.mac, payload=bytes(18))  # 60 bytes
        deadline = time.monotonic() + 120
        while received < total:
            assert time.monotonic() < deadline, f"stuck at {received} of {total}"
            burst = min(total - sent, 256 - (sent - received), A.tx_free())
            for i in range(burst):
                A.send(template[:42] + (sent + i).to_bytes(8, "little") + template[50:], tail=False)
            if burst > 0:
                sent += burst
                A.dev.write32(tx(0, 0x18), A.tx_tail)
            while (got := B.poll()) is not None:
                seq = int.from_bytes(got[0][42:50], "little")
                assert seq == received, f"expected {received}, got {seq}"
                assert got[0][50:] == template[50:]
                received += 1
        assert nic.fault_count == 0
        assert b.counters["rx_delivered"] == total and b.counters["rx_missed"] == 0
        assert b.counters["rx_no_descriptor"] == 0 and a.counters["tx_frames"] == total
