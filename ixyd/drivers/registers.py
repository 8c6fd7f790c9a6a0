"""Registers declared as data, and bound to one PCI function (Snabb's register.lua, in Python).

A NIC family describes its register file as a list of `Register` lines: name, offset,
instances (queues, table entries) with a stride or an offset function for irregular
layouts, access mode and a description. `RegisterFile` binds such a table to a
`PciFunction` and gives every register `read`, `write`, `set_bits`, `clear_bits`, `update`
and the three waits. Nothing here knows a NIC family; ixgbe and igb share it.

Two rules a long-running driver needs and ixy lacks (docs/reference/82599.md#surprise-removal,
docs/reference/peers.md#ixys-defects-for-a-long-running-daemon):

* Every wait takes a timeout and raises `DeviceTimeoutError` naming the register, the
  bits it waited for and the last value read.
* A read of 0xFFFFFFFF may mean the device is gone. It is confirmed by reading STATUS,
  which a present device never returns as all-ones; if STATUS is all-ones too the file
  is marked removed and `DeviceRemovedError` is raised, now and on every later read.
  So a wait can never succeed on an all-ones read, however its bits happen to line up.

Clear-on-read statistics (mode RC, and RC64 for a low/high register pair read low first)
are accumulated into 64-bit Python totals with `accumulate`, so the hardware's 32-bit or
36-bit counters never wrap from the user's point of view.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..device import ALL_ONES, PciFunction
from ..errors import DeviceRemovedError, DeviceTimeoutError

#: Offset of instance n, for registers whose instances are not evenly spaced.
Layout = Callable[[int], int]

_FIRST_POLL = 10e-6  # seconds; the wait loops back off from here ...
DEFAULT_MAX_POLL = 1e-3  # ... to this, so a slow step costs few reads and a fast one no latency


class Mode(enum.Enum):
    """How software may access a register."""

    RO = "read-only"
    RW = "read/write"
    WO = "write-only"
    RC = "clear-on-read counter"
    RC64 = "clear-on-read 64-bit counter: low register, then high register"


@dataclass(frozen=True)
class Register:
    """One register, or an array of them, as the datasheet lists it.

    offset is the byte offset of instance 0, with instance n at offset + n * stride; or a
    function n -> offset for irregular layouts (e.g. 82599 RX queues 64..127 live in a
    second block). For RC64 the high half sits `high` bytes after the low half.
    """

    name: str
    offset: int | Layout
    mode: Mode
    description: str
    count: int = 1
    stride: int = 0
    high: int = 4

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"register {self.name}: count must be at least 1")
        if self.count > 1 and not callable(self.offset) and self.stride <= 0:
            raise ValueError(f"register {self.name}: an array needs a stride or an offset function")

    def address(self, index: int = 0) -> int:
        """Byte offset of instance `index`; IndexError outside 0..count-1."""
        if not 0 <= index < self.count:
            raise IndexError(f"register {self.name} has instances 0..{self.count - 1}, not {index}")
        if callable(self.offset):
            return self.offset(index)
        return self.offset + index * self.stride

    @property
    def is_counter(self) -> bool:
        return self.mode in (Mode.RC, Mode.RC64)


class BoundRegister:
    """One register instance of one device."""

    def __init__(self, file: RegisterFile, register: Register, index: int):
        self.file = file
        self.register = register
        self.index = index
        self.offset = register.address(index)
        self.name = register.name if register.count == 1 else f"{register.name}[{index}]"
        self.total = 0  # accumulated value of a clear-on-read counter

    def __repr__(self) -> str:
        return f"<{self.name} @ {self.offset:#07x} {self.register.mode.name}>"

    # ---------------------------------------------------------------- access
    def read(self) -> int:
        """Read the register (an RC64 pair as one 64-bit value, low half first).

        Raises DeviceRemovedError when the device is gone, TypeError for a write-only one.
        """
        mode = self.register.mode
        if mode is Mode.WO:
            raise TypeError(f"{self.name} is write-only")
        low = self.file.read32(self.offset, self.name)
        if mode is not Mode.RC64:
            return low
        return low | self.file.read32(self.offset + self.register.high, self.name) << 32

    def write(self, value: int) -> None:
        """Write a 32-bit value. TypeError for read-only registers and counters."""
        if self.register.mode not in (Mode.RW, Mode.WO):
            raise TypeError(f"{self.name} is {self.register.mode.value}: it cannot be written")
        self.file.write32(self.offset, value)

    def set_bits(self, mask: int) -> None:
        """Read-modify-write: set the bits in mask."""
        self.write(self.read() | mask)

    def clear_bits(self, mask: int) -> None:
        """Read-modify-write: clear the bits in mask."""
        self.write(self.read() & ~mask & ALL_ONES)

    def update(self, mask: int, value: int) -> None:
        """Read-modify-write of a field: the bits in mask take value's bits, the rest stay."""
        self.write(self.read() & ~mask & ALL_ONES | value & mask)

    # ---------------------------------------------------------------- waits
    def wait_set(self, mask: int, *, timeout: float, max_poll: float = DEFAULT_MAX_POLL) -> int:
        """Poll until every bit in mask reads 1; return the value read.

        Raises DeviceTimeoutError after `timeout` seconds, DeviceRemovedError if the
        device is gone (an all-ones read never counts as "set").
        """
        return self._wait(
            lambda v: v & mask == mask, f"bits {mask:#010x} to be set", timeout, max_poll
        )

    def wait_clear(self, mask: int, *, timeout: float, max_poll: float = DEFAULT_MAX_POLL) -> int:
        """Poll until every bit in mask reads 0; return the value read. Errors as wait_set."""
        return self._wait(lambda v: v & mask == 0, f"bits {mask:#010x} to clear", timeout, max_poll)

    def wait_equal(
        self, mask: int, value: int, *, timeout: float, max_poll: float = DEFAULT_MAX_POLL
    ) -> int:
        """Poll until (register & mask) == value; return the value read. Errors as wait_set."""
        return self._wait(
            lambda v: v & mask == value,
            f"bits {mask:#010x} to equal {value:#010x}",
            timeout,
            max_poll,
        )

    def _wait(self, done: Callable[[int], bool], what: str, timeout: float, max_poll: float) -> int:
        if not timeout > 0:
            raise ValueError(f"waiting for {self.name}: timeout must be positive, got {timeout!r}")
        deadline = time.monotonic() + timeout
        delay = _FIRST_POLL
        while True:
            expired = time.monotonic() >= deadline  # sampled before the read: a read always follows
            value = self.read()
            if done(value):
                return value
            if expired:
                raise DeviceTimeoutError(
                    f"{self.file.dev.address}: {self.name} ({self.offset:#07x}) "
                    f"did not reach {what} "
                    f"within {timeout:g} s; last value {value:#010x}"
                )
            time.sleep(delay)
            delay = min(delay * 2, max_poll)

    # ---------------------------------------------------------------- counters
    def accumulate(self) -> int:
        """Read a clear-on-read counter once, add it to the 64-bit total and return the total."""
        if not self.register.is_counter:
            raise TypeError(
                f"{self.name} is {self.register.mode.value}, not a clear-on-read counter"
            )
        self.total += self.read()
        return self.total


