"""Guest scenario: both igb ports driven by IgbPort through the kernel's VFIO, frames
port A -> port B and back through the C data path, no loss, no DMAR fault.

Runs inside the test guest as root (tests/vm/harness.py; tests/vm/test_igb_guest.py runs
it). Steps:

0. Fragment the guest's free memory on purpose (guest_memory.py, IGB_FRAGMENT_MIB MiB),
   so that any DMA memory in 4 KiB pages lands on pages that are not adjacent: QEMU's igb
   then drops every frame whose buffer crosses a page (docs/vm-guest-dma.md), and only the
   guest's hugepages keep the run lossless, every time instead of most of the time.
1. Find the two igb functions and tell them apart by MAC (RAL0/RAH0), before binding.
2. Bind both to vfio-pci; open both through one VfioContainer (one IOVA space).
3. Bring both up with IgbPort (reset, PHY autonegotiation over MDIC, rings) and wait for
   the link.
4. A -> B, then B -> A: sequence-numbered frames of several sizes, allocated from the
   sender's RX pool, sent with tx_batch, received with rx_batch. At most WINDOW frames are
   in flight, so the receiving ring (511 usable descriptors) never overflows. Every frame
   must arrive once, in order, byte for byte.
5. Checksum errors are not MAC errors: the 82576 reports a bad TCP/UDP checksum in
   write-back bit 29 (L4E) when RXCSUM.TUOFL is on, and bit 29 is the 82599's RXE. igb RX
   queues drop on the 82576's RXE (bit 31) only, so UDP frames with a bad checksum must
   arrive both with the driver's RXCSUM (offload off) and with TUOFL switched on by hand
   (QEMU then sets L4E), and good-checksum frames too; none is counted as drop_errors.
6. Statistics: the MAC's counters must match what was sent and received.
7. Port B again, re-initialised (reset, PHY, rings) with RSS over 4 RX queues: every UDP
   flow must land on the queue its Toeplitz hash selects, with the hash in the descriptor.
8. Shut both ports down, close the container; the guest kernel log must show no DMAR
   fault.
9. Proof that the IOMMU is really on: in a fresh container, one TX descriptor on port A
   points at an IOVA inside the valid ranges that nothing is mapped at. The guest kernel
   must log a DMAR fault for that address, and the frame's bytes must not leave memory:
   QEMU completes the blocked read with zeros, so port B receives a frame of zeros of
   the right length instead of the pattern.

Prints one JSON object (the summary) as its last line; exit code 0 only when every check
passed.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import time
from ipaddress import ip_address

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(HERE))), HERE]  # repo, here

import guest_pci  # noqa: E402  (guest-side helper next to this file)
from guest_checks import run_and_report  # noqa: E402
from guest_memory import fragment_free_memory, kernel_page_size  # noqa: E402
from ixyd._datapath import ffi  # noqa: E402

from ixyd.drivers import igb_registers as r  # noqa: E402
from ixyd.drivers.config import PortConfig  # noqa: E402
from ixyd.drivers.igb import IgbPort  # noqa: E402
from ixyd.drivers.rings import free_packets, packet_data, write_packet  # noqa: E402
from ixyd.pci import bind_vfio  # noqa: E402
from ixyd.toeplitz import INTEL_DEFAULT_KEY, reta_queue, rss_input_ipv4, toeplitz_hash  # noqa: E402
from ixyd.vfio import VfioContainer, VfioDevice  # noqa: E402

MAC_A, MAC_B = "52:54:00:00:00:01", "52:54:00:00:00:02"  # tests/vm/harness.py IGB_PORTS
FRAMES_PER_DIRECTION = int(os.environ.get("IGB_FRAMES", "20000"))
# Fragmented on purpose (guest_memory.py): a TX buffer in 4 KiB pages would lose frames at
# random in QEMU's igb (docs/vm-guest-dma.md); with the memory fragmented it loses them
# every run, so the guest's hugepages are what keeps this scenario lossless.
FRAGMENT_MIB = int(os.environ.get("IGB_FRAGMENT_MIB", "256"))
SIZES = (60, 128, 512, 1514)  # bytes without FCS; QEMU does not pad, so no runts
BATCH = 32
WINDOW = 256  # frames in flight at most: less than the 511 usable RX descriptors
ETHERTYPE = 0x88B5  # IEEE local experimental
MAGIC = b"IXYD"
CHECKSUM_FRAMES = 16
UDP_SRC_IP, UDP_DST_IP, UDP_DPORT = "10.0.0.1", "10.0.0.2", 5000
RSS_QUEUES, RSS_FLOWS, RSS_FRAMES = 4, 64, 256
RECEIVE_TIMEOUT = 5.0
DMAR_FAULT_MARKERS = ("DMAR: [DMA", "DMAR: DRHD: handling fault")
UNMAPPED_IOVA = 0x7FF00000  # inside the valid ranges, far above anything DmaMemory maps
TX_CMD = (
    0x00300000 | 0x01000000 | 0x02000000 | 0x08000000 | 0x20000000
)  # DTYP_DATA EOP IFCS RS DEXT


class ScenarioFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise ScenarioFailed(what)


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# ---------------------------------------------------------------------------- frames
FILLER = bytes(range(256)) * 7  # long enough for any offset plus 1514 bytes


def sequenced_frame(dst: bytes, src: bytes, direction: int, seq: int) -> bytes:
    """dst, src, ethertype, MAGIC, direction, seq, then a seq-dependent filler."""
    size = SIZES[seq % len(SIZES)]
    head = dst + src + struct.pack(">H4sBQ", ETHERTYPE, MAGIC, direction, seq)
    start = seq & 0xFF
    return head + FILLER[start : start + size - len(head)]


def parse_sequence(frame: bytes) -> tuple[int, int] | None:
    if len(frame) < 27 or frame[12:14] != struct.pack(">H", ETHERTYPE) or frame[14:18] != MAGIC:
        return None
    direction, seq = struct.unpack_from(">BQ", frame, 18)
    return direction, seq


def _udp_sum(frame: bytes) -> int:
    udp = frame[34:]
    length = struct.unpack(">H", udp[4:6])[0]
    data = frame[26:34] + struct.pack(">BBH", 0, 17, length) + udp[:length]
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_frame(dst: bytes, src: bytes, seq: int, good_checksum: bool, sport: int = 4000) -> bytes:
    """IPv4/UDP (correct IP header checksum) with a right or a deliberately wrong UDP
    checksum."""
    payload = MAGIC + struct.pack(">Q", seq) + bytes(50)
    udp_len = 8 + len(payload)
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, seq & 0xFFFF, 0, 64, 17, 0,
                         ip_address(UDP_SRC_IP).packed, ip_address(UDP_DST_IP).packed)  # fmt: skip
    words = struct.unpack(">10H", header)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack(">H", ~total & 0xFFFF) + header[12:]
    frame = dst + src + b"\x08\x00" + header + struct.pack(">HHHH", sport, UDP_DPORT, udp_len, 0)
    frame += payload
    checksum = ~_udp_sum(frame) & 0xFFFF or 0xFFFF
    if not good_checksum:
        checksum ^= 0x5A5A
    return frame[:40] + struct.pack(">H", checksum) + frame[42:]


# ---------------------------------------------------------------------------- traffic
def send(port: IgbPort, frames: list[bytes]) -> None:
    """Queue frames on TX queue 0 from the port's own RX pool; QEMU sends on the TDT write."""
    packets = port.rx_queues[0].pool.alloc(len(frames))
    check(len(packets) == len(frames), f"{port.mac_address}: pool has no {len(frames)} buffers")
    for packet, frame in zip(packets, frames, strict=True):
        write_packet(packet, frame)
    taken = port.tx_queues[0].tx_batch(packets)
    if taken < len(packets):
        free_packets(packets[taken:])
    check(taken == len(frames), f"{port.mac_address}: TX ring took {taken} of {len(frames)}")


