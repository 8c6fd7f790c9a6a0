/* ixyd datapath: the code that touches every packet.
 *
 * Ring mechanics follow the 82599 datasheet (rev 3.3) sections 1.8 and 7.1/7.2 as ixy
 * implements them, with two changes for a long-running daemon
 * (docs/reference/peers.md#ixys-defects-for-a-long-running-daemon): an empty pool, a
 * multi-descriptor frame or a MAC error drop the frame and count it instead of exiting,
 * and TX sets RS only on every 32nd descriptor (DPDK's tx_rs_thresh) so the device
 * writes back one descriptor per clean-up batch instead of all of them.
 *
 * Memory ordering: the device is either hardware or the model's thread in this process.
 * RX status is read with an acquire load (the write-back fields and the frame are valid
 * only once DD is seen); RDT and TDT are written with one release store per batch after
 * plain volatile descriptor stores. Descriptors are little-endian, like the host.
 */
#include "datapath.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "descriptors are little-endian and are accessed without byte swaps"
#endif

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define RING_MAX 8192                  /* DPDK's limit (docs/reference/82599.md#ring-mechanics) */
#define RX_RING_MIN 8                  /* RDLEN must be a multiple of 128 bytes (8 descs) */
#define TX_RING_MIN 64                 /* two clean-up batches */

/* Advanced RX descriptor (docs/reference/82599.md#rx-descriptors). Read and write-back
 * formats share the 16 bytes: writing hdr_addr = 0 also clears DD. */
union rx_desc {
    struct { uint64_t pkt_addr, hdr_addr; } read;
    struct {
        uint32_t lo;                   /* RSS type 3:0, packet type 16:4 */
        uint32_t rss_hash;
        uint32_t status_error;
        uint16_t length, vlan;
    } wb;
};
#define RX_STAT_DD  0x00000001u
#define RX_STAT_EOP 0x00000002u

/* Advanced TX data descriptor (docs/reference/82599.md#tx-descriptors). */
union tx_desc {
    struct { uint64_t buffer_addr; uint32_t cmd_type_len, olinfo_status; } read;
    struct { uint64_t reserved; uint32_t nxtseq_seed, status; } wb;
};
#define TX_DTYP_DATA 0x00300000u
#define TX_CMD_EOP   0x01000000u
#define TX_CMD_IFCS  0x02000000u
#define TX_CMD_RS    0x08000000u
#define TX_CMD_DEXT  0x20000000u
#define TX_CMD_DATA  (TX_DTYP_DATA | TX_CMD_EOP | TX_CMD_IFCS | TX_CMD_DEXT)
#define TX_PAYLEN_SHIFT 14
#define TX_STAT_DD   0x00000001u

_Static_assert(sizeof(union rx_desc) == 16, "RX descriptor is 16 bytes");
_Static_assert(sizeof(union tx_desc) == 16, "TX descriptor is 16 bytes");
_Static_assert(offsetof(union rx_desc, wb.status_error) == 8, "RX status at byte 8");
_Static_assert(offsetof(union rx_desc, wb.length) == 12, "RX length at byte 12");
_Static_assert(offsetof(union tx_desc, wb.status) == 12, "TX DD in the dword at byte 12");

static inline int is_pow2(uint32_t x) { return x && !(x & (x - 1)); }

/* ---------------------------------------------------------------- mempool */

int ixyd_mempool_init(struct ixyd_mempool *mp, void *base, uint64_t base_iova,
                      uint32_t entry_size, uint32_t count, uint32_t *stack)
{
    /* 128-byte alignment for every entry (and so every data[]): 82599 DMA, ixy memory.c.
     * 256 bytes at least: the headroom and 128 bytes of data. */
    if (!mp || !base || !stack || count == 0 || entry_size < 256 || entry_size % 128 ||
        (uintptr_t)base % 128 || base_iova % 128)
        return -1;
    mp->base = base;
    mp->base_iova = base_iova;
    mp->entry_size = entry_size;
    mp->count = count;
    mp->free_stack = stack;
    for (uint32_t i = 0; i < count; i++) {
        struct ixyd_pkt *p = (struct ixyd_pkt *)(mp->base + (uint64_t)i * entry_size);
        p->data_iova = base_iova + (uint64_t)i * entry_size + IXYD_PKT_HEADROOM;
        p->pool = mp;
        p->index = i;
        p->len = 0;
        p->reserved = 0;
        p->rss_hash = 0;
        p->rx_info = 0;
        stack[i] = count - 1 - i;      /* entry 0 on top: allocation starts at the base */
    }
    mp->free_top = count;
    return 0;
}

static inline struct ixyd_pkt *entry(const struct ixyd_mempool *mp, uint32_t index)
{
    return (struct ixyd_pkt *)(mp->base + (uint64_t)index * mp->entry_size);
}

uint32_t ixyd_pkt_alloc_bulk(struct ixyd_mempool *mp, struct ixyd_pkt **out, uint32_t n)
{
    uint32_t top = mp->free_top;
    if (n > top)
        return 0;                      /* all or nothing */
    for (uint32_t k = 0; k < n; k++)
        out[k] = entry(mp, mp->free_stack[--top]);
    mp->free_top = top;
    return n;
}

/* Push each buffer onto its own pool, keeping the current pool's stack top in a
 * register: consecutive buffers almost always share a pool. */
static inline void free_bulk(struct ixyd_pkt *const *pkts, uint32_t n)
{
    struct ixyd_mempool *mp = NULL;
    uint32_t *sp = NULL;
    for (uint32_t k = 0; k < n; k++) {
        struct ixyd_pkt *p = pkts[k];
        if (unlikely(p->pool != mp)) {
            if (mp)
                mp->free_top = (uint32_t)(sp - mp->free_stack);
            mp = p->pool;
            sp = mp->free_stack + mp->free_top;
        }
        *sp++ = p->index;
    }
    if (mp)
        mp->free_top = (uint32_t)(sp - mp->free_stack);
}

