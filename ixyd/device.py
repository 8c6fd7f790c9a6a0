"""The device seam: everything a driver needs from one PCI function, and nothing more.

Two backends implement `PciFunction`: the VFIO backend (a real device, #4) and the 82599
model (`ixyd.model`). A driver written against this class cannot tell them apart.

Register access rule: every BAR0 access is one aligned 32-bit load or store. `read32` and
`write32` check the offset and do exactly that; native code gets `regs`, a
`volatile uint32_t *` to BAR0, for the few per-batch stores it makes (ring tails).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import cffi

from .dma import DmaMemory

_ffi = cffi.FFI()

ALL_ONES = 0xFFFFFFFF
# fullmatch, not `$`: `$` also matches before a trailing newline ("0000:03:00.0\n")
_PCI_ADDRESS = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])")


def parse_pci_address(text: str) -> str:
    """Validate a PCI address 'dddd:bb:dd.f' (domain optional) and return its canonical form."""
    if re.fullmatch(r"[0-9a-fA-F]{2}:[0-1][0-9a-fA-F]\.[0-7]", text):
        text = "0000:" + text
    match = _PCI_ADDRESS.fullmatch(text)
    if not match:
        raise ValueError(f"invalid PCI address {text!r}: expected dddd:bb:dd.f, e.g. 0000:03:00.0")
    return text.lower()


@dataclass(frozen=True)
class PciIds:
    """Identity of a PCI function, as read from its configuration space."""

    vendor_id: int
    device_id: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    revision: int = 0
    class_code: int = 0x020000  # network controller, Ethernet

    def __str__(self) -> str:
        return f"{self.vendor_id:04x}:{self.device_id:04x}"


class PciFunction(ABC):
    """One PCI function opened for a user-space driver."""

    #: canonical address ("0000:03:00.0" for VFIO, "model0:0" for the model)
    address: str
    ids: PciIds
    #: DMA memory shared by every function behind the same IOMMU container
    dma: DmaMemory
    #: size of BAR0 in bytes
    bar0_size: int

    @abstractmethod
    def read32(self, offset: int) -> int:
        """One aligned 32-bit load from BAR0. A removed device returns 0xFFFFFFFF."""

    @abstractmethod
    def write32(self, offset: int, value: int) -> None:
        """One aligned 32-bit store to BAR0."""

    @property
    @abstractmethod
    def regs_address(self) -> int:
        """Host address of the BAR0 mapping, for native code."""

    @property
    def regs(self):
        """BAR0 as a cffi `volatile uint32_t *` for native code (tail writes)."""
        return _ffi.cast("uint32_t *", self.regs_address)

    @abstractmethod
    def set_bus_master(self, enabled: bool) -> None:
        """Set or clear Bus Master Enable (PCI command register bit 2); no DMA without it."""

    @property
    @abstractmethod
    def bus_master(self) -> bool:
        """Current state of Bus Master Enable."""

    @abstractmethod
    def close(self) -> None:
        """Release the function. DMA memory is released by whoever owns the container."""

    def check_offset(self, offset: int) -> None:
        """Reject a register offset that is not an aligned 32-bit word inside BAR0."""
        if offset & 3 or not 0 <= offset <= self.bar0_size - 4:
            raise ValueError(
                f"{self.address}: register offset {offset:#x} is not an aligned 32-bit word "
                f"inside BAR0 (size {self.bar0_size:#x})"
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} {self.ids}>"
