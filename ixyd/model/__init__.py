"""A software 82599 behind the device seam: the test bed and the no-NIC demo."""

from .nic import DEFAULT_IOVA_RANGES, Fault, ModelNic, ModelPort, TrafficEndpoint

__all__ = ["DEFAULT_IOVA_RANGES", "Fault", "ModelNic", "ModelPort", "TrafficEndpoint"]