def receive(port: IgbPort, count: int) -> list[bytes]:
    """Exactly `count` frames from RX queue 0, or fewer after RECEIVE_TIMEOUT."""
    got: list[bytes] = []
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    while len(got) < count and time.monotonic() < deadline:
        packets = port.rx_queues[0].rx_batch(BATCH)
        got += [packet_data(p) for p in packets]
        free_packets(packets)
    return got


def stream(sender: IgbPort, receiver: IgbPort, direction: int) -> dict:
    """FRAMES_PER_DIRECTION sequenced frames sender -> receiver, checked one by one."""
    dst, src = receiver.mac, sender.mac
    expected = [sequenced_frame(dst, src, direction, seq) for seq in range(FRAMES_PER_DIRECTION)]
    received = 0
    sent = 0
    start = time.monotonic()
    while received < len(expected):
        while sent < len(expected) and sent - received < WINDOW:
            batch = expected[sent : sent + BATCH]
            send(sender, batch)
            sent += len(batch)
        want = min(BATCH, sent - received)
        frames = receive(receiver, want)
        for frame in frames:
            check(
                parse_sequence(frame) == (direction, received),
                f"direction {direction}: expected seq {received}, got {parse_sequence(frame)}",
            )
            check(frame == expected[received], f"direction {direction}: seq {received} corrupted")
            received += 1
        check(
            len(frames) == want,
            f"direction {direction}: {received} of {sent} sent frames arrived; "
            f"{want - len(frames)} missing after {RECEIVE_TIMEOUT} s",
        )
    elapsed = time.monotonic() - start
    extra = receive_nothing(receiver)
    check(extra == 0, f"direction {direction}: {extra} unexpected extra frames")
    return {
        "frames": received,
        "bytes": sum(map(len, expected)),
        "seconds": round(elapsed, 3),
        "frames_per_second": round(received / elapsed),
    }


