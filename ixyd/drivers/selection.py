"""Which ixyd driver takes a PCI function: the one place that answers it, for the daemon
(which driver to bring a port up with) and for root's `ixyd-host prepare` (whether to
take the function from its kernel driver at all)."""

from __future__ import annotations

from ..device import PciIds
from ..errors import UnsupportedDeviceError
from . import igb, ixgbe
from .port import IntelPort

# in the order they are asked
DRIVERS: tuple[tuple[str, type[IntelPort]], ...] = (
    ("ixgbe", ixgbe.IxgbePort),
    ("igb", igb.IgbPort),
)


def driver_for(address: str, ids: PciIds) -> type[IntelPort]:
    """The port class for a function, by its vendor/device ID: ixgbe (82599), else igb
    (82576). Raises UnsupportedDeviceError naming the device and both drivers' reasons
    (their supported IDs) when neither takes it."""
    reasons = []
    for name, port_class in DRIVERS:
        try:
            port_class.identify(ids)
            return port_class
        except UnsupportedDeviceError as exc:
            reasons.append(f"{name}: {exc}")
    raise UnsupportedDeviceError(f"{address}: no ixyd driver for {ids}. " + "; ".join(reasons))
