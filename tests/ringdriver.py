"""A minimal 82599 ring driver for testing the model from the datasheet's point of view.

Written from docs/reference/82599.md directly, independent of ixyd/drivers: it exercises the model
the way any driver would (reset, link, one RX and one TX queue, advanced descriptors).
Register offsets are written out here on purpose.
"""

from __future__ import annotations

import functools
import struct

from hosttools import wait_until

CTRL, EEC, RDRXCTL, RXCTRL, HLREG0, FCTRL, DMATXCTL, AUTOC, LINKS = (
    0x0,
    0x10010,
    0x2F00,
    0x3000,
    0x4240,
    0x5080,
    0x4A80,
    0x42A0,
    0x42A4,
)
EIMC, EICR = 0x888, 0x800
RST, LRST = 1 << 26, 1 << 3
ENABLE = 1 << 25
ADV_ONEBUF, DROP_EN = 0x02000000, 0x10000000
DD, EOP = 0x1, 0x2
TX_CMD = (
    0x00300000 | 0x01000000 | 0x02000000 | 0x08000000 | 0x20000000
)  # DTYP_DATA|EOP|IFCS|RS|DEXT


def rx(q: int, reg: int) -> int:
    return 0x1000 + 0x40 * q + reg


def tx(q: int, reg: int) -> int:
    return 0x6000 + 0x40 * q + reg


wait_for = functools.partial(wait_until, timeout=2.0, interval=0.0005)  # the model steps fast


def reset(dev) -> None:
    dev.write32(EIMC, 0x7FFFFFFF)
    dev.write32(CTRL, RST | LRST)
    wait_for(lambda: dev.read32(CTRL) & (RST | LRST) == 0, what="CTRL.RST to clear")
    wait_for(lambda: dev.read32(EEC) & 0x200, what="EEC.ARD")
    wait_for(lambda: dev.read32(RDRXCTL) & 0x8, what="RDRXCTL.DMAIDONE")


class RingPort:
    """One RX and one TX queue on a port, driven from Python."""

    def __init__(
        self,
        dev,
        *,
        rx_size: int = 64,
        tx_size: int = 64,
        buf_kb: int = 2,
        drop_en: bool = True,
        strip_crc: bool = True,
        fctrl: int = 0x400 | 0x200 | 0x100,
        start_link: bool = True,
        queues: int = 1,
    ):
        self.dev = dev
        self.rx_size, self.tx_size, self.buf_size = rx_size, tx_size, buf_kb * 1024
        reset(dev)
        dev.set_bus_master(True)
        if start_link:
            dev.write32(AUTOC, (dev.read32(AUTOC) & ~0xE180) | (3 << 13) | 0x1000)
        hl = dev.read32(HLREG0) | 0x1 | 0x400
        dev.write32(HLREG0, hl | 0x2 if strip_crc else hl & ~0x2)
        dev.write32(RDRXCTL, dev.read32(RDRXCTL) | 0x2 if strip_crc else dev.read32(RDRXCTL) & ~0x2)
        dev.write32(FCTRL, fctrl)
        self.rx_rings, self.rx_bufs, self.rx_next = [], [], []
        for q in range(queues):
            ring = dev.dma.alloc(rx_size * 16)
            bufs = [dev.dma.alloc(self.buf_size) for _ in range(rx_size)]
            view = ring.view()
            for i, b in enumerate(bufs):
                struct.pack_into("<QQ", view, 16 * i, b.iova, 0)
            dev.write32(rx(q, 0x00), ring.iova & 0xFFFFFFFF)
            dev.write32(rx(q, 0x04), ring.iova >> 32)
            dev.write32(rx(q, 0x08), rx_size * 16)
            dev.write32(rx(q, 0x14), ADV_ONEBUF | buf_kb | (DROP_EN if drop_en else 0))
            dev.write32(rx(q, 0x28), dev.read32(rx(q, 0x28)) | ENABLE)
            dev.write32(rx(q, 0x10), 0)
            dev.write32(rx(q, 0x18), rx_size - 1)
            self.rx_rings.append(ring)
            self.rx_bufs.append(bufs)
            self.rx_next.append(0)
        self.tx_ring = dev.dma.alloc(tx_size * 16)
        self.tx_bufs = [dev.dma.alloc(2048) for _ in range(tx_size)]
        dev.write32(tx(0, 0x00), self.tx_ring.iova & 0xFFFFFFFF)
        dev.write32(tx(0, 0x04), self.tx_ring.iova >> 32)
        dev.write32(tx(0, 0x08), tx_size * 16)
        dev.write32(DMATXCTL, dev.read32(DMATXCTL) | 1)
        dev.write32(tx(0, 0x10), 0)
        dev.write32(tx(0, 0x18), 0)
        dev.write32(tx(0, 0x28), dev.read32(tx(0, 0x28)) | ENABLE)
        self.tx_tail = 0
        dev.write32(RXCTRL, dev.read32(RXCTRL) | 1)

    # TX
    def tx_free(self) -> int:
        head = self.dev.read32(tx(0, 0x10))
        return (head - self.tx_tail - 1) % self.tx_size

    def send(self, frame: bytes, *, cmd: int = TX_CMD, tail: bool = True) -> int:
        i = self.tx_tail
        buf = self.tx_bufs[i]
        buf.view()[: len(frame)] = frame
        struct.pack_into(
            "<QII", self.tx_ring.view(), 16 * i, buf.iova, cmd | len(frame), len(frame) << 14
        )
        self.tx_tail = (i + 1) % self.tx_size
        if tail:
            self.dev.write32(tx(0, 0x18), self.tx_tail)
        return i

    def tx_done(self, index: int) -> bool:
        return bool(struct.unpack_from("<I", self.tx_ring.view(), 16 * index + 12)[0] & DD)

    # RX
    def poll(self, q: int = 0):
        """Return (frame bytes, write-back dict) of the next completed descriptor, or None."""
        i = self.rx_next[q]
        view = self.rx_rings[q].view()
        lo, hi, status, length, vlan = struct.unpack_from("<IIIHH", view, 16 * i)
        if not status & DD:
            return None
        data = bytes(self.rx_bufs[q][i].view()[:length])
        struct.pack_into("<QQ", view, 16 * i, self.rx_bufs[q][i].iova, 0)
        self.rx_next[q] = (i + 1) % self.rx_size
        self.dev.write32(rx(q, 0x18), i)
        return data, {"lo": lo, "hash": hi, "status": status, "length": length, "index": i}
