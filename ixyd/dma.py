"""DMA memory: host pages, IOVAs chosen inside the IOMMU's valid ranges, and sub-allocation.

A device never sees a virtual or physical address: every address written into a descriptor
or a base register is an IOVA that this module picked and mapped through the backend's
`DmaMapper` (VFIO's container, or the model's IOMMU). IOVAs are taken only from the ranges
the backend reports as valid, so an IOMMU with a 39-bit address width or a reserved MSI
window never receives a mapping it would refuse or silently misroute (the identity-mapping
bug class of ixy and ixy.rs, docs/reference/peers.md#ixys-vfio-path).

Memory comes from 2 MiB hugepages when the system has free ones, else from ordinary 4 KiB
pages; no hugepage setup is required. Chunks are carved into 128-byte aligned pieces
(82599 descriptor rings need 128-byte alignment, datasheet 7.1.9 / ixy memory.c).
"""

from __future__ import annotations

import mmap
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import cffi

from .errors import DmaError, IovaExhaustedError

_ffi = cffi.FFI()

PAGE_SIZE = 4096
HUGEPAGE_SIZE = 2 * 1024 * 1024
DESCRIPTOR_ALIGNMENT = 128  # 82599 ring base and buffer alignment used by Intel's drivers
_MAP_HUGETLB = 0x40000  # <linux/mman.h>; Python's mmap module does not export it


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def free_hugepages() -> int:
    """Number of free 2 MiB hugepages the kernel reports (0 when none are reserved)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class HostMemory:
    """One anonymous, shared, pre-faulted mapping of host memory."""

    def __init__(self, size: int, prefer_hugepages: bool = True):
        self.hugepages = False
        mapping = None
        if prefer_hugepages and free_hugepages() * HUGEPAGE_SIZE >= _align_up(size, HUGEPAGE_SIZE):
            try:
                size = _align_up(size, HUGEPAGE_SIZE)
                mapping = mmap.mmap(
                    -1, size, flags=mmap.MAP_SHARED | _MAP_HUGETLB | mmap.MAP_POPULATE
                )
                self.hugepages = True
            except OSError:
                mapping = None
        if mapping is None:
            size = _align_up(size, PAGE_SIZE)
            try:
                mapping = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            except OSError as exc:
                raise DmaError(f"cannot allocate {size} bytes of DMA memory: {exc}") from exc
        self.size = size
        self._mmap = mapping
        self._export = _ffi.from_buffer(mapping)
        self.address = int(_ffi.cast("uintptr_t", self._export))

    @property
    def page_size(self) -> int:
        return HUGEPAGE_SIZE if self.hugepages else PAGE_SIZE

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self._mmap)[offset : offset + size]

    def close(self) -> None:
        if self._mmap is None:
            return
        _ffi.release(self._export)
        self._export = None
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a memoryview; the pages are freed when it goes away.
            pass
        self._mmap = None


class IovaAllocator:
    """First-fit allocator of IOVA space restricted to a set of valid inclusive ranges.

    IOVA 0 and the first page are never handed out: a zero DMA address in a descriptor is the
    classic symptom of an uninitialised buffer and must not be able to look valid.
    """

    def __init__(self, valid_ranges: list[tuple[int, int]]):
        free: list[list[int]] = []
        for start, end in sorted(valid_ranges):
            if end < start:
                raise ValueError(f"invalid IOVA range {start:#x}-{end:#x}")
            start = max(start, PAGE_SIZE)
            if end >= start:
                free.append([start, end + 1])  # half-open internally
        if not free:
            raise DmaError("the IOMMU reports no usable IOVA range")
        self.valid_ranges = [(s, e) for s, e in sorted(valid_ranges)]
        self._free = free

    def allocate(self, size: int, alignment: int = PAGE_SIZE) -> int:
        """Return the IOVA of a free block of `size` bytes aligned to `alignment`."""
        if size <= 0:
            raise ValueError("IOVA allocation size must be positive")
        for i, (start, end) in enumerate(self._free):
            base = _align_up(start, alignment)
            if base + size <= end:
                pieces = []
                if base > start:
                    pieces.append([start, base])
                if base + size < end:
                    pieces.append([base + size, end])
                self._free[i : i + 1] = pieces
                return base
        raise IovaExhaustedError(
            f"no free IOVA block of {size:#x} bytes (alignment {alignment:#x}) inside the valid "
            f"ranges {', '.join(f'{s:#x}-{e:#x}' for s, e in self.valid_ranges)}"
        )

    def release(self, iova: int, size: int) -> None:
        """Give a block back; adjacent free blocks are merged."""
        self._free.append([iova, iova + size])
        self._free.sort()
        merged: list[list[int]] = []
        for start, end in self._free:
            if merged and merged[-1][1] >= start:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._free = merged


class DmaMapper(ABC):
    """What DMA memory needs from an IOMMU: its valid IOVA ranges, map and unmap.

    VFIO implements this with a type1 container (VFIO_IOMMU_GET_INFO, VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA); the model with its own translation table. All devices that
    share one mapper share one IOVA space, so a buffer received on one port can be
    transmitted on another.
    """

    @abstractmethod
    def valid_iova_ranges(self) -> list[tuple[int, int]]:
        """Inclusive (first, last) IOVA ranges the IOMMU accepts."""

    @abstractmethod
    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        """Make [iova, iova+size) translate to host memory at vaddr, readable and writable."""

    @abstractmethod
    def unmap_dma(self, iova: int, size: int) -> None:
        """Remove a mapping made by map_dma with the same iova and size."""


@dataclass
class DmaBuffer:
    """A piece of DMA memory: host address for the CPU, IOVA for the device."""

    vaddr: int
    iova: int
    size: int
    chunk: _Chunk = field(repr=False)
    offset: int = field(repr=False)

    def view(self) -> memoryview:
        """Zero-copy view of the buffer's bytes."""
        return self.chunk.memory.view(self.offset, self.size)


