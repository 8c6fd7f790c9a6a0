/* ixyd VFIO ABI: the kernel's own VFIO and PCI headers, plus the three tiny helpers Python
 * cannot do safely by itself.
 *
 * Nothing here copies a number or a struct layout from the kernel: build_vfio.py declares
 * the structs with "...;" and the constants with "...", so the C compiler fills in sizes,
 * field offsets and values from <linux/vfio.h> and <linux/pci_regs.h> at build time.
 * The IOVA-range capability needs uapi headers from Linux 5.4 or newer.
 *
 * Helpers:
 *  - ixyd_vfio_ioctl: ioctl(2) that returns -errno instead of -1, so the caller never
 *    races another thread for errno, and the GIL is released for slow calls (MAP_DMA
 *    pins pages: 10-17 ms for 2 MiB in the test guest, docs/reference/vfio-guest.md#timings).
 *  - ixyd_vfio_read32 / ixyd_vfio_write32: one aligned volatile 32-bit load or store to a
 *    mapped BAR (device.py: every register access is exactly one such access).
 *  - ixyd_vfio_mmap / ixyd_vfio_munmap: map a device region MAP_SHARED; NULL on failure.
 */
#ifndef IXYD_VFIO_ABI_H
#define IXYD_VFIO_ABI_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/types.h>

#include <linux/pci_regs.h>
#include <linux/vfio.h>

static inline int ixyd_vfio_ioctl(int fd, unsigned long request, void *arg)
{
    int rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

static inline int ixyd_vfio_ioctl_value(int fd, unsigned long request, unsigned long value)
{
    int rc = ioctl(fd, request, value);
    return rc < 0 ? -errno : rc;
}

static inline uint32_t ixyd_vfio_read32(volatile uint32_t *bar, uint32_t offset)
{
    return bar[offset / sizeof(uint32_t)];
}

static inline void ixyd_vfio_write32(volatile uint32_t *bar, uint32_t offset, uint32_t value)
{
    bar[offset / sizeof(uint32_t)] = value;
}

/* Returns the mapping, or NULL with *error set to errno. */
static inline void *ixyd_vfio_mmap(int fd, uint64_t size, uint64_t offset, int *error)
{
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    if (p == MAP_FAILED) {
        *error = errno;
        return NULL;
    }
    *error = 0;
    return p;
}

static inline int ixyd_vfio_munmap(void *addr, uint64_t size)
{
    return munmap(addr, (size_t)size) < 0 ? -errno : 0;
}

#endif
