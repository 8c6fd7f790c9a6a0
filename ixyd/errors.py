"""Exceptions raised by ixyd. Every message names the cause and, where there is one, the fix."""


class IxydError(Exception):
    """Base class of every error ixyd raises on purpose."""


class DeviceError(IxydError):
    """A PCI function could not be opened, identified or driven."""


class DeviceRemovedError(DeviceError):
    """The device reads all-ones: it was unplugged, reset under us, or its PCIe link failed."""


class UnsupportedDeviceError(DeviceError):
    """The vendor/device ID is not one this driver knows."""


class DeviceTimeoutError(DeviceError):
    """A register did not reach the expected state within its timeout."""


class DmaError(IxydError):
    """DMA memory could not be allocated, mapped or unmapped."""


class IovaExhaustedError(DmaError):
    """No free IOVA range large enough remains inside the ranges the IOMMU reports as valid."""


class ConfigError(IxydError):
    """A configuration value is invalid."""


# Exit statuses of the daemon and of `ixyd-host`. ixyd@.service does not restart after
# EXIT_CONFIG (RestartPreventExitStatus=): the same configuration fails the same way.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
