"""Guest-side memory helpers for scenario scripts (stdlib only, root): fragment the guest's
free memory on purpose, and tell whether the pages under a buffer are adjacent in
guest-physical memory.

Why: QEMU's igb drops a TX frame whose buffer crosses a 4 KiB page boundary when the two
guest pages behind it are not adjacent in guest-physical memory (docs/vm-guest-dma.md).
On a freshly booted guest most consecutive 4 KiB pages happen to be adjacent, so the loss
is rare and random; `fragment_free_memory` makes it the rule, so a test shows the
worst case every run instead of now and then.

    with fragment_free_memory(256):       # every DMA page allocated now is isolated
        ...
    pages_adjacent(vaddr, length)         # False: a page boundary inside the buffer
                                          # joins two pages that are not neighbours
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator

PAGE_SIZE = 4096
PAGEMAP = "/proc/self/pagemap"  # Documentation/admin-guide/mm/pagemap.rst
PAGEMAP_ENTRY_BYTES = 8
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1  # bits 0-54; zero unless the reader has CAP_SYS_ADMIN


class GuestMemoryError(RuntimeError):
    """A page is not present, or pagemap hides frame numbers (not root)."""


@contextlib.contextmanager
def fragment_free_memory(mib: int) -> Iterator[int]:
    """Allocate `mib` MiB of 4 KiB pages, then give every other page back to the kernel and
    hold the rest until the block ends. A fresh guest hands such a block out in mostly
    consecutive frames, so a page freed here has its neighbours held and cannot merge: the
    kernel's order-0 free lists fill with isolated pages, and 4 KiB allocations made inside
    the block (served from those lists first: the buddy allocator takes the smallest free
    block that fits) land on pages that are not adjacent to each other. Check with
    `pages_adjacent`, which reads the real frames. Yields the number of pages freed.
    The calling process stays on one CPU until the block ends. mib=0: no
    fragmentation."""
    if mib <= 0:
        yield 0
        return
    # Freed pages go to the freeing CPU's per-cpu free list first, and a CPU allocates from
    # its own list first: stay on one CPU so the allocations inside the block find them.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    size = mib << 20
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        # 4 KiB pages only: a transparent hugepage would be split, not freed, by DONTNEED
        region.madvise(mmap.MADV_NOHUGEPAGE)
        for offset in range(0, size, PAGE_SIZE):  # fault every page in, in address order
            region[offset] = 1
        freed = 0
        for offset in range(PAGE_SIZE, size, 2 * PAGE_SIZE):
            region.madvise(mmap.MADV_DONTNEED, offset, PAGE_SIZE)
            freed += 1
        yield freed
    finally:
        region.close()
        os.sched_setaffinity(0, affinity)


def physical_frame(vaddr: int) -> int:
    """The guest-physical page frame number behind a virtual address of this process."""
    fd = os.open(PAGEMAP, os.O_RDONLY)
    try:
        entry = os.pread(fd, PAGEMAP_ENTRY_BYTES, vaddr // PAGE_SIZE * PAGEMAP_ENTRY_BYTES)
    finally:
        os.close(fd)
    (bits,) = struct.unpack("<Q", entry)
    if not bits & PAGEMAP_PRESENT:
        raise GuestMemoryError(f"no page present at {vaddr:#x}")
    frame = bits & PAGEMAP_PFN_MASK
    if frame == 0:
        raise GuestMemoryError(f"{PAGEMAP} hides frame numbers: run as root")
    return frame


def kernel_page_size(vaddr: int) -> int:
    """The page size (bytes) of the mapping of this process that holds `vaddr`, as the
    kernel reports it in /proc/self/smaps (2 MiB for hugetlb memory)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= vaddr < end
            elif inside and first == "KernelPageSize:":
                return int(line.split()[1]) * 1024
    raise GuestMemoryError(f"no mapping holds {vaddr:#x}")


def crosses_page(vaddr: int, length: int) -> bool:
    """Whether [vaddr, vaddr + length) touches more than one 4 KiB page."""
    return vaddr // PAGE_SIZE != (vaddr + length - 1) // PAGE_SIZE


def pages_adjacent(vaddr: int, length: int) -> bool:
    """Whether the 4 KiB pages under [vaddr, vaddr + length) are consecutive guest-physical
    frames (True for a buffer inside one page)."""
    first, last = vaddr // PAGE_SIZE, (vaddr + length - 1) // PAGE_SIZE
    frames = [physical_frame(page * PAGE_SIZE) for page in range(first, last + 1)]
    return all(b == a + 1 for a, b in zip(frames, frames[1:], strict=False))