void ixyd_pkt_free_bulk(struct ixyd_pkt **pkts, uint32_t n) { free_bulk(pkts, n); }

void ixyd_pkt_free(struct ixyd_pkt *p) { p->pool->free_stack[p->pool->free_top++] = p->index; }

/* ---------------------------------------------------------------- RX */

static inline void rx_arm(volatile union rx_desc *d, uint64_t iova)
{
    d->read.pkt_addr = iova;
    d->read.hdr_addr = 0;              /* bit 0 aliases DD: must be clear (docs/reference/82599.md#rx-descriptors) */
}

int ixyd_rxq_init(struct ixyd_rxq *q, void *ring, volatile uint32_t *rdt,
                  struct ixyd_pkt **slots, struct ixyd_mempool *pool, uint32_t size)
{
    if (!q || !ring || !rdt || !slots || !pool || !is_pow2(size) || size < RX_RING_MIN ||
        size > RING_MAX)
        return -1;
    if (ixyd_pkt_alloc_bulk(pool, slots, size) != size)
        return -1;
    *q = (struct ixyd_rxq){.ring = ring, .rdt = rdt, .slots = slots, .pool = pool, .size = size,
                           .error_mask = IXYD_RXE_82599};
    volatile union rx_desc *descs = (volatile union rx_desc *)q->ring;
    for (uint32_t i = 0; i < size; i++)
        rx_arm(&descs[i], slots[i]->data_iova);
    return 0;
}

/* One compare decides the fast path: (status & check) == expect, where check is DD, EOP and
 * the queue's MAC error bit. expect is RX_GOOD (DD, EOP, no MAC error) normally and
 * RX_IN_MULTI while the rest of a multi-descriptor frame is discarded; RX_IN_MULTI lacks
 * DD, so it never matches a completed descriptor and every one of them takes the slow path
 * until the frame's EOP. */
#define RX_GOOD     (RX_STAT_DD | RX_STAT_EOP)
#define RX_IN_MULTI RX_STAT_EOP

/* The batch loop, instantiated twice: pool_may_run_dry = 0 when the pool holds at least
 * max buffers (one check per batch, none per packet), 1 otherwise. The ring is walked
 * with pointers in at most two runs (up to the end of the ring, then from its start), so
 * no index is masked per packet. Replacements are popped inline from the pool's stack,
 * and a fresh buffer's IOVA is computed rather than read from its header, so the CPU
 * never touches a replacement buffer. */
static inline __attribute__((always_inline)) uint32_t
rx_loop(struct ixyd_rxq *q, struct ixyd_pkt **out, uint32_t max, const int pool_may_run_dry)
{
    volatile union rx_desc *ring = (volatile union rx_desc *)q->ring;
    volatile union rx_desc *ring_end = ring + q->size, *d = ring + q->next;
    struct ixyd_pkt **slot = q->slots + q->next, **outp = out;
    struct ixyd_mempool *mp = q->pool;
    uint32_t *stack = mp->free_stack, *sp = stack + mp->free_top;
    uint8_t *base = mp->base;
    uint64_t entry_size = mp->entry_size;
    uint64_t iova_delta = mp->base_iova + IXYD_PKT_HEADROOM - (uintptr_t)base;
    uint32_t expect = q->in_multi ? RX_IN_MULTI : RX_GOOD;
    const uint32_t check = RX_STAT_DD | RX_STAT_EOP | q->error_mask;
    uint32_t left = max, dropped = 0;
    uint64_t bytes = 0;

    while (left) {
        uint32_t run = (uint32_t)(ring_end - d) < left ? (uint32_t)(ring_end - d) : left;
        volatile union rx_desc *run_end = d + run;
        left -= run;
        for (; d != run_end; d++, slot++) {
            uint32_t status = __atomic_load_n(&d->wb.status_error, __ATOMIC_ACQUIRE);
            struct ixyd_pkt *pkt = *slot;
            if (unlikely((status & check) != expect || (pool_may_run_dry && sp == stack))) {
                if (!(status & RX_STAT_DD))
                    goto done;
                /* Drop: the buffer goes straight back to its descriptor. A frame that
                 * spans several descriptors is counted once, at its EOP descriptor. */
                if (expect == RX_IN_MULTI) {
                    if (status & RX_STAT_EOP) {
                        expect = RX_GOOD;
                        q->stats.drop_multi_descriptor++;
                    }
                } else if (!(status & RX_STAT_EOP)) {
                    expect = RX_IN_MULTI;
                } else if (status & q->error_mask) {
                    q->stats.drop_errors++;
                } else {
                    q->stats.drop_no_buffer++;
                }
                rx_arm(d, pkt->data_iova);
                dropped++;
                continue;
            }
            uint8_t *fresh = base + *--sp * entry_size;
            uint64_t info = d->read.pkt_addr;      /* write-back lo and rss_hash at once */
            uint16_t len = d->wb.length;
            pkt->len = len;
            pkt->rss_hash = (uint32_t)(info >> 32);
            pkt->rx_info = (uint32_t)info;
            bytes += len;
            *outp++ = pkt;
            *slot = (struct ixyd_pkt *)fresh;
            rx_arm(d, (uintptr_t)fresh + iova_delta);
        }
        if (d == ring_end) {
            d = ring;
            slot = q->slots;
        }
    }
done:;
    uint32_t n = (uint32_t)(outp - out);
    if (n + dropped) {
        uint32_t next = (uint32_t)(d - ring);
        mp->free_top = (uint32_t)(sp - stack);
        q->next = next;
        q->in_multi = expect == RX_IN_MULTI;
        q->stats.packets += n;
        q->stats.bytes += bytes;
        /* Hand the descriptors back, staying one behind: RDT == RDH means "no free
         * descriptor" to the device (docs/reference/82599.md#ring-mechanics; ixy
         * ixgbe_rx_batch). */
        __atomic_store_n(q->rdt, (next - 1) & (q->size - 1), __ATOMIC_RELEASE);
    }
    return n;
}

