"""The 82576 (igb) driver: bring a port up as datasheet section 4.5 and Intel's
e1000_82575 code do it, keep it observable, take it down cleanly. QEMU's `igb` device
model is an 82576, so this is also the driver for the VM tests.

Bring-up, one small step per datasheet step (facts: docs/reference/82576.md;
the sequence is Linux/DPDK `e1000_reset_hw_82575` + `igb_configure`):

    identify                     device ID table (igb_registers.DEVICES)
    disable_interrupts           IMC/EIMC all, read ICR/EICR
    disable_master               CTRL.GIO_MASTER_DISABLE, poll STATUS.GIO (82576.md#master-disable)
    quiesce                      RCTL = 0, TCTL = PSP, 10 ms (e1000_reset_hw_82575)
    global_reset                 CTRL.RST, bounded
    wait_for_eeprom              EECD.AUTO_RD for at most 10 ms, then carry on (see below)
    read_mac                     RAL0/RAH0
    init_link                    CTRL.SLU, PHY autonegotiation restart over MDIC
    clear_stats                  read every counter once
    init_rx                      RCTL off, filters, RSS, RXCSUM, per-queue rings (SRRCTL ...)
    init_tx                      TCTL off, TIPG, collision distance, rings, TCTL.EN
    start_rx_queue/start_tx_queue   fill, enable, tails (bus mastering on first)
    enable_rx                    RCTL.EN, last
    wait_for_link                bounded; a link still down is reported, not fatal

Where the 82576 differs from the 82599 driver (ixgbe.py), the step that handles it says so:

* No EEPROM-done wait that can block: QEMU never sets EECD.AUTO_RD, and Linux polls it for
  10 ms and carries on with a debug message. So does `_wait_for_eeprom`.
* The link comes up through the copper PHY: after every reset STATUS.LU stays 0 until the
  driver restarts autonegotiation with an MDIC write to the PHY's BMCR (`_init_link`).
* Queue 0 is enabled after reset (RXDCTL0/TXDCTL0.ENABLE = 1): each queue is disabled
  before its ring is programmed (`_disable_queue`).
* SRRCTL.DROP_EN is bit 31, and descriptor-control thresholds are 5 bits wide.
* The write-back error bits differ from the 82599's: RXE is bit 31 (the 82599's bit 29 is
  the 82576's L4E, a TCP/UDP checksum error). RX queues are created with the 82576's RXE
  as their drop mask. Checksum offload is on after reset (RXCSUM = IPOFL | TUOFL) and is
  switched off, since nothing uses it (QEMU does set L4E for bad checksums while TUOFL is
  on). See `_init_rx`.
* There are no per-queue packet/byte counters for the PF (the 82599's QPRC/QPTC):
  per-queue rx/tx packets and bytes come from the data path's own counters.

Every register wait is bounded and every read recognises a removed device (registers.py),
so a dead or unplugged card gives DeviceRemovedError or DeviceTimeoutError, never a hang.
"""

from __future__ import annotations

import logging
import time

from .._datapath import lib
from ..device import ALL_ONES, PciIds
from ..errors import (
    DeviceError,
    DeviceTimeoutError,
)
from . import igb_registers as r
from . import port
from .port import QUEUE_TIMEOUT, DeviceInfo, IntelPort
from .registers import BoundRegister
from .rings import RxQueue, TxQueue

log = logging.getLogger(__name__)

# Bounds on waits, in seconds: upper limits for a healthy device, not delays.
MASTER_DISABLE_TIMEOUT = 0.08  # 800 polls of 100 us (Intel's MASTER_DISABLE_TIMEOUT)
MASTER_DISABLE_POLL = 100e-6
QUIESCE_SETTLE = 0.010  # Linux e1000_reset_hw_82575: RCTL/TCTL off, flush, 10 ms
RESET_SETTLE = 0.001  # let the reset start before CTRL is read again (real hardware)
RESET_TIMEOUT = 1.0  # CTRL.RST clears itself; QEMU clears it inside the write
AUTO_READ_TIMEOUT = 0.010  # Linux AUTO_READ_DONE_TIMEOUT: 10 x 1 ms, then carry on
MDIC_TIMEOUT = 0.1  # Intel: 3 x E1000_GEN_POLL_TIMEOUT (640) polls of 50 us = 96 ms
MDIC_POLL = 50e-6
TX_DRAIN_TIMEOUT = 0.5  # TDH to reach TDT at shutdown