class RegisterArray:
    """All instances of an array register: `regs.RDBAL[q]`."""

    def __init__(self, file: RegisterFile, register: Register):
        self.file = file
        self.register = register

    def __getitem__(self, index: int) -> BoundRegister:
        return self.file.bind(self.register.name, index)

    def __len__(self) -> int:
        return self.register.count

    def __iter__(self) -> Iterator[BoundRegister]:
        return (self[i] for i in range(self.register.count))


class RegisterFile:
    """A register table bound to one device: `regs.CTRL.read()`, `regs.RDT[q].write(n)`.

    `removal_probe` names the register read to confirm a removal (STATUS on every Intel
    NIC: docs/reference/82599.md#surprise-removal). After a confirmed removal every read
    raises DeviceRemovedError without touching the device and every write is dropped, as
    Linux's ixgbe_read_reg does.
    """

    def __init__(
        self, dev: PciFunction, registers: Iterable[Register], *, removal_probe: str = "STATUS"
    ):
        self.dev = dev
        self._table: dict[str, Register] = {}
        for register in registers:
            if register.name in self._table:
                raise ValueError(f"register {register.name} is declared twice")
            self._table[register.name] = register
        if removal_probe not in self._table:
            raise ValueError(f"the removal probe {removal_probe} is not in the register table")
        self._probe = self._table[removal_probe].address()
        self._bound: dict[tuple[str, int], BoundRegister] = {}
        self._lock = threading.Lock()
        self.removed = False
        self.removal_reason = ""

    # ---------------------------------------------------------------- lookup
    def __getattr__(self, name: str) -> BoundRegister | RegisterArray:
        if name.startswith("_") or name not in self.__dict__.get("_table", {}):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> BoundRegister | RegisterArray:
        register = self._table[name]
        return self.bind(name) if register.count == 1 else RegisterArray(self, register)

    def bind(self, name: str, index: int = 0) -> BoundRegister:
        """The bound register `name`, instance `index`."""
        key = (name, index)
        bound = self._bound.get(key)
        if bound is None:
            with self._lock:
                bound = self._bound.setdefault(key, BoundRegister(self, self._table[name], index))
        return bound

    # ---------------------------------------------------------------- raw access
    def read32(self, offset: int, name: str = "") -> int:
        """One 32-bit read with the all-ones check (see the module docstring)."""
        if self.removed:
            raise DeviceRemovedError(self.removal_reason)
        value = self.dev.read32(offset)
        if value == ALL_ONES:
            self._confirm_removal(offset, name or f"register {offset:#07x}")
        return value

    def write32(self, offset: int, value: int) -> None:
        """One 32-bit write; dropped once the device is known to be removed."""
        if not self.removed:
            self.dev.write32(offset, value)

    def check_removed(self) -> None:
        """Raise DeviceRemovedError if the device reads all-ones (or was found removed before)."""
        self.read32(self._probe, "STATUS")

    def _confirm_removal(self, offset: int, name: str) -> None:
        if offset != self._probe and self.dev.read32(self._probe) != ALL_ONES:
            return  # a genuine all-ones value: the device answers STATUS normally
        self.removed = True
        what = "STATUS reads" if offset == self._probe else f"{name} and STATUS read"
        self.removal_reason = (
            f"{self.dev.address}: device removed: {what} 0xFFFFFFFF "
            "(surprise removal, PCIe link down, or reset by someone else); it must be reopened"
        )
        raise DeviceRemovedError(self.removal_reason)

    # ---------------------------------------------------------------- counters
    def counters(self, names: Iterable[str] | None = None) -> list[BoundRegister]:
        """Every instance of the named clear-on-read counters (all of them by default)."""
        chosen = names if names is not None else [n for n, r in self._table.items() if r.is_counter]
        out = []
        for name in chosen:
            register = self._table[name]
            if not register.is_counter:
                raise TypeError(f"{name} is {register.mode.value}, not a clear-on-read counter")
            out.extend(self.bind(name, i) for i in range(register.count))
        return out

    def clear_counters(self) -> None:
        """Read every clear-on-read counter once and set its software total to zero."""
        for counter in self.counters():
            counter.read()
            counter.total = 0


# ---------------------------------------------------------------- device tables
@dataclass(frozen=True)
class DeviceInfo:
    """What a device ID says about a function."""

    device_id: int
    name: str
    family: str
    supported: bool


def device_ids(family: str, entries: dict[int, str], supported: bool) -> dict[int, DeviceInfo]:
    """Device-table entries for one family: {device ID: DeviceInfo}."""
    return {
        device_id: DeviceInfo(device_id, name, family, supported)
        for device_id, name in entries.items()
    }


# Intel's default RSS key (82599 datasheet 7.1.2.8.3; DPDK's rss_intel_key for ixgbe and
# e1000), used when the configuration names none.
INTEL_RSS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