uint32_t ixyd_rx_batch(struct ixyd_rxq *q, struct ixyd_pkt **out, uint32_t max)
{
    if (likely(q->pool->free_top >= max))
        return rx_loop(q, out, max, 0);
    return rx_loop(q, out, max, 1);
}

/* Shutdown, after the queue is disabled. The descriptors still point at the buffers, so
 * the queue must be set up again with ixyd_rxq_init before it is enabled. */
uint32_t ixyd_rxq_free_all(struct ixyd_rxq *q)
{
    uint32_t freed = 0;
    for (uint32_t i = 0; i < q->size; i++) {
        if (q->slots[i]) {
            ixyd_pkt_free(q->slots[i]);
            q->slots[i] = NULL;
            freed++;
        }
    }
    return freed;
}

/* ---------------------------------------------------------------- TX */

int ixyd_txq_init(struct ixyd_txq *q, void *ring, volatile uint32_t *tdt,
                  struct ixyd_pkt **slots, uint32_t size)
{
    if (!q || !ring || !tdt || !slots || !is_pow2(size) || size < TX_RING_MIN ||
        size > RING_MAX)
        return -1;
    *q = (struct ixyd_txq){.ring = ring, .tdt = tdt, .slots = slots, .size = size};
    for (uint32_t i = 0; i < size; i++)
        slots[i] = NULL;
    return 0;
}

/* Reclaim sent buffers in groups of IXYD_TX_CLEAN_BATCH. RS is set only on the last
 * descriptor of each group, and with WTHRESH = 0 the device writes DD only where RS is set,
 * so DD there proves the whole group is done. clean is always a multiple of 32 and the
 * ring size too, so a group never wraps. Clean the whole group or nothing. */
static inline uint32_t tx_clean(struct ixyd_txq *q)
{
    volatile union tx_desc *ring = (volatile union tx_desc *)q->ring;
    uint32_t mask = q->size - 1, clean = q->clean, tail = q->tail, freed = 0;
    while (((tail - clean) & mask) >= IXYD_TX_CLEAN_BATCH) {
        volatile union tx_desc *last = &ring[clean + IXYD_TX_CLEAN_BATCH - 1];
        if (!(__atomic_load_n(&last->wb.status, __ATOMIC_ACQUIRE) & TX_STAT_DD))
            break;
        free_bulk(&q->slots[clean], IXYD_TX_CLEAN_BATCH);
        clean = (clean + IXYD_TX_CLEAN_BATCH) & mask;
        freed += IXYD_TX_CLEAN_BATCH;
    }
    q->clean = clean;
    return freed;
}

/* Fill n consecutive descriptors (no wrap inside); returns their bytes. */
static inline uint64_t tx_fill(volatile union tx_desc *d, struct ixyd_pkt **slot,
                               struct ixyd_pkt *const *pkts, uint32_t n)
{
    uint64_t bytes = 0;
    for (uint32_t k = 0; k < n; k++) {
        struct ixyd_pkt *p = pkts[k];
        uint32_t len = p->len;
        slot[k] = p;
        d[k].read.buffer_addr = p->data_iova;
        d[k].read.cmd_type_len = TX_CMD_DATA | len;
        d[k].read.olinfo_status = len << TX_PAYLEN_SHIFT;   /* also clears a stale DD */
        bytes += len;
    }
    return bytes;
}

uint32_t ixyd_tx_batch(struct ixyd_txq *q, struct ixyd_pkt **pkts, uint32_t n)
{
    tx_clean(q);
    volatile union tx_desc *ring = (volatile union tx_desc *)q->ring;
    uint32_t mask = q->size - 1, tail = q->tail;
    uint32_t room = (q->clean - tail - 1) & mask;   /* full when next tail == clean */
    if (n > room)
        n = room;
    if (n == 0)
        return 0;
    uint32_t first = q->size - tail < n ? q->size - tail : n;   /* up to the ring's end */
    uint64_t bytes = tx_fill(ring + tail, q->slots + tail, pkts, first);
    if (first < n)
        bytes += tx_fill(ring, q->slots, pkts + first, n - first);
    /* RS on descriptors with index & 31 == 31 only: about one per batch, so it is set
     * afterwards instead of being computed for every packet. */
    for (uint32_t k = ~tail & (IXYD_TX_CLEAN_BATCH - 1); k < n; k += IXYD_TX_CLEAN_BATCH)
        ring[(tail + k) & mask].read.cmd_type_len |= TX_CMD_RS;
    tail = (tail + n) & mask;
    q->tail = tail;
    q->stats.packets += n;
    q->stats.bytes += bytes;
    __atomic_store_n(q->tdt, tail, __ATOMIC_RELEASE);
    return n;
}

uint32_t ixyd_txq_reclaim(struct ixyd_txq *q) { return tx_clean(q); }

/* Shutdown, after the queue is disabled: the device will not read these buffers again,
 * DD or not. The ring restarts at 0 (clean stays a multiple of 32); the driver resets
 * TDH and TDT before it enables the queue again. */
uint32_t ixyd_txq_free_all(struct ixyd_txq *q)
{
    uint32_t mask = q->size - 1, freed = 0;
    for (uint32_t i = q->clean; i != q->tail; i = (i + 1) & mask) {
        ixyd_pkt_free(q->slots[i]);
        q->slots[i] = NULL;
        freed++;
    }
    q->clean = q->tail = 0;
    return freed;
}

