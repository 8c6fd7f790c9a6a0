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


class ForwardWorker:
    """Forward everything received on `rx` out of `tx`, touching one byte per packet."""

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
        self.rx, self.tx, self.batch, self.cpu, self.name = rx, tx, batch, cpu, name
        self._stats = stats = ffi.new("struct ixyd_fwd_stats *")
        self._loop = PinnedLoop(
            name, cpu, lambda stop: lib.ixyd_forward(rx.pointer, tx.pointer, batch, stop, stats)
        )

    def start(self, timeout: float = 5.0) -> None:
        """Start the thread and wait until it is pinned; raises what pinning raised."""
        self._loop.start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop and wait for it (it checks the flag every iteration)."""
        self._loop.stop(timeout)

    @property
    def running(self) -> bool:
        return self._loop.running

    @property
    def error(self) -> BaseException | None:
        return self._loop.error

    @property
    def stats(self) -> dict[str, int]:
        """The loop's counters: packets, bytes, drop_tx_full, iterations, empty_polls."""
        return {name: getattr(self._stats, name) for name in FWD_STATS_FIELDS}