# RX descriptor thresholds: Linux igb's for the 82576 (IGB_RX_PTHRESH 8, IGB_RX_HTHRESH 8,
# IGB_RX_WTHRESH 1 with MSI-X): WTHRESH 1 writes each descriptor back as soon as it is
# done, which a polling driver wants (QEMU's reset value has WTHRESH 1 too).
RX_PTHRESH, RX_HTHRESH, RX_WTHRESH = 8, 8, 1
# TX descriptor thresholds (5-bit fields). WTHRESH must be 0: the data path sets RS only
# on every 32nd descriptor and reclaims by its DD bit; with WTHRESH > 0 the device would
# write back in bursts of its own. PTHRESH 8 / HTHRESH 1 as Linux igb.
TX_PTHRESH, TX_HTHRESH, TX_WTHRESH = 8, 1, 0

RSS_HASH_FIELDS = (
    r.MRQC_IPV4
    | r.MRQC_IPV4_TCP
    | r.MRQC_IPV4_UDP
    | r.MRQC_IPV6
    | r.MRQC_IPV6_TCP
    | r.MRQC_IPV6_UDP
)

# What stats() reports from the MAC: name -> clear-on-read register, summed over instances.
# The names shared with ixgbe.py mean the same; tx_total_bytes, rx_no_buffer and the
# 1000BASE-T error counters are the 82576's own.
_PORT_COUNTERS = {
    "rx_good_packets": "GPRC",
    "rx_good_bytes": "GORC",
    "tx_good_packets": "GPTC",
    "tx_good_bytes": "GOTC",
    "rx_total_packets": "TPR",
    "rx_total_bytes": "TOR",
    "tx_total_packets": "TPT",
    "tx_total_bytes": "TOT",
    "rx_broadcast": "BPRC",
    "rx_multicast": "MPRC",
    "tx_broadcast": "BPTC",
    "tx_multicast": "MPTC",
    "rx_missed": "MPC",
    "rx_no_buffer": "RNBC",
    "crc_errors": "CRCERRS",
    "alignment_errors": "ALGNERRC",
    "symbol_errors": "SYMERRS",
    "rx_errors": "RXERRC",
    "length_errors": "RLEC",
    "rx_undersize": "RUC",
    "rx_fragments": "RFC",
    "rx_oversize": "ROC",
    "rx_jabber": "RJC",
}
# Per-queue counters: the 82576 PF has only the drop counter in hardware ...
_RX_QUEUE_HW_COUNTERS = {"rx_no_descriptor": "RQDPC"}
# ... packets and bytes come from the data path (frames handed to software by rx_batch,
# frames taken by tx_batch; the MAC's count of frames sent is tx_good_packets).
_RX_QUEUE_SW_COUNTERS = {"rx_packets": "packets", "rx_bytes": "bytes"}
_TX_QUEUE_SW_COUNTERS = {"tx_packets": "packets", "tx_bytes": "bytes"}
_QUEUE_KEYS = (*_RX_QUEUE_SW_COUNTERS, "rx_no_descriptor", *_TX_QUEUE_SW_COUNTERS)


def identify(ids: PciIds) -> DeviceInfo:
    """The 82576 device-table entry of a function; UnsupportedDeviceError unless supported."""
    return port.identify(ids, r, driver="igb", supported="82576 copper")