/* ---------------------------------------------------------------- forwarding */

/* Relaxed atomic stores compile to plain 64-bit moves; they keep the compiler from
 * deferring the publication to the end of the loop. */
#define PUBLISH(dst, v) __atomic_store_n(&(dst), (v), __ATOMIC_RELAXED)

static inline void publish(struct ixyd_fwd_stats *st, const struct ixyd_fwd_stats *acc)
{
    PUBLISH(st->packets, acc->packets);
    PUBLISH(st->bytes, acc->bytes);
    PUBLISH(st->drop_tx_full, acc->drop_tx_full);
    PUBLISH(st->iterations, acc->iterations);
    PUBLISH(st->empty_polls, acc->empty_polls);
}

/* One poll: receive, touch each frame as ixy-fwd does (so the data is really read and
 * written), send, and drop what the TX ring has no room for ("better to drop them,
 * otherwise we accumulate latency" - ixy-fwd). */
static inline void forward_once(struct ixyd_rxq *rx, struct ixyd_txq *tx, uint32_t batch,
                                struct ixyd_pkt **bufs, struct ixyd_fwd_stats *acc)
{
    uint32_t n = ixyd_rx_batch(rx, bufs, batch);
    acc->iterations++;
    if (n == 0) {
        /* Reclaim sent buffers even when nothing arrives: when the RX pool has run dry,
         * rx_batch drops everything and returns 0, and only this refills the pool
         * (otherwise the loop never calls tx_batch again and stays stuck). */
        tx_clean(tx);
        acc->empty_polls++;
        return;
    }
    for (uint32_t k = 0; k < n; k++)
        bufs[k]->data[1]++;
    uint64_t tx_bytes = tx->stats.bytes;
    uint32_t sent = ixyd_tx_batch(tx, bufs, n);
    if (unlikely(sent < n)) {
        free_bulk(&bufs[sent], n - sent);
        acc->drop_tx_full += n - sent;
    }
    acc->packets += sent;
    acc->bytes += tx->stats.bytes - tx_bytes;
}

static inline uint32_t clamp_batch(uint32_t batch)
{
    return batch == 0 ? 1 : batch > IXYD_MAX_BATCH ? IXYD_MAX_BATCH : batch;
}

uint64_t ixyd_forward(struct ixyd_rxq *rx, struct ixyd_txq *tx, uint32_t batch,
                      volatile uint32_t *stop, struct ixyd_fwd_stats *st)
{
    struct ixyd_pkt *bufs[IXYD_MAX_BATCH];
    struct ixyd_fwd_stats acc = *st;
    uint64_t start = acc.packets;
    batch = clamp_batch(batch);
    while (!__atomic_load_n(stop, __ATOMIC_RELAXED)) {
        forward_once(rx, tx, batch, bufs, &acc);
        publish(st, &acc);
    }
    return acc.packets - start;
}

uint64_t ixyd_forward_iterations(struct ixyd_rxq *rx, struct ixyd_txq *tx, uint32_t batch,
                                 uint64_t iterations, struct ixyd_fwd_stats *st)
{
    struct ixyd_pkt *bufs[IXYD_MAX_BATCH];
    struct ixyd_fwd_stats acc = *st;
    uint64_t start = acc.packets;
    batch = clamp_batch(batch);
    for (uint64_t it = 0; it < iterations; it++) {
        forward_once(rx, tx, batch, bufs, &acc);
        publish(st, &acc);
    }
    return acc.packets - start;
}

/* ---------------------------------------------------------------- SPSC rings */

int ixyd_spsc_init(struct ixyd_spsc *r, struct ixyd_pkt **slots, uint32_t size)
{
    if (!r || !slots || !is_pow2(size) || size < 2 || size > 65536)
        return -1;
    *r = (struct ixyd_spsc){.slots = slots, .mask = size - 1};
    return 0;
}

/* Producer: acquire the consumer's tail (it has read the slots it freed), fill, release head. */
static inline uint32_t spsc_push(struct ixyd_spsc *r, struct ixyd_pkt *const *pkts, uint32_t n)
{
    uint32_t head = __atomic_load_n(&r->head, __ATOMIC_RELAXED);   /* our own index */
    uint32_t room = r->mask + 1 - (head - __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE));
    if (n > room)
        n = room;
    for (uint32_t k = 0; k < n; k++)
        r->slots[(head + k) & r->mask] = pkts[k];
    if (n)
        __atomic_store_n(&r->head, head + n, __ATOMIC_RELEASE);
    return n;
}

/* Consumer: acquire the producer's head (slots and frames are written), read, release tail. */
static inline uint32_t spsc_pop(struct ixyd_spsc *r, struct ixyd_pkt **out, uint32_t max)
{
    uint32_t tail = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);   /* our own index */
    uint32_t n = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE) - tail;
    if (n > max)
        n = max;
    for (uint32_t k = 0; k < n; k++)
        out[k] = r->slots[(tail + k) & r->mask];
    if (n)
        __atomic_store_n(&r->tail, tail + n, __ATOMIC_RELEASE);
    return n;
}

static inline uint32_t spsc_count(struct ixyd_spsc *r)
{
    uint32_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    return __atomic_load_n(&r->head, __ATOMIC_ACQUIRE) - tail;
}

uint32_t ixyd_spsc_push(struct ixyd_spsc *r, struct ixyd_pkt **pkts, uint32_t n)
{
    return spsc_push(r, pkts, n);
}

uint32_t ixyd_spsc_pop(struct ixyd_spsc *r, struct ixyd_pkt **out, uint32_t max)
{
    return spsc_pop(r, out, max);
}

uint32_t ixyd_spsc_count(struct ixyd_spsc *r) { return spsc_count(r); }

