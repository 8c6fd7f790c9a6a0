"""DMA memory: IOVAs only inside the IOMMU's valid ranges, alignment, tracking, release."""

import pytest

from ixyd.dma import PAGE_SIZE, DmaMapper, DmaMemory, IovaAllocator, free_hugepages
from ixyd.errors import DmaError, IovaExhaustedError
from ixyd.model import ModelNic


def test_iovas_come_only_from_the_valid_ranges():
    ranges = [(0x0, 0xFFFF), (0x100000, 0x1FFFFF)]
    alloc = IovaAllocator(ranges)
    got = [alloc.allocate(0x6000) for _ in range(3)]
    assert got[0] == PAGE_SIZE  # the zero page is never handed out
    assert got[1] == PAGE_SIZE + 0x6000
    assert got[2] == 0x100000  # did not fit in the rest of the first range
    big = alloc.allocate(0x80000, alignment=0x80000)
    assert big == 0x180000 and big + 0x80000 - 1 <= 0x1FFFFF
    with pytest.raises(IovaExhaustedError, match="inside the valid ranges"):
        alloc.allocate(0x100000)


def test_released_iovas_merge_and_are_reused():
    alloc = IovaAllocator([(0, 0xFFFFF)])
    a, b = alloc.allocate(0x10000), alloc.allocate(0x10000)
    alloc.release(a, 0x10000)
    alloc.release(b, 0x10000)
    assert alloc.allocate(0x20000) == a


def test_bad_ranges_and_sizes_are_clear_errors():
    with pytest.raises(DmaError, match="no usable IOVA range"):
        IovaAllocator([(0, 0xFFF)])
    with pytest.raises(ValueError):
        IovaAllocator([(0x2000, 0x1000)])
    with pytest.raises(ValueError):
        IovaAllocator([(0, 0xFFFFF)]).allocate(0)


class RecordingMapper(DmaMapper):
    def __init__(self, ranges):
        self.ranges, self.live = ranges, {}

    def valid_iova_ranges(self):
        return self.ranges

    def map_dma(self, vaddr, iova, size):
        assert all(iova + size <= k or k + s <= iova for k, s in self.live.items())
        self.live[iova] = size

    def unmap_dma(self, iova, size):
        assert self.live.pop(iova) == size


def test_buffers_are_aligned_and_every_mapping_is_released():
    mapper = RecordingMapper([(0x40000000, 0x7FFFFFFF)])
    mem = DmaMemory(mapper, chunk_size=64 * 1024)
    bufs = [mem.alloc(size) for size in (16, 1000, 2176 * 8, 100_000, 5)]
    for buf in bufs:
        assert buf.iova % 128 == 0 and buf.vaddr % 128 == 0
        assert 0x40000000 <= buf.iova and buf.iova + buf.size - 1 <= 0x7FFFFFFF
        assert buf.iova != buf.vaddr
        assert bytes(buf.view()[:16]) == bytes(min(16, buf.size))  # zero-filled
    assert len(mapper.live) == len(mem.mappings) >= 2
    mem.free(bufs[3])  # the big one had a chunk of its own
    assert len(mapper.live) == len(mem.mappings)
    mem.close()
    assert mapper.live == {} and mem.mappings == []
    with pytest.raises(DmaError, match="closed"):
        mem.alloc(16)


def test_buffers_do_not_overlap():
    mem = DmaMemory(RecordingMapper([(0, 1 << 32)]), chunk_size=16384)
    spans = sorted((b.iova, b.iova + b.size) for b in (mem.alloc(3000) for _ in range(20)))
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    mem.close()


def test_allocation_works_without_hugepages():
    mem = DmaMemory(RecordingMapper([(0, 1 << 32)]), prefer_hugepages=free_hugepages() > 0)
    buf = mem.alloc(4096, alignment=4096)
    buf.view()[:4] = b"ixyd"
    assert bytes(buf.view()[:4]) == b"ixyd"
    mem.close()


def test_model_iommu_refuses_mappings_outside_its_ranges():
    with ModelNic(1, mode="step", iova_ranges=[(0x400000, 0xBFFFFF)]) as nic:
        with pytest.raises(DmaError, match="outside the valid IOVA ranges"):
            nic.iommu.map_dma(0x1000, 0xC00000, 4096)
        buf = nic.dma.alloc(4096)
        assert 0x400000 <= buf.iova <= 0xBFFFFF
        assert nic.mapping_count == 1
        nic.dma.free(buf)
        assert nic.mapping_count == 0


def test_closing_the_model_unmaps_everything():
    nic = ModelNic(2, mode="step")
    for _ in range(3):
        nic.dma.alloc(1_500_000)  # each needs a chunk of its own
    assert nic.mapping_count == 3
    nic.dma.close()
    assert nic.mapping_count == 0 and nic.iommu.map_calls == nic.iommu.unmap_calls == 3
    nic.close()
