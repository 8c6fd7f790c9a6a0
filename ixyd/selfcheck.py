"""`ixyd-selfcheck`: prove the whole stack on the built-in 82599 model, no NIC needed.

Two model ports, each facing a traffic generator/checker; the ixgbe driver brings both up
through the device seam; two native forwarding workers move traffic A->B and B->A; the
checkers verify every sequence number. Exit status 0 means zero loss, zero corruption,
zero IOMMU faults and no programming-model violation.
"""

from __future__ import annotations

import argparse
import sys
import time

from .drivers.config import PortConfig
from .drivers.ixgbe import IxgbePort
from .errors import IxydError
from .forward import ForwardWorker
from .model import ModelNic


def run(frames: int, size: int, window: int, timeout: float) -> tuple[bool, list[str]]:
    """Forward `frames` frames each way; return (passed, report lines)."""
    lines = []
    nic = ModelNic(2, mode="thread")
    ports: list[IxgbePort] = []
    workers: list[ForwardWorker] = []
    try:
        gens = [nic.attach_traffic(p) for p in nic.ports]
        config = PortConfig(rx_ring=512, tx_ring=512, pool_size=2048, link_timeout=5)
        ports = [IxgbePort(p, config) for p in nic.ports]
        for port in ports:
            up, speed = port.link()
            lines.append(
                f"{port.dev.address}  {port.info.name}  MAC {port.mac_address}  "
                f"link {'up' if up else 'DOWN'} {speed} Mb/s"
            )
        for i, gen in enumerate(gens):
            gen.configure(size=size, flows=64, count=frames, window=window, stream=i + 1)
        gens[0].pair(gens[1])
        gens[1].pair(gens[0])
        workers = [
            ForwardWorker(ports[0].rx_queues[0], ports[1].tx_queues[0], name="fwd-0-1"),
            ForwardWorker(ports[1].rx_queues[0], ports[0].tx_queues[0], name="fwd-1-0"),
        ]
        for w in workers:
            w.start()
        started = time.monotonic()
        for gen in gens:
            gen.start()
        while time.monotonic() - started < timeout:
            if all(g.stats["unique"] >= frames for g in gens):
                break
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        for w in workers:
            w.stop()
        passed = True
        for name, gen, checker in (("0 -> 1", gens[0], gens[1]), ("1 -> 0", gens[1], gens[0])):
            s, sent = checker.stats, gen.stats["sent"]
            lost = sent - s["unique"]
            ok = lost == 0 and not (
                s["duplicates"] or s["reordered"] or s["corrupt"] or s["foreign"]
            )
            passed &= ok
            lines.append(
                f"port {name}: sent {sent}, received {s['unique']}, lost {lost}, "
                f"duplicates {s['duplicates']}, reordered {s['reordered']}, "
                f"corrupt {s['corrupt']}  {'ok' if ok else 'FAILED'}"
            )
        rate = sum(w.stats["packets"] for w in workers) / elapsed / 1e6
        lines.append(
            f"forwarded {sum(w.stats['packets'] for w in workers)} frames of {size} bytes in "
            f"{elapsed:.2f} s ({rate:.2f} Mpps, closed loop, window {window})"
        )
        faults = nic.fault_count
        violations = [v for p in nic.ports for v in p.violations]
        lines.append(f"IOMMU faults: {faults}; programming violations: {len(violations)}")
        lines.extend(f"  violation: {v}" for v in violations)
        passed &= faults == 0 and not violations
        for port in ports:
            port.shutdown()
        lines.append(f"after shutdown: {nic.mapping_count} DMA mappings left")
        passed &= nic.mapping_count == 0
        return passed, lines
    finally:
        for w in workers:
            w.stop()
        for port in ports:
            port.shutdown()
        nic.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ixyd-selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames", type=int, default=200_000, help="frames per direction (default 200000)"
    )
    parser.add_argument(
        "--size", type=int, default=60, help="frame size without FCS, 60..1514 (default 60)"
    )
    parser.add_argument(
        "--window", type=int, default=256, help="frames in flight per direction (default 256)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before giving up (default 60)"
    )
    args = parser.parse_args(argv)
    if not 60 <= args.size <= 1514:
        parser.error("--size must be 60..1514")
    if not 1 <= args.window <= 400:
        parser.error("--window must be 1..400 (the rings hold 511 frames)")
    if args.frames < 1:
        parser.error("--frames must be positive")
    try:
        passed, lines = run(args.frames, args.size, args.window, args.timeout)
    except IxydError as exc:
        print(f"ixyd-selfcheck: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print("self-check PASSED" if passed else "self-check FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