int ixyd_exception_init(struct ixyd_exception *x, struct ixyd_pkt **slots, uint32_t size)
{
    if (!x || !slots)
        return -1;
    return ixyd_spsc_init(&x->to_host, slots, size) | ixyd_spsc_init(&x->to_wire, slots + size, size) |
           ixyd_spsc_init(&x->returned, slots + 2 * size, size) |
           ixyd_spsc_init(&x->empty, slots + 3 * size, size);
}

/* ---------------------------------------------------------------- worker */

#define NS_PER_S 1000000000ull
/* Counters have one writer (the worker): a relaxed load and store, no locked add. */
#define ADD(dst, n) PUBLISH(dst, (dst) + (n))

int ixyd_fwd_entry_set(struct ixyd_fwd_entry *e, uint32_t mode, uint32_t flags, uint32_t txq)
{
    if (!e || mode > IXYD_MODE_EXCEPTION || flags > 0xFF || txq > IXYD_FWD_TXQ_MASK)
        return -1;
    uint64_t generation = (__atomic_load_n(&e->word, __ATOMIC_RELAXED) >> IXYD_FWD_GEN_SHIFT) + 1;
    uint64_t word = generation << IXYD_FWD_GEN_SHIFT | (uint64_t)flags << IXYD_FWD_FLAGS_SHIFT |
                    (uint64_t)mode << IXYD_FWD_MODE_SHIFT | txq;
    __atomic_store_n(&e->word, word, __ATOMIC_RELEASE);
    return 0;
}

/* The control plane validates entries; a word that names a TX queue this worker does not
 * have, or EXCEPTION without a channel, is treated as DROP rather than trusted. */
static void apply_entry(const struct ixyd_worker *w, struct ixyd_worker_queue *q, uint64_t word)
{
    uint32_t mode = (word >> IXYD_FWD_MODE_SHIFT) & 0xFF, index = word & IXYD_FWD_TXQ_MASK;
    if (mode > IXYD_MODE_EXCEPTION || index >= w->ntxq ||
        (mode == IXYD_MODE_EXCEPTION && !q->exception))
        mode = IXYD_MODE_DROP;
    q->mode = mode;
    q->flags = (word >> IXYD_FWD_FLAGS_SHIFT) & 0xFF;
    q->txq = mode == IXYD_MODE_DROP ? NULL : w->txqs[index];
    if (mode == IXYD_MODE_EXCEPTION)
        q->host_txq = q->txq;
    PUBLISH(q->stats.applied, word);
}

int ixyd_worker_init(struct ixyd_worker *w, struct ixyd_worker_queue *queues, uint32_t nqueues,
                     struct ixyd_txq **txqs, struct ixyd_generator **generators, uint32_t ntxq,
                     uint32_t batch)
{
    if (!w || !queues || !txqs || !generators || ntxq > IXYD_FWD_TXQ_MASK)
        return -1;
    for (uint32_t i = 0; i < nqueues; i++)
        if (!queues[i].rxq || !queues[i].entry)
            return -1;
    for (uint32_t t = 0; t < ntxq; t++)
        if (!txqs[t])
            return -1;
    *w = (struct ixyd_worker){.queues = queues, .nqueues = nqueues, .txqs = txqs,
                              .generators = generators, .ntxq = ntxq,
                              .batch = clamp_batch(batch)};
    for (uint32_t i = 0; i < nqueues; i++) {
        struct ixyd_worker_queue *q = &queues[i];
        q->host_txq = NULL;
        q->capture = NULL;
        q->stats = (struct ixyd_queue_stats){0};
        apply_entry(w, q, __atomic_load_n(&q->entry->word, __ATOMIC_ACQUIRE));
    }
    return 0;
}

int ixyd_worker_set_generator(struct ixyd_worker *w, uint32_t txq, struct ixyd_generator *g)
{
    if (!w || txq >= w->ntxq)
        return -1;
    __atomic_store_n(&w->generators[txq], g, __ATOMIC_RELEASE);
    return 0;
}

int ixyd_worker_set_capture(struct ixyd_worker *w, uint32_t rxq, struct ixyd_capture *c)
{
    if (!w || rxq >= w->nqueues)
        return -1;
    __atomic_store_n(&w->queues[rxq].capture, c, __ATOMIC_RELEASE);
    return 0;
}

/* ---------------------------------------------------------------- capture */

int ixyd_capture_init(struct ixyd_capture *c, struct ixyd_capture_slot *slots, uint32_t size)
{
    if (!c || !slots || !is_pow2(size) || size < 2 || size > 65536)
        return -1;
    *c = (struct ixyd_capture){.slots = slots, .mask = size - 1, .snaplen = IXYD_CAPTURE_DATA};
    return 0;
}

/* Producer (the worker, while armed): copy what fits of a received batch, before the batch
 * is handled (a reflected frame's MACs are still as received). Copies that do not fit are
 * counted, never waited for: the frames go on as if nothing were armed. */
static void capture_batch(struct ixyd_capture *c, struct ixyd_pkt *const *pkts, uint32_t n)
{
    uint32_t head = __atomic_load_n(&c->head, __ATOMIC_RELAXED);   /* our own index */
    uint32_t room = c->mask + 1 - (head - __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE));
    uint32_t take = n < room ? n : room;
    if (take < n)
        ADD(c->dropped, n - take);
    if (!take)
        return;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);       /* vDSO; one read for the batch */
    uint32_t session = __atomic_load_n(&c->session, __ATOMIC_RELAXED);
    uint32_t snap = __atomic_load_n(&c->snaplen, __ATOMIC_RELAXED);
    if (snap > IXYD_CAPTURE_DATA)
        snap = IXYD_CAPTURE_DATA;
    for (uint32_t k = 0; k < take; k++) {
        struct ixyd_capture_slot *s = &c->slots[(head + k) & c->mask];
        uint32_t len = pkts[k]->len, copy = len < snap ? len : snap;
        s->session = session;
        s->ts_sec = (uint32_t)now.tv_sec;
        s->ts_nsec = (uint32_t)now.tv_nsec;
        s->incl_len = copy;
        s->orig_len = len;
        memcpy(s->data, pkts[k]->data, copy);
    }
    __atomic_store_n(&c->head, head + take, __ATOMIC_RELEASE);
    ADD(c->captured, take);
}

