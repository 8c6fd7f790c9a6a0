"""The 82599 (ixgbe) driver: bring a port up as datasheet section 4.6 describes, keep it
observable, take it down cleanly.

Bring-up, one small step per datasheet step (section numbers: 82599 datasheet 331520;
facts: docs/reference/82599.md):

    identify                     device ID table (ixgbe_registers.DEVICES)
    disable_interrupts           4.6.3.1
    disable_master               spec update item 9, Master Disable Flow (82599.md#master-disable)
    global_reset                 4.6.3.2
    wait_for_eeprom_and_dma      4.6.3
    read_mac                     RAL0/RAH0
    init_link                    4.6.4
    clear_stats                  4.6.5
    init_rx                      4.6.7, with the ixy.rs #29 corrections
    init_tx                      4.6.8, with the ixy.rs #29 corrections
    start_rx_queue/start_tx_queue   4.6.7 / 4.6.8 (bus mastering on first)
    enable_rx                    RXCTRL.RXEN, last
    wait_for_link                bounded; a link still down is reported, not fatal

Every register wait is bounded and every read recognises a removed device (registers.py),
so a dead or unplugged card gives DeviceRemovedError or DeviceTimeoutError, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from ..device import ALL_ONES, PciIds
from ..errors import DeviceTimeoutError
from . import ixgbe_registers as r
from . import port
from .port import QUEUE_TIMEOUT, DeviceInfo, IntelPort
from .registers import RegisterArray
from .rings import RxQueue, TxQueue

log = logging.getLogger(__name__)

# Bounds on waits, in seconds: upper limits for a healthy device, not delays.
MASTER_DISABLE_TIMEOUT = 0.08  # 800 polls of 100 us (Intel's IXGBE_PCI_PRIMARY_DISABLE_TIMEOUT)
MASTER_DISABLE_POLL = 100e-6
RESET_TIMEOUT = 1.0  # CTRL.RST and CTRL.LRST clear themselves when the reset is done
RESET_SETTLE = 0.010  # at least 10 ms after a global reset (datasheet 4.6.3.2)
EEPROM_TIMEOUT = 1.0  # EEC.ARD and RDRXCTL.DMAIDONE after reset
TX_DRAIN_TIMEOUT = 0.5  # TDH to reach TDT at shutdown

# Packet buffers: without DCB one buffer gets the whole memory, as Linux and DPDK do
# (ixy gives RX only 128 of the 512 KB and TX 40 of the 160 KB).
RX_PACKET_BUFFER_KB = r.RXPB_TOTAL_KB
TX_PACKET_BUFFER_KB = r.TXPB_TOTAL_KB

# TX descriptor thresholds (docs/reference/82599.md#tx-queue-registers). WTHRESH must be 0:
# the data path sets RS only on every 32nd descriptor and reclaims by its DD bit; with
# WTHRESH > 0 the device would ignore RS and write back in bursts of its own. PTHRESH 32 /
# HTHRESH 1 as Linux.
TX_PTHRESH, TX_HTHRESH, TX_WTHRESH = 32, 1, 0

RSS_HASH_FIELDS = (
    r.MRQC_IPV4
    | r.MRQC_IPV4_TCP
    | r.MRQC_IPV4_UDP
    | r.MRQC_IPV6
    | r.MRQC_IPV6_TCP
    | r.MRQC_IPV6_UDP
)

# What stats() reports: name -> clear-on-read register, summed over the instances read.
_PORT_COUNTERS = {
    "rx_good_packets": "GPRC",
    "rx_good_bytes": "GORC",
    "tx_good_packets": "GPTC",
    "tx_good_bytes": "GOTC",
    "rx_total_packets": "TPR",
    "rx_total_bytes": "TOR",
    "tx_total_packets": "TPT",
    "rx_broadcast": "BPRC",
    "rx_multicast": "MPRC",
    "tx_broadcast": "BPTC",
    "tx_multicast": "MPTC",
    "rx_missed": "MPC",
    "crc_errors": "CRCERRS",
    "illegal_byte_errors": "ILLERRC",
    "error_bytes": "ERRBC",
    "rx_short_discards": "MSPDC",
    "length_errors": "RLEC",
    "rx_undersize": "RUC",
    "rx_fragments": "RFC",
    "rx_oversize": "ROC",
    "rx_jabber": "RJC",
    "mac_local_faults": "MLFC",
    "mac_remote_faults": "MRFC",
}
# Per-queue totals, from the stat counter each queue is mapped to (RQSMR/TQSM: queue n -> n).
# rx_packets comes from QPRC, not GPRC: GPRC also counts missed packets (erratum, DPDK).
_RX_QUEUE_COUNTERS = {"rx_packets": "QPRC", "rx_bytes": "QBRC", "rx_no_descriptor": "QPRDC"}
_TX_QUEUE_COUNTERS = {"tx_packets": "QPTC", "tx_bytes": "QBTC"}


def identify(ids: PciIds) -> DeviceInfo:
    """The 82599 device-table entry of a function; UnsupportedDeviceError unless supported."""
    return port.identify(ids, r, driver="ixgbe", supported="82599 / X520")


class IxgbePort(IntelPort):
    """One 82599 port, initialised and running; `shutdown()` stops it and frees its memory.

    Raises, from the constructor: UnsupportedDeviceError (wrong ID), DeviceRemovedError
    (the function reads all-ones), DeviceTimeoutError (a reset step never completed),
    DmaError (no DMA memory). A link that stays down is not an error.

    stats(): rx/tx_packets and _bytes are frames handed to / taken from the rings, without
    FCS (the per-queue counters); rx_good_bytes/tx_good_bytes include the FCS.
    """

    R = r
    identify = staticmethod(identify)

    # =====================================================================================
    # Bring-up
    # =====================================================================================
    def _bring_up(self) -> None:
        self._disable_interrupts()
        clean = self._disable_master()
        self.dev.set_bus_master(False)  # no DMA until the rings are ours
        self._global_reset()
        if not clean:
            self._global_reset()  # spec update 9: GIO may stick; reset twice
        self._disable_interrupts()
        self._wait_for_eeprom_and_dma()
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
        """4.6.3.1: mask every cause (bit 31 is reserved) and clear pending ones by reading EICR.

        ixyd polls its queues; no interrupt is ever enabled.
        """
        self.regs.EIMC.write(r.EIMC_ALL)
        self.regs.EICR.read()

    def _disable_master(self) -> bool:
        """Stop new master requests and wait for the pending ones (master disable:
        docs/reference/82599.md#master-disable).

        Returns False when STATUS.GIO never cleared; the spec update then asks for two
        resets. (The PCIe Transaction Pending poll needs config space, which the device
        seam does not offer.)
        """
        self.regs.CTRL.write(r.CTRL_GIO_DIS)  # the whole register, as Intel's code does
        try:
            self.regs.STATUS.wait_clear(
                r.STATUS_GIO, timeout=MASTER_DISABLE_TIMEOUT, max_poll=MASTER_DISABLE_POLL
            )
        except DeviceTimeoutError:
            log.warning(
                "%s: master requests still pending after %g s; will reset twice",
                self.dev.address,
                MASTER_DISABLE_TIMEOUT,
            )
            return False
        return True

    def _global_reset(self) -> None:
        """4.6.3.2: device and link reset; both bits clear themselves, then 10 ms of quiet."""
        self.regs.CTRL.write(r.CTRL_RST_MASK)
        self.regs.CTRL.wait_clear(r.CTRL_RST_MASK, timeout=RESET_TIMEOUT)
        time.sleep(RESET_SETTLE)

    def _wait_for_eeprom_and_dma(self) -> None:
        """4.6.3: the EEPROM auto-read and the DMA initialisation must finish after a reset."""
        self.regs.EEC.wait_set(r.EEC_ARD, timeout=EEPROM_TIMEOUT)
        self.regs.RDRXCTL.wait_set(r.RDRXCTL_DMAIDONE, timeout=EEPROM_TIMEOUT)

    def _init_link(self) -> None:
        """4.6.4: 10G serial link mode, XAUI PMA/PMD, restart autonegotiation.

        The link comes up on its own time; wait_for_link waits for it at the end of init.
        Intel's reset code first re-enables a link the NVM disabled (AUTOC2,
        docs/reference/82599.md#stop-and-reset).
        """
        self.regs.AUTOC2.clear_bits(r.AUTOC2_LINK_DISABLE_MASK)
        self.regs.AUTOC.update(
            r.AUTOC_LMS_MASK | r.AUTOC_10G_PMA_PMD_MASK, r.AUTOC_LMS_10G_SERIAL | r.AUTOC_10G_XAUI
        )
        self.regs.AUTOC.set_bits(r.AUTOC_AN_RESTART)

    def _clear_stats(self) -> None:
        """4.6.5: the statistics clear on read; read each once and start the totals at 0."""
        self.regs.clear_counters()
        # stats() reads every port counter, and the per-queue counters of the queues in use
        self._counters = {key: self.regs.counters([name]) for key, name in _PORT_COUNTERS.items()}
        for key, name in _RX_QUEUE_COUNTERS.items():
            self._counters[key] = [self.regs.bind(name, q) for q in range(self.config.rx_queues)]
        for key, name in _TX_QUEUE_COUNTERS.items():
            self._counters[key] = [self.regs.bind(name, q) for q in range(self.config.tx_queues)]

    # ----------------------------------------------------------------------- receive
    def _init_rx(self) -> None:
        """4.6.7: global receive set-up with RXEN off, then each queue's ring."""
        regs = self.regs
        regs.RXCTRL.clear_bits(r.RXCTRL_RXEN)  # filters and queues change only with RX off
        regs.RXPBSIZE[0].write(RX_PACKET_BUFFER_KB << r.PBSIZE_KB_SHIFT)
        for pb in range(1, len(regs.RXPBSIZE)):
            regs.RXPBSIZE[pb].write(0)
        # Strip the FCS; HLREG0 and RDRXCTL must agree (docs/reference/82599.md#general-registers).
        regs.HLREG0.set_bits(r.HLREG0_RXCRCSTRP)
        # RSCFRSTSIZE must be 0, RSCACKC and FCOE_WRFIX 1: reserved defaults the hardware
        # needs (ixy.rs #29; Linux ixgbe_setup_rdrxctl).
        regs.RDRXCTL.update(
            r.RDRXCTL_CRCSTRIP | r.RDRXCTL_RSCFRSTSIZE | r.RDRXCTL_RSCACKC | r.RDRXCTL_FCOE_WRFIX,
            r.RDRXCTL_CRCSTRIP | r.RDRXCTL_RSCACKC | r.RDRXCTL_FCOE_WRFIX,
        )
        regs.FCTRL.write(self._filter_bits(regs.FCTRL.read(), self.promisc))
        if self.config.rss_enabled:
            self._init_rss()
        else:
            regs.MRQC.write(0)  # no RSS: queue 0 receives everything
        for queue in range(self.config.rx_queues):
            self._init_rx_queue(queue)
        regs.CTRL_EXT.set_bits(r.CTRL_EXT_NS_DIS)  # last sentence of 4.6.7 (ixy)

    @staticmethod
    def _filter_bits(fctrl: int, promisc: bool) -> int:
        """FCTRL with broadcast accepted and unicast/multicast promiscuity as asked."""
        fctrl |= r.FCTRL_BAM
        promisc_bits = r.FCTRL_UPE | r.FCTRL_MPE
        return fctrl | promisc_bits if promisc else fctrl & ~promisc_bits

    def _init_rss(self) -> None:
        """7.1.2.8: hash key, redirection table round-robin over the RX queues, hash fields.

        RXCSUM.PCSD makes the descriptor carry the hash instead of the IP checksum.
        """
        self._write_rss_tables()
        self.regs.MRQC.write(r.MRQC_MRQE_RSS | RSS_HASH_FIELDS)
        self.regs.RXCSUM.set_bits(r.RXCSUM_PCSD)

    def _init_rx_queue(self, queue: int) -> None:
        """4.6.7, per queue: buffer size and type, ring base and length, head = tail = 0."""
        regs = self.regs
        rxq = RxQueue(
            self.dev,
            queue,
            regs.RDT[queue].offset,
            self.config.rx_ring,
            self.config.buffers_per_rx_queue,
        )
        self.rx_queues.append(rxq)
        # 2 KB buffers, written explicitly (ixy relies on the reset default); advanced
        # one-buffer descriptors; DROP_EN: a full ring drops (counted in QPRDC) instead
        # of holding the shared packet buffer and stalling every other queue.
        regs.SRRCTL[queue].update(
            r.SRRCTL_BSIZEPACKET_MASK | r.SRRCTL_DESCTYPE_MASK | r.SRRCTL_DROP_EN,
            r.SRRCTL_BSIZEPACKET_2K
            | r.SRRCTL_DESCTYPE_ADV_ONEBUF
            | (r.SRRCTL_DROP_EN if self.config.drop_en else 0),
        )
        regs.RDBAL[queue].write(rxq.ring_iova & ALL_ONES)
        regs.RDBAH[queue].write(rxq.ring_iova >> 32)
        regs.RDLEN[queue].write(rxq.ring_bytes)
        regs.RDH[queue].write(0)
        regs.RDT[queue].write(0)
        regs.DCA_RXCTRL[queue].clear_bits(r.DCA_RXCTRL_RESERVED_12)  # resets to 1, must be 0
        self._map_stat_counter(regs.RQSMR, queue)

    @staticmethod
    def _map_stat_counter(mapping_registers: RegisterArray, queue: int) -> None:
        """Count queue n in statistics counter n (RQSMR/TQSM: 4 bits per queue, one byte each)."""
        shift = 8 * (queue % 4)
        mapping_registers[queue // 4].update(r.QSM_FIELD_MASK << shift, queue << shift)

    # ----------------------------------------------------------------------- transmit
    def _init_tx(self) -> None:
        """4.6.8: CRC and padding, packet buffer, DMA limits, queue layout, rings, TE."""
        regs = self.regs
        regs.HLREG0.set_bits(r.HLREG0_TXCRCEN | r.HLREG0_TXPADEN)
        regs.TXPBSIZE[0].write(TX_PACKET_BUFFER_KB << r.PBSIZE_KB_SHIFT)
        for pb in range(1, len(regs.TXPBSIZE)):
            regs.TXPBSIZE[pb].write(0)
        regs.DTXMXSZRQ.write(r.DTXMXSZRQ_MAX)  # 0xFFF: bits 15:12 are reserved (ixy.rs #29)
        # MTQC may only change with the descriptor arbiter off (Linux, DPDK).
        regs.RTTDCS.set_bits(r.RTTDCS_ARBDIS)
        regs.MTQC.write(r.MTQC_64Q_1PB)
        regs.RTTDCS.clear_bits(r.RTTDCS_ARBDIS)
        for queue in range(self.config.tx_queues):
            self._init_tx_queue(queue)
        regs.DMATXCTL.set_bits(r.DMATXCTL_TE)  # before any TXDCTL.ENABLE (Linux)

    def _init_tx_queue(self, queue: int) -> None:
        """4.6.8, per queue: ring base and length, prefetch/host/write-back thresholds."""
        regs = self.regs
        txq = TxQueue(self.dev, queue, regs.TDT[queue].offset, self.config.tx_ring)
        self.tx_queues.append(txq)
        regs.TDBAL[queue].write(txq.ring_iova & ALL_ONES)
        regs.TDBAH[queue].write(txq.ring_iova >> 32)
        regs.TDLEN[queue].write(txq.ring_bytes)
        m = r.TXDCTL_THRESH_MASK
        regs.TXDCTL[queue].update(
            m << r.TXDCTL_PTHRESH_SHIFT | m << r.TXDCTL_HTHRESH_SHIFT | m << r.TXDCTL_WTHRESH_SHIFT,
            TX_PTHRESH << r.TXDCTL_PTHRESH_SHIFT
            | TX_HTHRESH << r.TXDCTL_HTHRESH_SHIFT
            | TX_WTHRESH << r.TXDCTL_WTHRESH_SHIFT,
        )
        self._map_stat_counter(regs.TQSM, queue)

    # ----------------------------------------------------------------------- start
    def _enable_rx(self) -> None:
        """The last step of receive set-up: RXCTRL.RXEN."""
        self.regs.RXCTRL.set_bits(r.RXCTRL_RXEN)

    # =====================================================================================
    # Running
    # =====================================================================================
    def link(self) -> tuple[bool, int]:
        """(up, speed in Mb/s); speed is 0 while down. DeviceRemovedError if the card is gone
        (an all-ones LINKS is never taken for "up at 10G")."""
        with self._lock:
            self._check_open()
            links = self.regs.LINKS.read()
        if not links & r.LINKS_UP:
            return False, 0
        return True, r.LINKS_SPEED_MBPS.get(links & r.LINKS_SPEED_MASK, 0)

    def set_promisc(self, on: bool) -> None:
        """Accept (on) or filter (off) frames for other unicast and multicast addresses.

        The filters may only change while receive is disabled (ixy.rs #29), so RXEN is
        cleared around the change; frames arriving in that moment are not received.
        """
        with self._lock:
            self._check_open()
            with self._receive_disabled():
                self.regs.FCTRL.write(self._filter_bits(self.regs.FCTRL.read(), on))
            self.promisc = on

    @contextlib.contextmanager
    def _receive_disabled(self) -> Iterator[None]:
        was_on = self.regs.RXCTRL.read() & r.RXCTRL_RXEN
        if was_on:
            self.regs.RXCTRL.clear_bits(r.RXCTRL_RXEN)
        try:
            yield
        finally:
            if was_on:
                self.regs.RXCTRL.set_bits(r.RXCTRL_RXEN)

    def queue_stats(self) -> dict[str, list[int]]:
        """Per-queue 64-bit totals: rx_packets, rx_bytes, rx_no_descriptor (one entry per RX
        queue), tx_packets, tx_bytes (one per TX queue). Reads the counters like stats()."""
        with self._lock:
            self._accumulate()
            return {
                key: [c.total for c in self._counters[key]]
                for key in (*_RX_QUEUE_COUNTERS, *_TX_QUEUE_COUNTERS)
            }

    # =====================================================================================
    # Shutdown
    # =====================================================================================
    def _stop_steps(self) -> tuple:
        """Intel's stop sequence, stop part (docs/reference/82599.md#stop-and-reset): receive
        off, queues off, TX drained, master disable."""
        return (
            self._disable_rx,
            self._stop_rx_queues,
            self._drain_tx,
            self._stop_tx_queues,
            self._disable_master,
        )

    def _disable_rx(self) -> None:
        """No more frames from the wire into the packet buffer."""
        self.regs.RXCTRL.clear_bits(r.RXCTRL_RXEN)

    def _stop_rx_queues(self) -> None:
        """Clear RXDCTL.ENABLE and flush each queue; ENABLE reads 0 once the queue is idle."""
        for rxq in self.rx_queues:
            self.regs.RXDCTL[rxq.index].update(r.RXDCTL_ENABLE | r.RXDCTL_SWFLSH, r.RXDCTL_SWFLSH)
        for rxq in self.rx_queues:
            self.regs.RXDCTL[rxq.index].wait_clear(r.RXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)

    def _drain_tx(self) -> None:
        """Let queued frames leave (TDH reaches TDT); nothing leaves while the link is down."""
        if not self.regs.LINKS.read() & r.LINKS_UP:
            return
        for txq in self.tx_queues:
            tail = self.regs.TDT[txq.index].read()
            self.regs.TDH[txq.index].wait_equal(ALL_ONES, tail, timeout=TX_DRAIN_TIMEOUT)

    def _stop_tx_queues(self) -> None:
        """TXDCTL = SWFLSH flushes each queue and clears ENABLE (Intel's stop sequence)."""
        for txq in self.tx_queues:
            self.regs.TXDCTL[txq.index].write(r.TXDCTL_SWFLSH)
        for txq in self.tx_queues:
            self.regs.TXDCTL[txq.index].wait_clear(r.TXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)
