"""Forwarding workers: the native poll loop (rx on one queue -> tx on another) in a thread.

The loop is C (`ixyd_forward`): cffi releases the GIL for the call, so the worker runs
in parallel with the control plane. It stops when its stop flag is set and publishes its
counters into a struct the control plane reads without locking (64-bit aligned stores;
a reader may see values one iteration old). The hot path takes no lock and makes no
syscall.

Mempools are single-threaded (an index stack without atomics): a buffer's pool is touched
by the worker that receives into it and by whoever cleans the TX ring it was sent on. So a
TX queue must be fed by exactly one worker, and that worker's RX queue owns every buffer
the TX queue holds.
"""

from __future__ import annotations

from ._datapath import ffi, lib
from .drivers.rings import RxQueue, TxQueue
from .errors import ConfigError
from .worker import PinnedLoop

FWD_STATS_FIELDS = ("packets", "bytes", "drop_tx_full", "iterations", "empty_polls")


class ForwardWorker(PinnedLoop):
    """Forward everything received on `rx` out of `tx`, touching one byte per packet;
    start() and stop() as PinnedLoop's."""

    def __init__(
        self,
        rx: RxQueue,
        tx: TxQueue,
        *,
        batch: int = 32,
        cpu: int | None = None,
        name: str = "ixyd-fwd",
    ):
        if not 1 <= batch <= lib.IXYD_MAX_BATCH:
            raise ConfigError(f"batch size must be 1..{lib.IXYD_MAX_BATCH}, got {batch}")
        self.rx, self.tx, self.batch = rx, tx, batch
        self._stats = stats = ffi.new("struct ixyd_fwd_stats *")
        super().__init__(
            name, cpu, lambda stop: lib.ixyd_forward(rx.pointer, tx.pointer, batch, stop, stats)
        )

    @property
    def stats(self) -> dict[str, int]:
        """The loop's counters: packets, bytes, drop_tx_full, iterations, empty_polls."""
        return {name: getattr(self._stats, name) for name in FWD_STATS_FIELDS}