@dataclass
class Mapping:
    iova: int
    size: int
    vaddr: int


class _Chunk:
    def __init__(self, memory: HostMemory, iova: int):
        self.memory = memory
        self.iova = iova
        self.used = 0
        self.live = 0


class DmaMemory:
    """Allocates DMA buffers for every device behind one mapper and tracks every mapping.

    Small requests share chunks (one host mapping and one IOMMU mapping each); a chunk is
    unmapped when its last buffer is freed, and `close` unmaps everything still mapped.
    """

    def __init__(
        self, mapper: DmaMapper, prefer_hugepages: bool = True, chunk_size: int = HUGEPAGE_SIZE
    ):
        self._mapper = mapper
        self._iovas = IovaAllocator(mapper.valid_iova_ranges())
        self._prefer_hugepages = prefer_hugepages
        self._chunk_size = chunk_size
        self._chunks: list[_Chunk] = []
        self._current: _Chunk | None = None
        self._lock = threading.Lock()
        self.closed = False

    def alloc(self, size: int, alignment: int = DESCRIPTOR_ALIGNMENT) -> DmaBuffer:
        """Allocate `size` bytes, zero-filled, aligned to `alignment` in both VA and IOVA."""
        if size <= 0:
            raise ValueError("DMA allocation size must be positive")
        if alignment <= 0 or alignment & (alignment - 1) or alignment > HUGEPAGE_SIZE:
            raise ValueError(f"DMA alignment must be a power of two up to 2 MiB, got {alignment}")
        with self._lock:
            if self.closed:
                raise DmaError("DMA memory is closed")
            chunk = self._current
            if chunk is None or _align_up(chunk.used, alignment) + size > chunk.memory.size:
                chunk = self._new_chunk(max(size, self._chunk_size))
                if chunk.memory.size - size >= DESCRIPTOR_ALIGNMENT:
                    self._current = chunk
            offset = _align_up(chunk.used, alignment)
            chunk.used = offset + size
            chunk.live += 1
            return DmaBuffer(
                chunk.memory.address + offset, chunk.iova + offset, size, chunk, offset
            )

    def free(self, buffer: DmaBuffer) -> None:
        """Release a buffer; its chunk is unmapped once nothing in it is in use."""
        with self._lock:
            chunk = buffer.chunk
            if chunk not in self._chunks:
                return
            chunk.live -= 1
            if chunk.live == 0:
                if chunk is self._current:
                    self._current = None
                self._release_chunk(chunk)

    def _new_chunk(self, size: int) -> _Chunk:
        memory = HostMemory(size, self._prefer_hugepages)
        try:
            iova = self._iovas.allocate(memory.size, memory.page_size)
        except IovaExhaustedError:
            memory.close()
            raise
        try:
            self._mapper.map_dma(memory.address, iova, memory.size)
        except Exception:
            self._iovas.release(iova, memory.size)
            memory.close()
            raise
        chunk = _Chunk(memory, iova)
        self._chunks.append(chunk)
        return chunk

    def _release_chunk(self, chunk: _Chunk) -> None:
        self._chunks.remove(chunk)
        try:
            self._mapper.unmap_dma(chunk.iova, chunk.memory.size)
        finally:
            self._iovas.release(chunk.iova, chunk.memory.size)
            chunk.memory.close()

    @property
    def mappings(self) -> list[Mapping]:
        """Every IOMMU mapping this allocator currently holds."""
        with self._lock:
            return [Mapping(c.iova, c.memory.size, c.memory.address) for c in self._chunks]

    def close(self) -> None:
        """Unmap and free everything. Buffers handed out before become invalid."""
        with self._lock:
            errors = []
            for chunk in list(self._chunks):
                try:
                    self._release_chunk(chunk)
                except Exception as exc:  # keep releasing the rest; report at the end
                    errors.append(exc)
            self._current = None
            self.closed = True
        if errors:
            raise DmaError(f"{len(errors)} DMA mapping(s) could not be released: {errors[0]}")
