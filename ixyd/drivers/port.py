"""What every Intel NIC family driver shares: identification, the port's life cycle,
statistics accumulation, queue start, the RSS tables and the shutdown skeleton.

A family driver (ixgbe.py, igb.py) subclasses `IntelPort`, points `R` at its register-facts
module and writes only what its datasheet says differently: `_bring_up` (the init
sequence), `link`, `set_promisc`, `queue_stats` and `_stop_steps`. Everything here is
family-independent because both families name these registers and bits alike.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Self

from ..device import PciFunction, PciIds
from ..errors import (
    DeviceError,
    DeviceRemovedError,
    DeviceTimeoutError,
    IxydError,
    UnsupportedDeviceError,
)
from .config import PortConfig
from .registers import BoundRegister, DeviceInfo, RegisterFile
from .rings import RxQueue, TxQueue

log = logging.getLogger(__name__)

QUEUE_TIMEOUT = 0.5  # RXDCTL/TXDCTL.ENABLE to read back as written
LINK_POLL = 0.010


def identify(ids: PciIds, facts: ModuleType, driver: str, supported: str) -> DeviceInfo:
    """Look a function up in a family's device table (facts.DEVICES, .VIRTUAL_FUNCTIONS,
    .UNSUPPORTED_FAMILY_REASONS). Raises UnsupportedDeviceError unless it is a supported
    physical function; `supported` names what the driver does drive, for the message."""
    if ids.vendor_id != facts.INTEL_VENDOR_ID:
        raise UnsupportedDeviceError(
            f"{ids}: not an Intel device (vendor {ids.vendor_id:#06x}); "
            f"the {driver} driver drives 8086:xxxx functions only"
        )
    if ids.device_id in facts.VIRTUAL_FUNCTIONS:
        raise UnsupportedDeviceError(
            f"{ids} is an SR-IOV virtual function ({facts.VIRTUAL_FUNCTIONS[ids.device_id]}), "
            "not supported: ixyd drives physical functions; give it the PF instead"
        )
    info = facts.DEVICES.get(ids.device_id)
    if info is None:
        listed = ", ".join(f"{d:#06x}" for d, i in facts.DEVICES.items() if i.supported)
        raise UnsupportedDeviceError(
            f"{ids}: unknown device ID {ids.device_id:#06x}; supported: {supported} ({listed})"
        )
    if not info.supported:
        raise UnsupportedDeviceError(
            f"{ids} is an {info.name} ({info.family} family), not supported: "
            f"{facts.UNSUPPORTED_FAMILY_REASONS[info.family]}"
        )
    return info


class IntelPort(ABC):
    """One port, initialised and running; `shutdown()` stops it and frees its memory.

    The constructor brings the port up and raises UnsupportedDeviceError (wrong ID),
    DeviceRemovedError (the function reads all-ones), DeviceTimeoutError (a reset step never
    completed) or DmaError (no DMA memory); on any failure everything it set up is released.
    A link that stays down is not an error.
    """

    #: the family's register-facts module (REGISTERS, bit constants, device table)
    R: ModuleType

    def __init__(self, dev: PciFunction, config: PortConfig | None = None):
        self.dev = dev
        self.config = config if config is not None else PortConfig()
        self.info = self.identify(dev.ids)
        self.regs = RegisterFile(dev, self.R.REGISTERS)
        self.rx_queues: list[RxQueue] = []
        self.tx_queues: list[TxQueue] = []
        self.mac = b""
        self.promisc = self.config.promisc
        self._lock = threading.RLock()  # control-plane register sequences; workers touch only tails
        self._counters: dict[str, list[BoundRegister]] = {}  # stats key -> instances read
        self._closed = False
        try:
            self._check_present()
            self._bring_up()
        except BaseException:
            self._shutdown_after_failed_init()
            raise

    @staticmethod
    @abstractmethod
    def identify(ids: PciIds) -> DeviceInfo:
        """The device-table entry of a supported function (UnsupportedDeviceError otherwise)."""

    def __repr__(self) -> str:
        state = (
            "shut down"
            if self._closed
            else f"{len(self.rx_queues)} RX / {len(self.tx_queues)} TX queues"
        )
        name = type(self).__name__
        return f"<{name} {self.dev.address} {self.info.name} {self.mac_address} {state}>"

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

    # ------------------------------------------------------------------ family hooks
    @abstractmethod
    def _bring_up(self) -> None:
        """The family's datasheet init sequence, from a present device to running queues."""

    @abstractmethod
    def link(self) -> tuple[bool, int]:
        """(up, speed in Mb/s); speed is 0 while down. DeviceRemovedError if the card is gone."""

    @abstractmethod
    def _stop_steps(self) -> Iterable[Callable[[], None]]:
        """The family's stop sequence, before bus mastering goes off and memory is freed."""

    def _software_totals(self) -> dict[str, int]:
        """Totals stats() adds from the data path's own counters (none by default)."""
        return {}

    # ------------------------------------------------------------------ shared bring-up steps
    def _check_present(self) -> None:
        """An unplugged card, or one whose BAR is not live, reads all-ones: say so at once."""
        try:
            self.regs.check_removed()
        except DeviceRemovedError as exc:
            raise DeviceRemovedError(
                f"{exc}; nothing was initialised. Check that the card is present (lspci), powered "
                "(D0) and that its PCIe link is up"
            ) from None

    def _read_mac(self) -> bytes:
        """Receive address 0 holds the EEPROM's MAC after reset."""
        low, high = self.regs.RAL[0].read(), self.regs.RAH[0].read()
        if not high & self.R.RAH_AV:
            log.warning(
                "%s: receive address 0 is not marked valid; unicast filtering may drop everything",
                self.dev.address,
            )
        return low.to_bytes(4, "little") + (high & self.R.RAH_ADDRESS_MASK).to_bytes(2, "little")

    def _write_rss_tables(self) -> None:
        """The hash key (key byte 0 in RSSRK[0] bits 7:0) and a redirection table that
        spreads its entries round-robin over the RX queues (entry e is byte e & 3 of
        RETA[e >> 2]). Same layout on both families (docs/reference/82599.md#rss and
        82576.md#rss)."""
        key = self.config.rss_key or self.R.RSS_DEFAULT_KEY
        for i, register in enumerate(self.regs.RSSRK):
            register.write(int.from_bytes(key[4 * i : 4 * i + 4], "little"))
        queues = self.config.rx_queues
        for i, register in enumerate(self.regs.RETA):
            register.write(int.from_bytes(bytes((4 * i + k) % queues for k in range(4)), "little"))

    def _start_rx_queue(self, rxq: RxQueue) -> None:
        """Arm the ring, enable the queue, then hand the device all descriptors but one."""
        rxq.fill()
        q = rxq.index
        self.regs.RXDCTL[q].set_bits(self.R.RXDCTL_ENABLE)
        self.regs.RXDCTL[q].wait_set(self.R.RXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)
        self.regs.RDH[q].write(0)
        # RDT == RDH would mean "no descriptor for the device": leave one slot unused.
        self.regs.RDT[q].write(rxq.size - 1)

    def _start_tx_queue(self, txq: TxQueue) -> None:
        """Empty ring (TDH = TDT = 0), then enable the queue."""
        q = txq.index
        self.regs.TDH[q].write(0)
        self.regs.TDT[q].write(0)
        self.regs.TXDCTL[q].set_bits(self.R.TXDCTL_ENABLE)
        self.regs.TXDCTL[q].wait_set(self.R.TXDCTL_ENABLE, timeout=QUEUE_TIMEOUT)

    # ------------------------------------------------------------------ running
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

    def stats(self) -> dict[str, int]:
        """Port statistics as 64-bit totals since init.

        Each clear-on-read register is read once per call and added to its total; the
        family adds what it takes from the data path (see its docstring for the keys).
        Raises DeviceRemovedError if the card is gone.
        """
        with self._lock:
            self._accumulate()
            totals = {
                key: sum(c.total for c in counters) for key, counters in self._counters.items()
            }
            totals.update(self._software_totals())
        return totals

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

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the port and free its memory.

        The family's stop steps run first (receive off, queues off, a bounded TX drain,
        master disable); a removed card or a step that times out does not stop the rest:
        bus mastering is always switched off and the memory always freed. Idempotent.
        Stop the workers that use this port's queues first.
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
        for step in self._stop_steps():
            try:
                step()
            except DeviceRemovedError:
                log.warning(
                    "%s: device removed; skipping the rest of its stop sequence", self.dev.address
                )
                return
            except DeviceTimeoutError as exc:
                log.warning("%s: shutdown step %s: %s", self.dev.address, step.__name__, exc)

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
