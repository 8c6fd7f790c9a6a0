"""The 82599 (ixgbe) driver: bring a port up as datasheet section 4.6 describes, keep it
observable, take it down cleanly.

Bring-up, one small step per datasheet step (section numbers: 82599 datasheet 331520;
facts: shared/reference/nic-facts.md):

    identify                     device ID table (ixgbe_registers.DEVICES)
    disable_interrupts           4.6.3.1
    disable_master               spec update item 9, Master Disable Flow (nic-facts §D.1)
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
import threading
import time
from collections.abc import Iterator
from typing import Self

from ..device import ALL_ONES, PciFunction, PciIds
from ..errors import (
    DeviceError,
    DeviceRemovedError,
    DeviceTimeoutError,
    IxydError,
    UnsupportedDeviceError,
)
from . import ixgbe_registers as r
from .config import PortConfig
from .registers import BoundRegister, RegisterArray, RegisterFile
from .rings import RxQueue, TxQueue

log = logging.getLogger(__name__)

# Bounds on waits, in seconds: upper limits for a healthy device, not delays.
MASTER_DISABLE_TIMEOUT = 0.08  # 800 polls of 100 us (Intel's IXGBE_PCI_PRIMARY_DISABLE_TIMEOUT)
MASTER_DISABLE_POLL = 100e-6
RESET_TIMEOUT = 1.0  # CTRL.RST and CTRL.LRST clear themselves when the reset is done
RESET_SETTLE = 0.010  # at least 10 ms after a global reset (datasheet 4.6.3.2)
EEPROM_TIMEOUT = 1.0  # EEC.ARD and RDRXCTL.DMAIDONE after reset
QUEUE_TIMEOUT = 0.5  # RXDCTL/TXDCTL.ENABLE to read back as written
TX_DRAIN_TIMEOUT = 0.5  # TDH to reach TDT at shutdown
LINK_POLL = 0.010

# Packet buffers: without DCB one buffer gets the whole memory, as Linux and DPDK do
# (ixy gives RX only 128 of the 512 KB and TX 40 of the 160 KB).
RX_PACKET_BUFFER_KB = r.RXPB_TOTAL_KB
TX_PACKET_BUFFER_KB = r.TXPB_TOTAL_KB

# TX descriptor thresholds (nic-facts §A.4). WTHRESH must be 0: the data path sets RS only
# on every 32nd descriptor and reclaims by its DD bit; with WTHRESH > 0 the device would
# ignore RS and write back in bursts of its own. PTHRESH 32 / HTHRESH 1 as Linux.
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


def identify(ids: PciIds) -> r.DeviceInfo:
    """Look a function up in the device table.

    Raises UnsupportedDeviceError unless it is a supported physical function.
    """
    if ids.vendor_id != r.INTEL_VENDOR_ID:
        raise UnsupportedDeviceError(
            f"{ids}: not an Intel device (vendor {ids.vendor_id:#06x}); "
            "the ixgbe driver drives 8086:xxxx functions only"
        )
    if ids.device_id in r.VIRTUAL_FUNCTIONS:
        raise UnsupportedDeviceError(
            f"{ids} is an SR-IOV virtual function ({r.VIRTUAL_FUNCTIONS[ids.device_id]}), "
            "not supported: "
            "ixyd drives physical functions; give it the PF instead"
        )
    info = r.DEVICES.get(ids.device_id)
    if info is None:
        raise UnsupportedDeviceError(
            f"{ids}: unknown device ID {ids.device_id:#06x}; supported: 82599 / X520 "
            f"({', '.join(f'{d:#06x}' for d, i in r.DEVICES.items() if i.supported)})"
        )
    if not info.supported:
        raise UnsupportedDeviceError(
            f"{ids} is an {info.name} ({info.family} family), not supported yet: "
            f"{r.UNSUPPORTED_FAMILY_REASONS[info.family]}"
        )
    return info


class IxgbePort:
    """One 82599 port, initialised and running; `shutdown()` stops it and frees its memory.

    Raises, from the constructor: UnsupportedDeviceError (wrong ID), DeviceRemovedError
    (the function reads all-ones), DeviceTimeoutError (a reset step never completed),
    DmaError (no DMA memory). A link that stays down is not an error.
    """

    def __init__(self, dev: PciFunction, config: PortConfig | None = None):
        self.dev = dev
        self.config = config if config is not None else PortConfig()
        self.info = identify(dev.ids)
        self.regs = RegisterFile(dev, r.REGISTERS)
        self.rx_queues: list[RxQueue] = []
        self.tx_queues: list[TxQueue] = []
        self.mac = b""
        self.promisc = self.config.promisc
        self._lock = threading.RLock()  # control-plane register sequences; workers touch only tails
        self._counters: dict[str, list[BoundRegister]] = {}  # stats key -> instances read
        self._closed = False
        try:
            self._reset_and_init()
        except BaseException:
            self._shutdown_after_failed_init()
            raise

    def __repr__(self) -> str:
        state = (
            "shut down"
            if self._closed
            else f"{len(self.rx_queues)} RX / {len(self.tx_queues)} TX queues"
        )
        return f"<IxgbePort {self.dev.address} {self.info.name} {self.mac_address} {state}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def mac_address(self) -> str:
        """The port's MAC address as text, e.g. '02:1b:21:99:00:00'."""
        return ":".join(f"{b:02x}" for b in self.mac)

    @property
    def closed(self) -> bool:
        return self._closed

    # =====================================================================================
    # Bring-up
    # =====================================================================================
    def _reset_and_init(self) -> None:
        self._check_present()
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

    def _check_present(self) -> None:
        """An unplugged card, or one whose BAR is not live, reads all-ones: say so at once."""
        try:
            self.regs.check_removed()
        except DeviceRemovedError as exc:
            raise DeviceRemovedError(
                f"{exc}; nothing was initialised. Check that the card is present (lspci), powered "
                "(D0) and that its PCIe link is up"
            ) from None

    def _disable_interrupts(self) -> None:
        """4.6.3.1: mask every cause (bit 31 is reserved) and clear pending ones by reading EICR.

        ixyd polls its queues; no interrupt is ever enabled.
        """
        self.regs.EIMC.write(r.EIMC_ALL)
        self.regs.EICR.read()

    def _disable_master(self) -> bool:
        """nic-facts §D.1: stop new master requests and wait for the pending ones.

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

    def _read_mac(self) -> bytes:
        """Receive address 0 holds the EEPROM's MAC after reset (nic-facts §A.8)."""
        low, high = self.regs.RAL[0].read(), self.regs.RAH[0].read()
        if not high & r.RAH_AV:
            log.warning(
                "%s: receive address 0 is not marked valid; unicast filtering may drop everything",
                self.dev.address,
            )
        return low.to_bytes(4, "little") + (high & r.RAH_ADDRESS_MASK).to_bytes(2, "little")

    def _init_link(self) -> None:
        """4.6.4: 10G serial link mode, XAUI PMA/PMD, restart autonegotiation.

        The link comes up on its own time; wait_for_link waits for it at the end of init.
        Intel's reset code first re-enables a link the NVM disabled (AUTOC2, nic-facts §D.3).
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
        # Strip the FCS; HLREG0 and RDRXCTL must agree (nic-facts §A.2).
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
        regs = self.regs
        key = self.config.rss_key or r.RSS_DEFAULT_KEY
        for i, register in enumerate(regs.RSSRK):
            register.write(
                int.from_bytes(key[4 * i : 4 * i + 4], "little")
            )  # key byte 0 in bits 7:0
        queues = self.config.rx_queues
        for i, register in enumerate(regs.RETA):
            entries = [(4 * i + k) % queues for k in range(4)]  # entry e is byte e & 3
            register.write(int.from_bytes(bytes(entries), "little"))
        regs.MRQC.write(r.MRQC_MRQE_RSS | RSS_HASH_FIELDS)
        regs.RXCSUM.set_bits(r.RXCSUM_PCSD)

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
    def _start_rx_queue(self, rxq: RxQueue) -> None:
        """Arm the ring, enable the queue, then hand the device all descriptors but one."""
        rxq.fill()
        q = rxq.index
        self.regs.RXDCTL[q].set_bits(r.RXDCTL_ENABLE)
        self.regs.RXDCTL[q].wait_set(r.RXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)
        self.regs.RDH[q].write(0)
        # RDT == RDH would mean "no descriptor for the device": leave one slot unused.
        self.regs.RDT[q].write(rxq.size - 1)

    def _start_tx_queue(self, txq: TxQueue) -> None:
        """Empty ring (TDH = TDT = 0), then enable the queue."""
        q = txq.index
        self.regs.TDH[q].write(0)
        self.regs.TDT[q].write(0)
        self.regs.TXDCTL[q].set_bits(r.TXDCTL_ENABLE)
        self.regs.TXDCTL[q].wait_set(r.TXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)

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

    def wait_for_link(self, timeout: float) -> bool:
        """Wait up to timeout seconds for the link; return whether it is up. Never raises for a
        link that stays down (DeviceRemovedError if the card is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            up, speed = self.link()
            if up:
                log.info("%s: link up at %d Mb/s", self.dev.address, speed)
                return True
            if time.monotonic() >= deadline:
                if timeout > 0:
                    log.warning(
                        "%s: link still down after %g s; the port works once it comes up",
                        self.dev.address,
                        timeout,
                    )
                return False
            time.sleep(LINK_POLL)

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

    def stats(self) -> dict[str, int]:
        """Port statistics as 64-bit totals since init.

        Each clear-on-read register is read once per call and added to its total.
        rx/tx_packets and _bytes are frames handed to / taken from the rings, without FCS
        (from the per-queue counters); rx_good_bytes/tx_good_bytes include the FCS.
        Raises DeviceRemovedError if the card is gone.
        """
        with self._lock:
            self._accumulate()
            return {key: sum(c.total for c in counters) for key, counters in self._counters.items()}

    def queue_stats(self) -> dict[str, list[int]]:
        """Per-queue 64-bit totals: rx_packets, rx_bytes, rx_no_descriptor (one entry per RX
        queue), tx_packets, tx_bytes (one per TX queue). Reads the counters like stats()."""
        with self._lock:
            self._accumulate()
            return {
                key: [c.total for c in self._counters[key]]
                for key in (*_RX_QUEUE_COUNTERS, *_TX_QUEUE_COUNTERS)
            }

    def _accumulate(self) -> None:
        self._check_open()
        for counters in self._counters.values():
            for counter in counters:
                counter.accumulate()

    def check_removed(self) -> None:
        """Raise DeviceRemovedError if the card reads all-ones (unplugged, link lost, reset)."""
        self.regs.check_removed()

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError(f"{self.dev.address}: the port is shut down")

    # =====================================================================================
    # Shutdown
    # =====================================================================================
    def shutdown(self) -> None:
        """Stop the port and free its memory (nic-facts §D.3, stop part).

        Receive off, RX queues disabled, TX given a bounded time to drain, TX queues
        disabled, master disable; then bus mastering off and every buffer and ring freed.
        A removed card or a step that times out does not stop the rest: bus mastering is
        always switched off and the memory always freed. Idempotent. Stop the workers that
        use this port's queues first.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._stop_device()
            finally:
                self._release()

    def _stop_device(self) -> None:
        for step in (
            self._disable_rx,
            self._stop_rx_queues,
            self._drain_tx,
            self._stop_tx_queues,
            self._disable_master,
        ):
            try:
                step()
            except DeviceRemovedError:
                log.warning(
                    "%s: device removed; skipping the rest of its stop sequence", self.dev.address
                )
                return
            except DeviceTimeoutError as exc:
                log.warning("%s: shutdown step %s: %s", self.dev.address, step.__name__, exc)

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

    def _release(self) -> None:
        """Bus mastering off, then free rings and pools: TX first, which returns RX buffers."""
        try:
            self.dev.set_bus_master(False)
        finally:
            errors = []
            for queue in [*self.tx_queues, *self.rx_queues]:
                try:
                    queue.close()
                except IxydError as exc:  # free the rest; report the first failure
                    errors.append(exc)
            self.tx_queues.clear()
            self.rx_queues.clear()
            if errors:
                raise errors[0]

    def _shutdown_after_failed_init(self) -> None:
        try:
            self.shutdown()
        except IxydError:
            log.exception("%s: cleaning up after a failed init", self.dev.address)
