"""Guest scenario: which TX frames QEMU's igb loses, and why (docs/vm-guest-dma.md).

Runs inside the test guest as root (tests/vm/harness.py; tests/vm/test_igb_guest.py runs
it; the guest reserves hugepages at boot). Steps:

1. Fragment the guest's free memory on purpose (guest_memory.fragment_free_memory,
   FRAGMENT_MIB MiB): from here on every 4 KiB page the kernel hands out is isolated.
2. Two rounds, each with both igb ports through VFIO in one container, up with IgbPort
   (defaults: the pool of 4,096 buffers of 2,176 bytes the daemon uses): round "4k" with
   the container's DMA memory in 4 KiB pages (prefer_hugepages=False), round "hugepages"
   with ixyd's default (2 MiB pages when the system has free ones).
3. In each round, FRAMES sequence-numbered 1,514-byte frames A -> B, BATCH at a time, from
   port A's pool. For each one, before it is sent, note from /proc/self/pagemap whether
   its bytes cross a 4 KiB page boundary and whether the pages on both sides are adjacent
   guest-physical frames.
4. After each batch: QEMU handled the TDT write before the MMIO store returned (TCG runs
   the device model in the vCPU thread), so everything port A sent is on its way; receive
   on B until it has as many frames as A's MAC counted (GPTC), or QUIET_S without one.
5. Compare: the frames lost must be exactly those whose buffer crosses into a page that
   is not adjacent; GPTC must equal what B received (QEMU neither sends nor counts such a
   frame, and still reports the descriptor done).

FRAGMENT_MIB=0 skips step 1. Prints one JSON object (the summary, one entry per round) as
its last line; exit code 0 when the checks of step 5 hold in both rounds (how many frames
were lost is the finding, not an error: the host test says what each round must give).
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(HERE))), HERE]  # repo, here

import guest_pci  # noqa: E402  (guest-side helpers next to this file)
from guest_checks import check, dmar_faults, run_and_report, step  # noqa: E402
from guest_memory import (  # noqa: E402
    crosses_page,
    fragment_free_memory,
    kernel_page_size,
    pages_adjacent,
)  # noqa: E402
from ixyd._datapath import ffi  # noqa: E402

from ixyd.dma import free_hugepages  # noqa: E402
from ixyd.drivers.config import PortConfig  # noqa: E402
from ixyd.drivers.igb import IgbPort  # noqa: E402
from ixyd.drivers.rings import free_packets, packet_data, write_packet  # noqa: E402
from ixyd.pci import bind_vfio  # noqa: E402
from ixyd.vfio import VfioContainer, VfioDevice  # noqa: E402

MAC_A, MAC_B = "52:54:00:00:00:01", "52:54:00:00:00:02"  # tests/vm/harness.py IGB_PORTS
FRAMES = int(os.environ.get("FRAMES", "2048"))
FRAGMENT_MIB = int(os.environ.get("FRAGMENT_MIB", "256"))
FRAME_BYTES = 1514  # the largest untagged frame without FCS: crosses a page most often
BATCH = 32
QUIET_S = 2.0  # no frame for this long after a batch: the rest are not coming
ETHERTYPE = 0x88B5  # IEEE local experimental
MAGIC = b"IXYD"


def frame(dst: bytes, src: bytes, seq: int) -> bytes:
    head = dst + src + struct.pack(">H4sQ", ETHERTYPE, MAGIC, seq)
    return head + bytes((seq + i) & 0xFF for i in range(FRAME_BYTES - len(head)))


def sequence_of(data: bytes) -> int | None:
    if data[12:14] != struct.pack(">H", ETHERTYPE) or data[14:18] != MAGIC:
        return None
    return struct.unpack_from(">Q", data, 18)[0]


def send_batch(port: IgbPort, dst: bytes, first: int, count: int) -> dict[int, dict]:
    """Queue frames first..first+count-1 on port's TX queue 0; returns seq -> where its
    bytes lie (crosses a page, pages adjacent)."""
    packets = port.rx_queues[0].pool.alloc(count)
    check(len(packets) == count, f"pool has no {count} free buffers")
    placed = {}
    for offset, packet in enumerate(packets):
        seq = first + offset
        write_packet(packet, frame(dst, port.mac, seq))
        vaddr = int(ffi.cast("uintptr_t", packet.data))
        placed[seq] = {
            "crosses": crosses_page(vaddr, FRAME_BYTES),
            "adjacent": pages_adjacent(vaddr, FRAME_BYTES),
        }
    taken = port.tx_queues[0].tx_batch(packets)
    if taken < count:
        free_packets(packets[taken:])
    check(taken == count, f"TX ring took {taken} of {count}")
    return placed


def receive_up_to(port: IgbPort, count: int) -> list[int]:
    """Sequence numbers of up to `count` frames from RX queue 0; stops after QUIET_S
    without a frame."""
    got: list[int] = []
    quiet_until = time.monotonic() + QUIET_S
    while len(got) < count and time.monotonic() < quiet_until:
        packets = port.rx_queues[0].rx_batch(BATCH)
        if packets:
            quiet_until = time.monotonic() + QUIET_S
        for packet in packets:
            seq = sequence_of(packet_data(packet))
            check(seq is not None, "a frame arrived that was not sent")
            got.append(seq)
        free_packets(packets)
    return got


def run(summary: dict) -> None:
    summary["hugepages_free_at_start"] = free_hugepages()
    with fragment_free_memory(FRAGMENT_MIB) as freed:
        summary["fragmented_pages"] = freed
        step(f"freed {freed} isolated pages")
        addresses = guest_pci.igb_addresses_in_guest()  # MAC -> BDF, read before binding
        bdf_a, bdf_b = addresses[MAC_A], addresses[MAC_B]
        for bdf in (bdf_a, bdf_b):
            bind_vfio(bdf)
        for name, prefer_hugepages in (("4k", False), ("hugepages", True)):
            step(f"round {name}")
            summary[name] = one_round(bdf_a, bdf_b, prefer_hugepages)
    summary["dmar_faults"] = dmar_faults()
    check(summary["dmar_faults"] == [], f"DMAR faults: {summary['dmar_faults']}")


def one_round(bdf_a: str, bdf_b: str, prefer_hugepages: bool) -> dict:
    """Steps 2 to 5 with a fresh container whose DMA memory prefers hugepages or not."""
    result: dict = {}
    with VfioContainer(prefer_hugepages=prefer_hugepages) as container:
        dev_a, dev_b = VfioDevice.open(bdf_a, container), VfioDevice.open(bdf_b, container)
        with IgbPort(dev_a, PortConfig()) as port_a, IgbPort(dev_b, PortConfig()) as port_b:
            check(port_a.wait_for_link(5.0) and port_b.wait_for_link(5.0), "link down")
            result["dma_page_sizes"] = sorted(
                {kernel_page_size(m.vaddr) for m in container.mappings}
            )
            stream(result, port_a, port_b)
    return result


def stream(summary: dict, port_a: IgbPort, port_b: IgbPort) -> None:
    """Steps 3 to 5."""
    placed: dict[int, dict] = {}
    received: list[int] = []
    counted = 0
    port_a.stats()  # the MAC counters from here
    for first in range(0, FRAMES, BATCH):
        count = min(BATCH, FRAMES - first)
        placed |= send_batch(port_a, port_b.mac, first, count)
        counted = port_a.stats()["tx_good_packets"]
        received += receive_up_to(port_b, counted - len(received))
    lost = sorted(set(placed) - set(received))
    crossing = [seq for seq, where in placed.items() if where["crosses"]]
    not_adjacent = sorted(seq for seq in crossing if not placed[seq]["adjacent"])
    summary.update(
        frames=FRAMES,
        frame_bytes=FRAME_BYTES,
        crossing_page=len(crossing),
        crossing_into_non_adjacent_page=len(not_adjacent),
        lost=len(lost),
        lost_first=lost[:10],
        lost_inside_one_page=len([seq for seq in lost if not placed[seq]["crosses"]]),
        tx_good_packets=counted,
        received=len(received),
    )
    step(
        f"{FRAMES} frames, {len(crossing)} cross a page, {len(not_adjacent)} into a "
        f"non-adjacent one; {len(lost)} lost"
    )
    check(received == sorted(received), "frames arrived out of order")
    check(len(received) == len(set(received)), "a frame arrived twice")
    check(counted == len(received), f"GPTC {counted} != {len(received)} frames received")
    check(lost == not_adjacent, "the lost frames are not the ones that cross into a "
          f"non-adjacent page: lost {lost[:10]}..., predicted {not_adjacent[:10]}...")  # fmt: skip


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    summary: dict = {"scenario": "tx_page_crossing", "fragment_mib": FRAGMENT_MIB}
    return run_and_report(summary, lambda: run(summary))


if __name__ == "__main__":
    sys.exit(main())
