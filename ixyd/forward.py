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

import os
import threading

from ._datapath import ffi, lib
from .drivers.rings import RxQueue, TxQueue
from .errors import ConfigError
from .worker import check_cpu

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
        if cpu is not None:
            check_cpu(cpu)
        self.rx, self.tx, self.batch, self.cpu, self.name = rx, tx, batch, cpu, name
        self._stop = ffi.new("uint32_t *")
        self._stats = ffi.new("struct ixyd_fwd_stats *")
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self._thread:
            return
        self._stop[0] = 0
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})  # pid 0: this thread only
            lib.ixyd_forward(self.rx.pointer, self.tx.pointer, self.batch, self._stop, self._stats)
        except BaseException as exc:  # reported through .error; the control plane decides
            self.error = exc

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop and wait for it (it checks the flag every iteration)."""
        if not self._thread:
            return
        self._stop[0] = 1
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name} did not stop within {timeout} s")
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> dict[str, int]:
        """The loop's counters: packets, bytes, drop_tx_full, iterations, empty_polls."""
        return {name: getattr(self._stats, name) for name in FWD_STATS_FIELDS}