def receive_nothing(port: IgbPort) -> int:
    packets = port.rx_queues[0].rx_batch(BATCH)
    free_packets(packets)
    return len(packets)


def checksum_hazard(sender: IgbPort, receiver: IgbPort) -> dict:
    """Step 5: bad UDP checksums are delivered with the driver's RXCSUM and with TUOFL on."""
    rxq = receiver.rx_queues[0]
    dst, src = receiver.mac, sender.mac

    def run(good: bool, first_seq: int) -> tuple[int, int]:
        """(delivered, dropped by the data path) for CHECKSUM_FRAMES UDP frames."""
        before = rxq.stats["drop_errors"]
        frames = [udp_frame(dst, src, first_seq + i, good) for i in range(CHECKSUM_FRAMES)]
        send(sender, frames)
        got: list[bytes] = []
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while len(got) + rxq.stats["drop_errors"] - before < CHECKSUM_FRAMES:
            if time.monotonic() > deadline:
                break
            packets = rxq.rx_batch(BATCH)
            got += [packet_data(p) for p in packets]
            free_packets(packets)
        for frame in got:
            check(frame in frames, "checksum test: a frame arrived that was not sent")
        return len(got), rxq.stats["drop_errors"] - before

    rxcsum = receiver.regs.RXCSUM.read()
    check(rxcsum & (r.RXCSUM_TUOFL | r.RXCSUM_IPOFL) == 0, f"RXCSUM {rxcsum:#x} has offloads on")
    off_delivered, off_dropped = run(good=False, first_seq=0)
    # What the reset value (IPOFL | TUOFL) would do. RXCSUM is read per frame by QEMU.
    receiver.regs.RXCSUM.write(rxcsum | r.RXCSUM_TUOFL)
    try:
        on_bad_delivered, on_bad_dropped = run(good=False, first_seq=100)
        on_good_delivered, on_good_dropped = run(good=True, first_seq=200)
    finally:
        receiver.regs.RXCSUM.write(rxcsum)
    result = {
        "rxcsum_by_driver": rxcsum,
        "offload_off_bad_checksum": {"delivered": off_delivered, "dropped": off_dropped},
        "tuofl_on_bad_checksum": {"delivered": on_bad_delivered, "dropped": on_bad_dropped},
        "tuofl_on_good_checksum": {"delivered": on_good_delivered, "dropped": on_good_dropped},
    }
    check(
        (off_delivered, off_dropped) == (CHECKSUM_FRAMES, 0),
        f"bad UDP checksums with offload off: {result['offload_off_bad_checksum']}",
    )
    check(
        (on_bad_delivered, on_bad_dropped) == (CHECKSUM_FRAMES, 0),
        f"bad UDP checksums with TUOFL on (QEMU sets L4E = bit 29, not RXE): "
        f"{result['tuofl_on_bad_checksum']}",
    )
    check(
        (on_good_delivered, on_good_dropped) == (CHECKSUM_FRAMES, 0),
        f"good UDP checksums with TUOFL on: {result['tuofl_on_good_checksum']}",
    )
    return result