/* Consumer: acquire head (the slots are written), copy records out, release tail. */
uint32_t ixyd_capture_drain(struct ixyd_capture *c, uint32_t session, uint8_t *out,
                            uint32_t out_size, uint32_t max_frames, uint32_t *frames)
{
    uint32_t tail = __atomic_load_n(&c->tail, __ATOMIC_RELAXED);   /* our own index */
    uint32_t avail = __atomic_load_n(&c->head, __ATOMIC_ACQUIRE) - tail;
    uint32_t used = 0, records = 0, k = 0;
    for (; k < avail && records < max_frames; k++) {
        const struct ixyd_capture_slot *s = &c->slots[(tail + k) & c->mask];
        if (s->session != session)
            continue;                          /* an earlier capture's last batch */
        uint32_t incl = s->incl_len > IXYD_CAPTURE_DATA ? IXYD_CAPTURE_DATA : s->incl_len;
        uint32_t size = (uint32_t)offsetof(struct ixyd_capture_slot, data) -
                        (uint32_t)offsetof(struct ixyd_capture_slot, ts_sec) + incl;
        if (out_size - used < size)
            break;
        memcpy(out + used, &s->ts_sec, size);
        used += size;
        records++;
    }
    if (k)
        __atomic_store_n(&c->tail, tail + k, __ATOMIC_RELEASE);
    *frames = records;
    return used;
}

static inline void swap_macs(struct ixyd_pkt *const *pkts, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++) {
        uint8_t *d = pkts[k]->data, dst[6];
        memcpy(dst, d, 6);
        memcpy(d, d + 6, 6);
        memcpy(d + 6, dst, 6);
    }
}

/* Send what fits; free the rest. Returns the number sent. */
static inline uint32_t send_or_free(struct ixyd_txq *tx, struct ixyd_pkt **pkts, uint32_t n)
{
    uint32_t sent = tx ? ixyd_tx_batch(tx, pkts, n) : 0;
    if (unlikely(sent < n))
        free_bulk(pkts + sent, n - sent);
    return sent;
}

/* One received batch, handled under one entry. */
static inline void handle_batch(struct ixyd_worker_queue *q, struct ixyd_pkt **bufs, uint32_t n)
{
    struct ixyd_queue_stats *st = &q->stats;
    switch (q->mode) {
    case IXYD_MODE_REFLECT:
    case IXYD_MODE_PORT: {
        if (q->flags & IXYD_FWD_SWAP_MAC)
            swap_macs(bufs, n);
        uint32_t sent = send_or_free(q->txq, bufs, n);
        ADD(st->sent, sent);
        if (sent < n)
            ADD(st->drop_tx_full, n - sent);
        break;
    }
    case IXYD_MODE_EXCEPTION: {
        uint32_t pushed = spsc_push(&q->exception->to_host, bufs, n);
        ADD(st->to_host, pushed);
        if (pushed < n) {
            free_bulk(bufs + pushed, n - pushed);
            ADD(st->drop_exception_full, n - pushed);
        }
        break;
    }
    default:
        free_bulk(bufs, n);
        ADD(st->dropped_by_mode, n);
    }
}

static inline uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }

/* Free descriptors on a TX ring, after reclaiming what is done. */
static inline uint32_t tx_room(struct ixyd_txq *tx)
{
    tx_clean(tx);
    return (tx->clean - tx->tail - 1) & (tx->size - 1);
}

/* Take back what the host is done with, send its frames, and (in EXCEPTION mode) keep its
 * supply of empty buffers at least half full, leaving a batch of RX replacements. */
static inline void service_exception(struct ixyd_worker_queue *q, struct ixyd_pkt **bufs,
                                     uint32_t batch)
{
    struct ixyd_exception *x = q->exception;
    uint32_t n;
    do {
        n = spsc_pop(&x->returned, bufs, batch);
        free_bulk(bufs, n);
    } while (n == batch);
    /* Host frames wait in to_wire while the TX ring is full: the host sees back-pressure
     * (push takes fewer) instead of losing frames it has already handed over. */
    struct ixyd_txq *tx = q->host_txq;
    n = spsc_pop(&x->to_wire, bufs, tx ? min_u32(batch, tx_room(tx)) : batch);
    if (n) {
        uint32_t sent = send_or_free(tx, bufs, n);
        ADD(q->stats.from_host, sent);
        if (sent < n)
            ADD(q->stats.drop_from_host, n - sent);
    }
    if (q->mode == IXYD_MODE_EXCEPTION) {
        struct ixyd_mempool *mp = q->rxq->pool;
        uint32_t size = x->empty.mask + 1, room = size - spsc_count(&x->empty);
        uint32_t want = min_u32(room, batch);
        if (room * 2 >= size && mp->free_top >= want + batch &&
            ixyd_pkt_alloc_bulk(mp, bufs, want))
            spsc_push(&x->empty, bufs, want);   /* we are its only producer: it fits */
    }
}

static inline uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);       /* vDSO: no syscall on the usual clocksources */
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

/* Rate limiting is a token bucket counted in 1e-9 frames: it fills at `rate` frames per
 * second and holds at most one batch, so a generator that was held up (TX ring full,
 * worker stopped) resumes at its rate instead of catching up in a burst. */
