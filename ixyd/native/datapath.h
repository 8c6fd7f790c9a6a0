/* ixyd datapath: mempool, RX/TX descriptor rings and the forwarding loop of the 82599.
 *
 * Everything here touches packets; everything that decides (init order, link, config)
 * is Python. The block between the cdef markers is read verbatim by build_datapath.py as
 * the cffi declarations, so it must stay plain C that cffi can parse: no includes,
 * attributes or static asserts inside it.
 *
 * Threading: one queue and one mempool belong to one thread. The device (hardware or the
 * model's thread) is synchronised with acquire loads of descriptor status words and
 * release stores of the tail registers.
 */
#ifndef IXYD_DATAPATH_H
#define IXYD_DATAPATH_H

#include <stddef.h>
#include <stdint.h>

/* --- cffi cdef begin --- */

#define IXYD_PKT_HEADROOM 128   /* data[] starts 128 bytes into every pool entry */
#define IXYD_TX_CLEAN_BATCH 32  /* TX buffers are reclaimed 32 at a time (DPDK tx_rs_thresh) */
#define IXYD_MAX_BATCH 256
#define IXYD_RXE_82599 0x20000000    /* RXE, bit 29 (nic-facts B.2); on the 82576 bit 29 is L4E */
#define IXYD_RXE_82576 0x80000000    /* RXE, bit 31 (nic-facts C.3) */      /* largest batch ixyd_forward accepts */

/* Header of one pool entry, in DMA memory. The device sees only data[]. */
struct ixyd_pkt {
    uint64_t data_iova;          /* IOVA of data[] (entry IOVA + IXYD_PKT_HEADROOM) */
    struct ixyd_mempool *pool;   /* pool this entry is returned to */
    uint32_t index;              /* entry index in the pool */
    uint16_t len;                /* frame length in bytes */
    uint16_t reserved;
    uint32_t rss_hash;           /* from the RX write-back */
    uint32_t rx_info;            /* RX write-back low dword: RSS type 3:0, packet type 16:4 */
    uint8_t headroom[IXYD_PKT_HEADROOM - 32];
    uint8_t data[];              /* 128-byte aligned */
};

/* Fixed-size buffers carved from one contiguous DMA area; free list is a stack of indices. */
struct ixyd_mempool {
    uint8_t *base;               /* host address of entry 0, 128-byte aligned */
    uint64_t base_iova;          /* IOVA of entry 0, 128-byte aligned */
    uint32_t entry_size;         /* bytes per entry, multiple of 128, >= 256 */
    uint32_t count;              /* number of entries */
    uint32_t free_top;           /* number of free indices on the stack */
    uint32_t *free_stack;        /* count entries */
};

struct ixyd_rxq_stats {
    uint64_t packets;
    uint64_t bytes;
    uint64_t drop_no_buffer;         /* pool empty: the frame's buffer went back to the ring */
    uint64_t drop_multi_descriptor;  /* frames spanning several descriptors, counted once */
    uint64_t drop_errors;            /* RXE set in the write-back */
};

struct ixyd_rxq {
    volatile uint8_t *ring;      /* host address of descriptor 0 */
    volatile uint32_t *rdt;      /* BAR0 + RDT offset */
    struct ixyd_pkt **slots;     /* buffer owned by each descriptor; size entries */
    struct ixyd_mempool *pool;   /* replacements come from here */
    uint32_t size;               /* descriptors, power of two */
    uint32_t next;               /* next descriptor to look at */
    uint32_t in_multi;           /* 1 while discarding the rest of a multi-descriptor frame */
    uint32_t error_mask;         /* write-back error bits that drop a frame: the MAC error bit,
                                    which differs per family (IXYD_RXE_82599 / IXYD_RXE_82576);
                                    ixyd_rxq_init sets the 82599's */
    struct ixyd_rxq_stats stats;
};

struct ixyd_txq_stats {
    uint64_t packets;
    uint64_t bytes;
    uint64_t drop_ring_full;     /* not counted by ixyd_tx_batch; for the caller */
};

struct ixyd_txq {
    volatile uint8_t *ring;      /* host address of descriptor 0 */
    volatile uint32_t *tdt;      /* BAR0 + TDT offset */
    struct ixyd_pkt **slots;     /* buffer queued on each descriptor; size entries */
    uint32_t size;               /* descriptors, power of two, >= 64 */
    uint32_t tail;               /* next descriptor to fill (our copy of TDT) */
    uint32_t clean;              /* oldest descriptor not yet reclaimed, multiple of 32 */
    uint32_t pad;
    struct ixyd_txq_stats stats;
};