def rss_spread(sender: IgbPort, dev) -> dict:
    """Step 7: port B again, now with RSS over RSS_QUEUES queues. Each UDP flow must land
    on the queue its Toeplitz hash selects through the round-robin RETA, with the hash in
    the descriptor (MRQC = RSS, RETA bytes, RSSRK, RXCSUM.PCSD as QEMU requires)."""
    config = PortConfig(rx_queues=RSS_QUEUES, rx_ring=256, pool_size=512, link_timeout=10.0)
    reta = [entry % RSS_QUEUES for entry in range(128)]
    with IgbPort(dev, config) as receiver:
        check(receiver.wait_for_link(5.0), "link did not come up after re-init")
        frames = {}
        for i in range(RSS_FRAMES):
            sport = 1024 + i % RSS_FLOWS
            frame = udp_frame(receiver.mac, sender.mac, i, good_checksum=True, sport=sport)
            frames[frame] = toeplitz_hash(
                INTEL_DEFAULT_KEY, rss_input_ipv4(UDP_SRC_IP, UDP_DST_IP, sport, UDP_DPORT)
            )
        pending = list(frames)
        got: list[tuple[int, bytes, int]] = []
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while len(got) < RSS_FRAMES and time.monotonic() < deadline:
            if pending:
                send(sender, pending[:BATCH])
                pending = pending[BATCH:]
            for rxq in receiver.rx_queues:
                packets = rxq.rx_batch(BATCH)
                got += [(rxq.index, packet_data(p), p.rss_hash) for p in packets]
                free_packets(packets)
        per_queue = [0] * RSS_QUEUES
        for queue, frame, rss_hash in got:
            check(frame in frames, "RSS: a frame arrived that was not sent")
            check(rss_hash == frames[frame], f"RSS hash {rss_hash:#x} != {frames[frame]:#x}")
            check(queue == reta_queue(rss_hash, reta), f"RSS: hash {rss_hash:#x} on queue {queue}")
            per_queue[queue] += 1
        check(len(got) == RSS_FRAMES, f"RSS: {len(got)} of {RSS_FRAMES} frames arrived")
        check(all(per_queue), f"RSS: frames per queue {per_queue}")
        check(receiver.queue_stats()["rx_packets"] == per_queue, "RSS: per-queue counters")
        return {"frames": len(got), "per_queue": per_queue, "flows": RSS_FLOWS}


# ---------------------------------------------------------------------------- main
def dmar_faults() -> list[str]:
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return [line for line in log.splitlines() if any(m in line for m in DMAR_FAULT_MARKERS)]


def run(summary: dict) -> None:
    addresses = guest_pci.igb_addresses_in_guest()  # MAC -> BDF, read before binding
    check({MAC_A, MAC_B} <= set(addresses), f"igb ports found: {addresses}")
    bdf_a, bdf_b = addresses[MAC_A], addresses[MAC_B]
    summary["ports"] = {MAC_A: bdf_a, MAC_B: bdf_b}
    for bdf in (bdf_a, bdf_b):
        bind_vfio(bdf)
    config = PortConfig(link_timeout=10.0)
    with VfioContainer() as container:
        dev_a = VfioDevice.open(bdf_a, container)
        dev_b = VfioDevice.open(bdf_b, container)
        summary["iommu_groups"] = container.groups
        summary["ids"] = [str(dev_a.ids), str(dev_b.ids)]
        start = time.monotonic()
        port_a = IgbPort(dev_a, config)
        summary["init_seconds_a"] = round(time.monotonic() - start, 3)
        start = time.monotonic()
        port_b = IgbPort(dev_b, config)
        summary["init_seconds_b"] = round(time.monotonic() - start, 3)
        summary["dma_page_sizes"] = sorted({kernel_page_size(m.vaddr) for m in container.mappings})
        with port_a:
            with port_b:
                phase_one(summary, port_a, port_b)
            summary["rss"] = rss_spread(port_a, dev_b)
        summary["bus_master_after_shutdown"] = [dev_a.bus_master, dev_b.bus_master]
        check(summary["bus_master_after_shutdown"] == [False, False], "bus master left on")
    summary["dmar_faults"] = dmar_faults()
    check(summary["dmar_faults"] == [], f"DMAR faults: {summary['dmar_faults']}")
    summary["unmapped_iova"] = deliberate_dma_fault(bdf_a, bdf_b)