static inline uint32_t generator_credit(struct ixyd_generator *g, uint32_t batch)
{
    uint64_t now = monotonic_ns();
    if (!g->last_ns) {
        g->credit = NS_PER_S;                  /* the first frame goes at once */
    } else {
        uint64_t elapsed = now - g->last_ns;
        g->credit += (elapsed < NS_PER_S ? elapsed : NS_PER_S) * g->rate;
        if (g->credit > batch * NS_PER_S)
            g->credit = batch * NS_PER_S;
    }
    g->last_ns = now;
    return (uint32_t)(g->credit / NS_PER_S);
}

/* Queue up to one batch of copies of the template, each with the next sequence number. */
static uint32_t generate(struct ixyd_generator *g, struct ixyd_txq *tx, struct ixyd_pkt **bufs,
                         uint32_t batch)
{
    if (g->done)
        return 0;
    uint64_t want = batch;
    if (g->count && g->count - g->sent < want)
        want = g->count - g->sent;
    if (g->rate) {
        uint32_t allowed = generator_credit(g, batch);
        if (allowed < want)
            want = allowed;
    }
    uint32_t room = tx_room(tx);
    if (room < want)
        want = room;
    if (want == 0)
        return 0;
    if (!ixyd_pkt_alloc_bulk(g->pool, bufs, (uint32_t)want)) {
        ADD(g->no_buffer, 1);
        return 0;
    }
    for (uint32_t k = 0; k < want; k++) {
        struct ixyd_pkt *p = bufs[k];
        memcpy(p->data, g->frame->data, g->size);
        p->len = g->size;
        if (g->seq_offset != IXYD_GEN_NO_SEQ) {
            uint64_t seq = g->seq + k;         /* little-endian, like the host */
            memcpy(p->data + g->seq_offset, &seq, sizeof(seq));
        }
    }
    uint32_t sent = send_or_free(tx, bufs, (uint32_t)want);   /* all of them: room was checked */
    g->seq += sent;
    if (g->rate)
        g->credit -= sent * NS_PER_S;
    ADD(g->sent, sent);
    ADD(g->bytes, (uint64_t)sent * g->size);
    if (g->count && g->sent >= g->count)
        __atomic_store_n(&g->done, 1, __ATOMIC_RELEASE);
    return sent;
}

/* One round: every RX queue once, then the generators. Returns the frames received. */
static inline uint64_t worker_round(struct ixyd_worker *w, struct ixyd_pkt **bufs)
{
    struct ixyd_worker_stats *st = &w->stats;
    uint64_t received = 0, bytes = 0, generated = 0;
    uint32_t empty = 0;
    for (uint32_t i = 0; i < w->nqueues; i++) {
        struct ixyd_worker_queue *q = &w->queues[i];
        uint64_t word = __atomic_load_n(&q->entry->word, __ATOMIC_ACQUIRE);   /* once per batch */
        if (unlikely(word != q->stats.applied))
            apply_entry(w, q, word);
        uint64_t rx_bytes = q->rxq->stats.bytes;
        uint32_t n = ixyd_rx_batch(q->rxq, bufs, w->batch);
        if (n) {
            rx_bytes = q->rxq->stats.bytes - rx_bytes;
            ADD(q->stats.packets, n);
            ADD(q->stats.bytes, rx_bytes);
            /* the whole cost of capture while none is armed: one load and one branch */
            struct ixyd_capture *capture = __atomic_load_n(&q->capture, __ATOMIC_ACQUIRE);
            if (unlikely(capture != NULL))
                capture_batch(capture, bufs, n);
            handle_batch(q, bufs, n);
            received += n;
            bytes += rx_bytes;
        } else {
            empty++;
        }
        if (q->exception)
            service_exception(q, bufs, w->batch);
    }
    for (uint32_t t = 0; t < w->ntxq; t++) {
        struct ixyd_generator *g = __atomic_load_n(&w->generators[t], __ATOMIC_ACQUIRE);
        if (g)
            generated += generate(g, w->txqs[t], bufs, w->batch);
    }
    /* An RX queue whose pool ran dry drops everything and returns nothing; its buffers wait
     * in TX rings that only a send would clean, perhaps in one it no longer sends to. So
     * every empty poll cleans all of them (see forward_once). */
    if (empty)
        for (uint32_t t = 0; t < w->ntxq; t++)
            tx_clean(w->txqs[t]);
    ADD(st->iterations, 1);
    ADD(st->polls, w->nqueues);
    ADD(st->empty_polls, empty);
    ADD(st->packets, received);
    ADD(st->bytes, bytes);
    ADD(st->generated, generated);
    return received;
}

uint64_t ixyd_worker_run(struct ixyd_worker *w, volatile uint32_t *stop)
{
    struct ixyd_pkt *bufs[IXYD_MAX_BATCH];
    uint64_t received = 0;
    uint32_t s;
    while (!(s = __atomic_load_n(stop, __ATOMIC_RELAXED)) || s == IXYD_WORKER_STALL)
        if (likely(!s))
            received += worker_round(w, bufs);
    return received;
}

uint64_t ixyd_worker_iterations(struct ixyd_worker *w, uint64_t iterations)
{
    struct ixyd_pkt *bufs[IXYD_MAX_BATCH];
    uint64_t received = 0;
    for (uint64_t it = 0; it < iterations; it++)
        received += worker_round(w, bufs);
    return received;
}

/* ---------------------------------------------------------------- TAP bridge */

/* The bridge's thread is the host side of its channel: it pops to_host and empty, pushes
 * to_wire and returned, and hands every buffer back through them (rule 3 of the header).
 * It makes the syscalls the worker never does: one read() or write() per frame, the TAP
 * carries one frame per call (IFF_NO_PI, drivers/net/tun.c). */