/* Published to shared memory: plain aligned 64-bit stores, a reader may see a slightly
 * old value but never a torn one. */
struct ixyd_fwd_stats {
    uint64_t packets;            /* frames sent on */
    uint64_t bytes;              /* bytes of those frames */
    uint64_t drop_tx_full;       /* received but TX ring full: freed */
    uint64_t iterations;         /* RX polls */
    uint64_t empty_polls;        /* RX polls that returned nothing */
};

/* Mempool. init returns 0, or -1 when base or base_iova is not 128-byte aligned, entry_size
 * is not a multiple of 128 or is < 256, count is 0 or a pointer is NULL. */
int ixyd_mempool_init(struct ixyd_mempool *mp, void *base, uint64_t base_iova,
                      uint32_t entry_size, uint32_t count, uint32_t *stack);
uint32_t ixyd_pkt_alloc_bulk(struct ixyd_mempool *mp, struct ixyd_pkt **out, uint32_t n);
void ixyd_pkt_free_bulk(struct ixyd_pkt **pkts, uint32_t n);
void ixyd_pkt_free(struct ixyd_pkt *p);

/* RX queue. init gives every descriptor a fresh buffer but does not write RDT (the
 * driver writes RDH = 0, RDT = size - 1 after enabling the queue). Returns 0, or -1 for a
 * bad size (power of two, 8..8192) or a pool with fewer than size free buffers.
 * rx_batch examines at most max descriptors and returns the frames among them; dropped
 * frames (pool empty, multi-descriptor, RXE) are counted in stats and their buffers
 * re-armed. rxq_free_all (queue disabled) returns every ring buffer to the pool; the
 * queue must be initialised again before reuse. */
int ixyd_rxq_init(struct ixyd_rxq *q, void *ring, volatile uint32_t *rdt,
                  struct ixyd_pkt **slots, struct ixyd_mempool *pool, uint32_t size);
uint32_t ixyd_rx_batch(struct ixyd_rxq *q, struct ixyd_pkt **out, uint32_t max);
uint32_t ixyd_rxq_free_all(struct ixyd_rxq *q);

/* TX queue. init returns 0, or -1 for a bad size (power of two, 64..8192).
 * tx_batch reclaims finished groups of 32, queues as many of pkts as fit and returns how
 * many; the caller still owns the rest. txq_reclaim only reclaims (returns buffers freed).
 * txq_free_all (queue disabled) frees everything in flight regardless of DD and restarts
 * the ring at 0: the driver resets TDH and TDT before enabling the queue again. */
int ixyd_txq_init(struct ixyd_txq *q, void *ring, volatile uint32_t *tdt,
                  struct ixyd_pkt **slots, uint32_t size);
uint32_t ixyd_tx_batch(struct ixyd_txq *q, struct ixyd_pkt **pkts, uint32_t n);
uint32_t ixyd_txq_reclaim(struct ixyd_txq *q);
uint32_t ixyd_txq_free_all(struct ixyd_txq *q);

/* Forwarding rx -> tx until *stop != 0, or for a fixed number of RX polls; batch is
 * clamped to 1..IXYD_MAX_BATCH. Both add to *st (which may live in shared memory; it is
 * published after every poll) and return the number of packets sent in this call. */
uint64_t ixyd_forward(struct ixyd_rxq *rx, struct ixyd_txq *tx, uint32_t batch,
                      volatile uint32_t *stop, struct ixyd_fwd_stats *st);
uint64_t ixyd_forward_iterations(struct ixyd_rxq *rx, struct ixyd_txq *tx, uint32_t batch,
                                 uint64_t iterations, struct ixyd_fwd_stats *st);

/* One aligned 32-bit access to a mapped BAR; offset in bytes. */
uint32_t ixyd_mmio_read32(volatile uint32_t *bar, uint32_t offset);
void ixyd_mmio_write32(volatile uint32_t *bar, uint32_t offset, uint32_t value);

/* --- cffi cdef end --- */

_Static_assert(offsetof(struct ixyd_pkt, data) == IXYD_PKT_HEADROOM,
               "packet data must start IXYD_PKT_HEADROOM bytes into the entry");
_Static_assert(IXYD_PKT_HEADROOM % 128 == 0, "82599 buffers are 128-byte aligned");
_Static_assert(sizeof(struct ixyd_fwd_stats) == 5 * sizeof(uint64_t), "published layout");

#endif /* IXYD_DATAPATH_H */
