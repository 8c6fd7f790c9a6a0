"""ixyd picks the port driver by device ID (service._driver_class): ixgbe for an 82599,
igb for an 82576, and a refusal naming both drivers' supported IDs for anything else."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ixyd import service
from ixyd.device import PciIds
from ixyd.drivers.igb import IgbPort
from ixyd.drivers.ixgbe import IxgbePort
from ixyd.errors import UnsupportedDeviceError


def device(device_id: int, vendor_id: int = 0x8086):
    return SimpleNamespace(address="0000:05:00.0", ids=PciIds(vendor_id, device_id))


@pytest.mark.parametrize(("device_id", "expected"), [(0x10FB, IxgbePort), (0x10C9, IgbPort)])
def test_driver_is_chosen_by_device_id(device_id, expected):
    assert service._driver_class(device(device_id)) is expected


def test_unsupported_device_names_both_drivers_and_their_ids():
    with pytest.raises(UnsupportedDeviceError) as caught:
        service._driver_class(device(0x1533))  # an i210: neither driver's
    message = str(caught.value)
    assert message.startswith("0000:05:00.0: no ixyd driver for 8086:1533")
    assert "ixgbe: " in message and "82599 / X520" in message and "0x10fb" in message
    assert "igb: " in message and "82576 copper" in message and "0x10c9" in message


def test_known_but_unsupported_family_keeps_its_reason():
    with pytest.raises(UnsupportedDeviceError) as caught:
        service._driver_class(device(0x1528))  # an X540: ixgbe's family, not driven
    message = str(caught.value)
    assert "X540" in message and "igb: " in message