static inline uint32_t tap_held(const struct ixyd_tap_bridge *b)
{
    return b->n_empty + b->n_outgoing + b->n_done;
}

/* Drop the first k of n pointers of an array (the ones a ring just took). */
static inline uint32_t shift_out(struct ixyd_pkt **pkts, uint32_t n, uint32_t k)
{
    memmove(pkts, pkts + k, (n - k) * sizeof *pkts);
    return n - k;
}

static inline void tap_give_back(struct ixyd_tap_bridge *b)
{
    uint32_t k = spsc_push(&b->x->returned, b->done, b->n_done);
    b->n_done = shift_out(b->done, b->n_done, k);
}

static inline void tap_hand_over(struct ixyd_tap_bridge *b)
{
    uint32_t k = spsc_push(&b->x->to_wire, b->outgoing, b->n_outgoing);
    b->n_outgoing = shift_out(b->outgoing, b->n_outgoing, k);
}

int ixyd_tap_bridge_init(struct ixyd_tap_bridge *b, struct ixyd_exception *x, int fd,
                         uint32_t batch, struct ixyd_pkt **slots, uint8_t *overflow,
                         uint32_t overflow_size, uint32_t buf_size, uint32_t min_frame)
{
    if (!b || !x || !slots || !overflow || fd < 0)
        return -1;
    uint32_t capacity = x->to_host.mask + 1;
    if (batch < 1 || batch > capacity / 4 || min_frame > buf_size)
        return -1;
    *b = (struct ixyd_tap_bridge){
        .x = x, .fd = fd, .batch = batch, .capacity = capacity, .buf_size = buf_size,
        .min_frame = min_frame, .empty = slots, .outgoing = slots + capacity,
        .done = slots + 2 * capacity, .overflow_size = overflow_size, .overflow = overflow,
    };
    return 0;
}

/* Wire -> kernel: a frame the TAP does not take (queue full, interface down) is counted
 * and its buffer given back like the others; towards the kernel the bridge never waits. */
static uint32_t tap_to_kernel(struct ixyd_tap_bridge *b)
{
    struct ixyd_pkt **popped = b->done + b->n_done;
    uint32_t n = spsc_pop(&b->x->to_host, popped, min_u32(b->batch, b->capacity - tap_held(b)));
    for (uint32_t k = 0; k < n; k++) {
        ssize_t wrote;
        do
            wrote = write(b->fd, popped[k]->data, popped[k]->len);
        while (wrote < 0 && errno == EINTR);
        if (wrote >= 0) {
            b->stats.to_kernel++;
            b->stats.to_kernel_bytes += popped[k]->len;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            b->stats.drop_write_full++;
        } else {
            b->stats.drop_write_error++;
        }
    }
    b->n_done += n;
    if (b->n_done)
        tap_give_back(b);
    return n;
}

/* Kernel -> wire, with back-pressure: while frames wait for the worker (its TX side is
 * full) or it lends no empty buffer, read nothing, so the frames wait in the TAP's queue
 * in the kernel, which counts what overflows it (tx_dropped). */
static int64_t tap_from_kernel(struct ixyd_tap_bridge *b)
{
    if (b->n_outgoing) {
        tap_hand_over(b);
        if (b->n_outgoing)
            return 0;
    }
    uint32_t frames = 0;
    while (frames < b->batch) {
        if (!b->n_empty)
            b->n_empty = spsc_pop(&b->x->empty, b->empty,
                                  min_u32(b->batch, b->capacity - tap_held(b)));
        b->starved = !b->n_empty;
        if (b->starved)
            break;
        struct ixyd_pkt *p = b->empty[b->n_empty - 1];
        struct iovec iov[2] = {{p->data, b->buf_size}, {b->overflow, b->overflow_size}};
        ssize_t got;
        do
            got = readv(b->fd, iov, 2);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -errno;
        }
        frames++;
        if ((size_t)got > b->buf_size) {
            b->stats.drop_oversize++;
            continue;                          /* the buffer stays empty for the next frame */
        }
        b->n_empty--;
        if ((uint32_t)got < b->min_frame) {
            memset(p->data + got, 0, b->min_frame - got);
            b->stats.padded++;
            got = b->min_frame;
        }
        p->len = (uint16_t)got;
        b->stats.from_kernel++;
        b->stats.from_kernel_bytes += (uint64_t)got;
        b->outgoing[b->n_outgoing++] = p;
    }
    if (b->n_outgoing)
        tap_hand_over(b);
    return frames;
}

int64_t ixyd_tap_bridge_step(struct ixyd_tap_bridge *b)
{
    int64_t written = tap_to_kernel(b), read = tap_from_kernel(b);
    return read < 0 ? read : written + read;
}

uint32_t ixyd_tap_bridge_hand_back(struct ixyd_tap_bridge *b, int give_up)
{
    if (b->n_outgoing)
        tap_hand_over(b);
    if (give_up) {
        b->stats.drop_stopped += b->n_outgoing;
        for (uint32_t k = 0; k < b->n_outgoing; k++)
            b->done[b->n_done++] = b->outgoing[k];
        for (uint32_t k = 0; k < b->n_empty; k++)
            b->done[b->n_done++] = b->empty[k];
        b->n_outgoing = b->n_empty = 0;
    }
    if (b->n_done)
        tap_give_back(b);
    return tap_held(b);
}

/* ---------------------------------------------------------------- MMIO */

uint32_t ixyd_mmio_read32(volatile uint32_t *bar, uint32_t offset)
{
    return bar[offset / sizeof(uint32_t)];
}

void ixyd_mmio_write32(volatile uint32_t *bar, uint32_t offset, uint32_t value)
{
    bar[offset / sizeof(uint32_t)] = value;
}
