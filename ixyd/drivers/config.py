"""Port configuration shared by the NIC drivers: validated once, when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

RING_MIN = 64  # Linux IXGBE_MIN_RXD/TXD; two TX clean-up batches of 32
RING_MAX = 4096  # Linux and ixy; DPDK's 8192 is beyond what we have tested
MAX_QUEUES = 16  # RSS spreads over at most 16 queues (RETA entries are 4 bits wide)
DEFAULT_RING = 512  # ixy NUM_RX/TX_QUEUE_ENTRIES
DEFAULT_POOL = 4096  # ixy: max(4096, rx + tx entries) buffers per RX queue
RSS_KEY_BYTES = 40


def _is_ring_size(n: object) -> bool:
    return isinstance(n, int) and RING_MIN <= n <= RING_MAX and n & (n - 1) == 0


@dataclass(frozen=True)
class PortConfig:
    """How to bring up one port. Every field is checked at construction (ConfigError).

    rx_queues / tx_queues: 1..16. rx_ring / tx_ring: descriptors per queue, a power of two
    in 64..4096. pool_size: packet buffers per RX queue (None: max(4096, rx_ring + tx_ring));
    it must exceed rx_ring by at least one batch (32), since a full ring plus replacements
    for the first batch must fit. promisc: accept every unicast and multicast frame.
    rss: spread flows over the RX queues by Toeplitz hash (None: on when rx_queues > 1).
    rss_key: 40 bytes, None for the NIC family's default key. drop_en: a queue without free
    descriptors drops its frames (counted) instead of blocking the shared packet buffer.
    link_timeout: seconds init waits for the link; a link that is still down is not an
    error, the port just reports it down.
    """

    rx_queues: int = 1
    tx_queues: int = 1
    rx_ring: int = DEFAULT_RING
    tx_ring: int = DEFAULT_RING
    pool_size: int | None = None
    promisc: bool = True
    rss: bool | None = None
    rss_key: bytes | None = None
    drop_en: bool = True
    link_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("rx_queues", "tx_queues"):
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not 1 <= value <= MAX_QUEUES
            ):
                raise ConfigError(
                    f"{name} must be an integer from 1 to {MAX_QUEUES}, got {value!r}"
                )
        for name in ("rx_ring", "tx_ring"):
            value = getattr(self, name)
            if isinstance(value, bool) or not _is_ring_size(value):
                raise ConfigError(
                    f"{name} must be a power of two from {RING_MIN} to {RING_MAX} descriptors, "
                    f"got {value!r}"
                )
        if self.pool_size is not None:
            minimum = self.rx_ring + 32
            if (
                not isinstance(self.pool_size, int)
                or isinstance(self.pool_size, bool)
                or self.pool_size < minimum
            ):
                raise ConfigError(
                    f"pool_size must be an integer of at least rx_ring + 32 = {minimum} buffers, "
                    f"got {self.pool_size!r}"
                )
        if self.rss_key is not None and (
            not isinstance(self.rss_key, bytes) or len(self.rss_key) != RSS_KEY_BYTES
        ):
            raise ConfigError(f"rss_key must be {RSS_KEY_BYTES} bytes, got {self.rss_key!r}")
        if (
            isinstance(self.link_timeout, bool)
            or not isinstance(self.link_timeout, (int, float))
            or not 0 <= self.link_timeout <= 600
        ):
            raise ConfigError(f"link_timeout must be 0..600 seconds, got {self.link_timeout!r}")
        for name in ("promisc", "drop_en"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rss is not None and not isinstance(self.rss, bool):
            raise ConfigError(f"rss must be true, false or unset, got {self.rss!r}")

    @property
    def rss_enabled(self) -> bool:
        """Whether RSS is on: as configured, else on exactly when there are several RX queues."""
        return self.rx_queues > 1 if self.rss is None else self.rss

    @property
    def buffers_per_rx_queue(self) -> int:
        """Packet buffers in each RX queue's pool."""
        return (
            self.pool_size
            if self.pool_size is not None
            else max(DEFAULT_POOL, self.rx_ring + self.tx_ring)
        )