class IgbPort(IntelPort):
    """One 82576 port, initialised and running; `shutdown()` stops it and frees its memory.

    Raises, from the constructor: UnsupportedDeviceError (wrong ID), DeviceRemovedError
    (the function reads all-ones), DeviceTimeoutError (a reset step never completed),
    DeviceError (the PHY does not answer over MDIC), DmaError (no DMA memory). A link that
    stays down is not an error.

    stats(): rx/tx_packets and _bytes are frames handed to software by rx_batch / taken by
    tx_batch, without FCS, summed over the queues (the data path's counters: the 82576 has
    no per-queue hardware counters for them); rx_good_bytes/tx_good_bytes are the MAC's and
    include the FCS. rx_no_descriptor sums RQDPC over the RX queues.
    """

    R = r
    identify = staticmethod(identify)

    # =====================================================================================
    # Bring-up
    # =====================================================================================
    def _bring_up(self) -> None:
        self._disable_interrupts()
        self._disable_master()
        self.dev.set_bus_master(False)  # no DMA until the rings are ours
        self._quiesce()
        self._global_reset()
        self._disable_interrupts()  # mask and clear again after the reset, as Linux does
        self._wait_for_eeprom()
        self.mac = self._read_mac()
        self._init_link()
        self._clear_stats()
        self._init_rx()
        self._init_tx()
        self.dev.set_bus_master(True)  # before any queue is enabled: no DMA without it
        for rxq in self.rx_queues:
            self._start_rx_queue(rxq)
        for txq in self.tx_queues:
            self._start_tx_queue(txq)
        self._enable_rx()
        self.wait_for_link(self.config.link_timeout)

    def _disable_interrupts(self) -> None:
        """Mask every legacy and extended cause, then clear pending ones by reading the
        cause registers (Linux igb_irq_disable, e1000_reset_hw_82575). ixyd polls."""
        self.regs.IMC.write(r.IMC_ALL)
        self.regs.EIMC.write(r.EIMC_ALL)
        self.regs.ICR.read()
        self.regs.EICR.read()

    def _disable_master(self) -> None:
        """Master disable, 82576 form (docs/reference/82576.md#master-disable): set
        CTRL.GIO_MASTER_DISABLE (read-modify-write) and wait for STATUS.GIO to clear. If it
        never does, Intel's 82575 code carries on with the reset (no double reset as on the
        82599), and so does this driver."""
        self.regs.CTRL.set_bits(r.CTRL_GIO_DIS)
        try:
            self.regs.STATUS.wait_clear(
                r.STATUS_GIO, timeout=MASTER_DISABLE_TIMEOUT, max_poll=MASTER_DISABLE_POLL
            )
        except DeviceTimeoutError:
            log.warning(
                "%s: master requests still pending after %g s; resetting anyway",
                self.dev.address,
                MASTER_DISABLE_TIMEOUT,
            )

    def _quiesce(self) -> None:
        """Receive and transmit off before the reset, then let in-flight frames settle."""
        self.regs.RCTL.write(0)
        self.regs.TCTL.write(r.TCTL_PSP)
        time.sleep(QUIESCE_SETTLE)

    def _global_reset(self) -> None:
        """CTRL.RST resets the MAC (on hardware not the PHY; QEMU re-initialises its PHY
        registers too); the bit clears itself.

        QEMU runs the reset inside the write and RST never reads back as 1; real hardware
        needs a moment, so the wait is bounded, not skipped.
        """
        self.regs.CTRL.set_bits(r.CTRL_RST)
        time.sleep(RESET_SETTLE)
        self.regs.CTRL.wait_clear(r.CTRL_RST, timeout=RESET_TIMEOUT)

    def _wait_for_eeprom(self) -> None:
        """82576 difference: never block on EECD.AUTO_RD.

        QEMU never sets it, and boards without an EEPROM may not either. Linux polls it for
        10 ms and carries on with a debug message (e1000_get_auto_rd_done); so does this.
        """
        try:
            self.regs.EECD.wait_set(r.EECD_AUTO_RD, timeout=AUTO_READ_TIMEOUT)
        except DeviceTimeoutError:
            log.debug(
                "%s: EECD.AUTO_RD not set after %g s (QEMU never sets it); continuing",
                self.dev.address,
                AUTO_READ_TIMEOUT,
            )

    def _init_link(self) -> None:
        """82576 difference: the link comes up through the copper PHY.

        CTRL: set link up, clear the link reset that the device reset left set and any
        forced speed/duplex (Linux e1000_setup_copper_link_82575). Then read the PHY's BMCR
        and write it back powered up, with autonegotiation enabled and restarted (Linux
        igb powers the PHY down when it lets go of a port). QEMU raises STATUS.LU about
        500 ms later and never without this restart after a reset
        (docs/reference/82576.md#link-and-the-phy).
        wait_for_link waits for it at the end of init.
        """
        self.regs.CTRL.update(r.CTRL_SLU | r.CTRL_LRST | r.CTRL_FRCSPD | r.CTRL_FRCDPX, r.CTRL_SLU)
        bmcr = self._phy_read(r.MII_BMCR)
        self._phy_write(r.MII_BMCR, bmcr & ~r.BMCR_PDOWN | r.BMCR_AUTOEN | r.BMCR_ANRESTART)

    def _phy_read(self, register: int) -> int:
        """Read a PHY register over MDIC (docs/reference/82576.md#link-and-the-phy)."""
        return self._mdic(r.MDIC_OP_READ, register, 0) & r.MDIC_DATA_MASK

    def _phy_write(self, register: int, value: int) -> None:
        """Write a PHY register over MDIC."""
        self._mdic(r.MDIC_OP_WRITE, register, value)

    def _mdic(self, op: int, register: int, data: int) -> int:
        """One MDIC transaction: write the command, wait for READY, check ERROR.

        Raises DeviceTimeoutError if READY never comes, DeviceError if the PHY reports an
        error: without the PHY the port can never get a link.
        """
        command = (
            op
            | r.PHY_ADDRESS << r.MDIC_PHY_SHIFT
            | register << r.MDIC_REG_SHIFT
            | data & r.MDIC_DATA_MASK
        )
        self.regs.MDIC.write(command)
        value = self.regs.MDIC.wait_set(r.MDIC_READY, timeout=MDIC_TIMEOUT, max_poll=MDIC_POLL)
        if value & r.MDIC_ERROR:
            what = "read" if op == r.MDIC_OP_READ else "write"
            raise DeviceError(
                f"{self.dev.address}: MDIC {what} of PHY {r.PHY_ADDRESS} register {register} "
                f"failed (MDIC {value:#010x}, ERROR set): the internal PHY does not answer, so "
                "the link cannot come up. Is this a copper 82576 port?"
            )
        return value

    def _clear_stats(self) -> None:
        """The statistics clear on read; read each once and start the totals at 0."""
        self.regs.clear_counters()
        # stats() reads every port counter, and the drop counters of the queues in use
        self._counters = {key: self.regs.counters([name]) for key, name in _PORT_COUNTERS.items()}
        for key, name in _RX_QUEUE_HW_COUNTERS.items():
            self._counters[key] = [self.regs.bind(name, q) for q in range(self.config.rx_queues)]

    # ----------------------------------------------------------------------- receive
    def _init_rx(self) -> None:
        """Global receive set-up with RCTL.EN off, then each queue's ring.

        Filters change only while receive is off (the same rule as ixgbe.py). Checksum
        offload (on after reset) is switched off: nothing uses its result, and it would
        only add error bits to the write-back.
        """
        regs = self.regs
        regs.RCTL.write(0)  # off, and no stale filter, loopback or buffer-size bits
        self._clear_address_filters()
        if self.config.rss_enabled:
            self._init_rss()
            regs.RXCSUM.write(r.RXCSUM_PCSD)  # hash in the descriptor; no checksum offload
        else:
            regs.MRQC.write(0)  # no RSS: queue 0 receives everything
            regs.RXCSUM.write(0)  # no checksum offload
        for queue in range(self.config.rx_queues):
            self._init_rx_queue(queue)

    def _clear_address_filters(self) -> None:
        """Keep receive address 0 (the port's MAC), clear the others and the multicast
        table, as Linux e1000_init_hw_82575 does; their contents survive a reset."""
        regs = self.regs
        for entry in range(1, len(regs.RAH)):
            regs.RAH[entry].write(0)  # AV off first, then the address
            regs.RAL[entry].write(0)
        for register in regs.MTA:
            register.write(0)

    @staticmethod
    def _rctl(promisc: bool) -> int:
        """RCTL without EN: broadcast accepted, CRC stripped (exact frame lengths; QEMU
        otherwise appends 4 zero bytes), unicast/multicast promiscuity as asked. 2 KB
        buffers come from SRRCTL; RCTL.BSIZE stays 00 (2048) to agree."""
        rctl = r.RCTL_BAM | r.RCTL_SECRC
        return rctl | r.RCTL_UPE | r.RCTL_MPE if promisc else rctl

    def _init_rss(self) -> None:
        """RSS: hash key, redirection table round-robin over the RX queues, hash fields.

        82576: MRQC bits 2:0 = 010b enable RSS; RETA entries are bytes with the queue in the
        low bits. QEMU hashes only with RXCSUM.PCSD set (written by the caller).
        """
        self._write_rss_tables()
        self.regs.MRQC.write(r.MRQC_ENABLE_RSS | RSS_HASH_FIELDS)

    def _init_rx_queue(self, queue: int) -> None:
        """Per queue: disabled, buffer size and type, ring base and length, head = tail = 0,
        thresholds."""
        regs = self.regs
        self._disable_queue(regs.RXDCTL[queue], r.RXDCTL_ENABLE)
        rxq = RxQueue(
            self.dev,
            queue,
            regs.RDT[queue].offset,
            self.config.rx_ring,
            self.config.buffers_per_rx_queue,
            error_mask=lib.IXYD_RXE_82576,  # RXE is bit 31 here; bit 29 is L4E
        )
        self.rx_queues.append(rxq)
        # 2 KB buffers, advanced one-buffer descriptors; DROP_EN (82576: bit 31) makes a
        # full ring drop and count in RQDPC instead of holding the shared packet buffer.
        # QEMU ignores DROP_EN and holds frames for a full ring in its net queue.
        regs.SRRCTL[queue].write(
            r.SRRCTL_BSIZEPACKET_2K
            | r.SRRCTL_DESCTYPE_ADV_ONEBUF
            | (r.SRRCTL_DROP_EN if self.config.drop_en else 0)
        )
        regs.RDBAL[queue].write(rxq.ring_iova & ALL_ONES)
        regs.RDBAH[queue].write(rxq.ring_iova >> 32)
        regs.RDLEN[queue].write(rxq.ring_bytes)
        regs.RDH[queue].write(0)
        regs.RDT[queue].write(0)
        regs.RXDCTL[queue].update(
            r.DCTL_THRESH_FIELDS,
            RX_PTHRESH << r.DCTL_PTHRESH_SHIFT
            | RX_HTHRESH << r.DCTL_HTHRESH_SHIFT
            | RX_WTHRESH << r.DCTL_WTHRESH_SHIFT,
        )

    def _disable_queue(self, control: BoundRegister, enable: int) -> None:
        """82576 difference: queue 0 comes out of reset enabled. A ring's base and length
        may only change while its queue is disabled (Linux igb_configure_rx/tx_ring)."""
        control.clear_bits(enable)
        control.wait_clear(enable, timeout=QUEUE_TIMEOUT)

    # ----------------------------------------------------------------------- transmit
    def _init_tx(self) -> None:
        """Transmit set-up: TCTL off, inter-packet gap, collision distance, rings, TCTL.EN.

        TCTL.EN goes on before any TXDCTL.ENABLE (as DMATXCTL.TE on the 82599); TCTL keeps
        PSP (pad short frames: QEMU does not pad, real hardware does with PSP), the
        collision threshold and the full-duplex collision distance
        (docs/reference/82576.md#tx-set-up). Linux programs the collision distance in
        TCTL_EXT on 82575-class parts; both are written.
        """
        regs = self.regs
        regs.TCTL.write(r.TCTL_PSP)
        regs.TIPG.write(r.TIPG_COPPER)
        regs.TCTL_EXT.update(r.TCTL_EXT_COLD_MASK, r.COLLISION_DISTANCE << r.TCTL_EXT_COLD_SHIFT)
        for queue in range(self.config.tx_queues):
            self._init_tx_queue(queue)
        regs.TCTL.write(r.TCTL_EN | r.TCTL_PSP | r.TCTL_CT | r.TCTL_COLD_FULL_DUPLEX)

    def _init_tx_queue(self, queue: int) -> None:
        """Per queue: disabled, ring base and length, prefetch/host/write-back thresholds."""
        regs = self.regs
        self._disable_queue(regs.TXDCTL[queue], r.TXDCTL_ENABLE)
        txq = TxQueue(self.dev, queue, regs.TDT[queue].offset, self.config.tx_ring)
        self.tx_queues.append(txq)
        regs.TDBAL[queue].write(txq.ring_iova & ALL_ONES)
        regs.TDBAH[queue].write(txq.ring_iova >> 32)
        regs.TDLEN[queue].write(txq.ring_bytes)
        regs.TXDCTL[queue].update(
            r.DCTL_THRESH_FIELDS,
            TX_PTHRESH << r.DCTL_PTHRESH_SHIFT
            | TX_HTHRESH << r.DCTL_HTHRESH_SHIFT
            | TX_WTHRESH << r.DCTL_WTHRESH_SHIFT,
        )

    # ----------------------------------------------------------------------- start
    def _enable_rx(self) -> None:
        """The last step of receive set-up: RCTL with EN and the filter bits."""
        self.regs.RCTL.write(self._rctl(self.promisc) | r.RCTL_EN)

    # =====================================================================================
    # Running
    # =====================================================================================
    def link(self) -> tuple[bool, int]:
        """(up, speed in Mb/s); speed is 0 while down. DeviceRemovedError if the card is gone
        (an all-ones STATUS is never taken for "up at 1000")."""
        with self._lock:
            self._check_open()
            status = self.regs.STATUS.read()
        if not status & r.STATUS_LU:
            return False, 0
        return True, r.STATUS_SPEED_MBPS[(status & r.STATUS_SPEED_MASK) >> r.STATUS_SPEED_SHIFT]

    def set_promisc(self, on: bool) -> None:
        """Accept (on) or filter (off) frames for other unicast and multicast addresses.

        The filters change only while receive is disabled (the rule ixgbe.py follows), so
        RCTL.EN is cleared around the change; frames arriving in that moment are not
        received.
        """
        with self._lock:
            self._check_open()
            enable = self.regs.RCTL.read() & r.RCTL_EN
            if enable:
                self.regs.RCTL.clear_bits(r.RCTL_EN)
            self.regs.RCTL.write(self._rctl(on))
            if enable:
                self.regs.RCTL.write(self._rctl(on) | r.RCTL_EN)
            self.promisc = on

    def queue_stats(self) -> dict[str, list[int]]:
        """Per-queue 64-bit totals: rx_packets, rx_bytes, rx_no_descriptor (one entry per RX
        queue), tx_packets, tx_bytes (one per TX queue). Reads the counters like stats()."""
        with self._lock:
            self._accumulate()
            out = self._software_queue_counters()
            out["rx_no_descriptor"] = [c.total for c in self._counters["rx_no_descriptor"]]
        return {key: out[key] for key in _QUEUE_KEYS}

    def _software_queue_counters(self) -> dict[str, list[int]]:
        """The data path's per-queue counters (plain 64-bit loads: a worker may be a batch
        ahead, never torn)."""
        out = {
            key: [rxq.stats[field] for rxq in self.rx_queues]
            for key, field in _RX_QUEUE_SW_COUNTERS.items()
        }
        out.update(
            {
                key: [txq.stats[field] for txq in self.tx_queues]
                for key, field in _TX_QUEUE_SW_COUNTERS.items()
            }
        )
        return out

    def _software_totals(self) -> dict[str, int]:
        return {key: sum(values) for key, values in self._software_queue_counters().items()}

    # =====================================================================================
    # Shutdown
    # =====================================================================================
    def _stop_steps(self) -> tuple:
        """Receive off, queues off, TX drained, transmit off, master disable (Linux igb_down)."""
        return (
            self._disable_rx,
            self._stop_rx_queues,
            self._drain_tx,
            self._stop_tx_queues,
            self._disable_tx,
            self._disable_master,
        )

    def _disable_rx(self) -> None:
        """No more frames from the wire into the packet buffer."""
        self.regs.RCTL.clear_bits(r.RCTL_EN)

    def _stop_rx_queues(self) -> None:
        """Clear RXDCTL.ENABLE; it reads 0 once the queue is idle."""
        for rxq in self.rx_queues:
            self.regs.RXDCTL[rxq.index].clear_bits(r.RXDCTL_ENABLE)
        for rxq in self.rx_queues:
            self.regs.RXDCTL[rxq.index].wait_clear(r.RXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)

    def _drain_tx(self) -> None:
        """Let queued frames leave (TDH reaches TDT); nothing leaves while the link is down."""
        if not self.regs.STATUS.read() & r.STATUS_LU:
            return
        for txq in self.tx_queues:
            tail = self.regs.TDT[txq.index].read()
            self.regs.TDH[txq.index].wait_equal(ALL_ONES, tail, timeout=TX_DRAIN_TIMEOUT)

    def _stop_tx_queues(self) -> None:
        """Clear TXDCTL.ENABLE (Linux igb writes the whole register 0 to stop a queue)."""
        for txq in self.tx_queues:
            self.regs.TXDCTL[txq.index].clear_bits(r.TXDCTL_ENABLE)
        for txq in self.tx_queues:
            self.regs.TXDCTL[txq.index].wait_clear(r.TXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)

    def _disable_tx(self) -> None:
        """Transmit off (Linux igb_down)."""
        self.regs.TCTL.clear_bits(r.TCTL_EN)