def deliberate_dma_fault(bdf_a: str, bdf_b: str) -> dict:
    """Step 9: a TX descriptor pointing at an unmapped IOVA."""
    config = PortConfig(rx_ring=64, tx_ring=64, pool_size=128, link_timeout=10.0)
    with VfioContainer() as container:
        dev_a, dev_b = VfioDevice.open(bdf_a, container), VfioDevice.open(bdf_b, container)
        with IgbPort(dev_a, config) as port_a, IgbPort(dev_b, config) as port_b:
            check(port_a.wait_for_link(5.0) and port_b.wait_for_link(5.0), "link (step 9)")
            ranges = container.valid_iova_ranges()
            check(any(lo <= UNMAPPED_IOVA <= hi for lo, hi in ranges), "test IOVA not valid")
            check(
                all(not m.iova <= UNMAPPED_IOVA < m.iova + m.size for m in container.mappings),
                "test IOVA is mapped",
            )
            frame = sequenced_frame(port_b.mac, port_a.mac, 3, 1)
            packet = port_a.rx_queues[0].pool.alloc(1)[0]
            write_packet(packet, frame)  # the bytes that must not leave host memory
            txq = port_a.tx_queues[0]
            q = txq.pointer
            index = q.tail
            descriptor = struct.pack("<QII", UNMAPPED_IOVA, TX_CMD | len(frame), len(frame) << 14)
            ffi.memmove(ffi.cast("uint8_t *", q.ring) + 16 * index, descriptor, 16)
            txq._slots[index] = packet  # reclaimed like any sent buffer
            q.tail = (index + 1) % txq.size
            port_a.regs.TDT[0].write(q.tail)
            got = receive(port_b, 1)
    faults = [line for line in dmar_faults() if f"{UNMAPPED_IOVA:#x}" in line]
    result = {
        "iova": UNMAPPED_IOVA,
        "fault_lines": faults,
        "received_length": len(got[0]) if got else None,
        "received_zeros": bool(got) and got[0] == bytes(len(got[0])),
    }
    check(faults != [], f"no DMAR fault logged for {UNMAPPED_IOVA:#x}: {dmar_faults()}")
    check(got != [] and len(got[0]) == len(frame), f"step 9: received {result}")
    check(got[0] != frame and result["received_zeros"], "step 9: the frame's bytes left memory")
    return result


def phase_one(summary: dict, port_a: IgbPort, port_b: IgbPort) -> None:
    """Steps 3 to 6 on two running ports."""
    summary["macs"] = [port_a.mac_address, port_b.mac_address]
    check(summary["macs"] == [MAC_A, MAC_B], f"MACs read from RAL0/RAH0: {summary['macs']}")
    check(port_a.wait_for_link(5.0) and port_b.wait_for_link(5.0), "link did not come up")
    summary["link"] = [port_a.link(), port_b.link()]
    check(summary["link"] == [(True, 1000), (True, 1000)], f"link {summary['link']}")
    port_a.stats(), port_b.stats()  # start the MAC counters from here

    summary["a_to_b"] = stream(port_a, port_b, direction=1)
    summary["b_to_a"] = stream(port_b, port_a, direction=2)
    sa, sb = port_a.stats(), port_b.stats()
    summary["stats_a"], summary["stats_b"] = sa, sb
    n, nbytes = FRAMES_PER_DIRECTION, summary["a_to_b"]["bytes"]
    check(
        sa["tx_good_packets"] == n and sb["rx_good_packets"] == n,
        f"A tx_good_packets {sa['tx_good_packets']}, B rx_good_packets "
        f"{sb['rx_good_packets']}, sent {n}",
    )
    check(
        sa["tx_good_bytes"] == nbytes + 4 * n == sb["rx_good_bytes"],
        "good octets (with FCS) differ from what was sent",
    )
    check(sb["rx_packets"] == n and sa["tx_packets"] == n, "data path counters")
    check(sa["rx_good_packets"] == n == sb["tx_good_packets"], "B -> A counters")
    for rxq in (*port_a.rx_queues, *port_b.rx_queues):
        drops = {k: v for k, v in rxq.stats.items() if k.startswith("drop") and v}
        check(not drops, f"data path dropped frames: {drops}")
    check(sa["rx_no_descriptor"] == sb["rx_no_descriptor"] == 0, "RQDPC counted drops")

    summary["checksum_hazard"] = checksum_hazard(port_a, port_b)


def main() -> int:
    logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s: %(message)s")
    summary: dict = {"scenario": "igb_forward", "frames_per_direction": FRAMES_PER_DIRECTION}

    def run_fragmented() -> None:
        with fragment_free_memory(FRAGMENT_MIB) as freed:
            summary["fragmented_pages"] = freed
            run(summary)

    return run_and_report(summary, run_fragmented)


if __name__ == "__main__":
    sys.exit(main())
