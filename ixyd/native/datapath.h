/* ixyd datapath: mempool, RX/TX descriptor rings and the forwarding loop of the 82599.
 *
 * Everything here touches packets; everything that decides (init order, link, config)
 * is Python. The block between the cdef markers is read verbatim by build_datapath.py as
 * the cffi declarations, so it must stay plain C that cffi can parse: no includes,
 * attributes or static asserts inside it.
 *
 * Threading: one queue and one mempool belong to one thread. The device (hardware or the
 * model's thread) is synchronised with acquire loads of descriptor status words and
 * release stores of the tail registers. The worker section at the end says which thread
 * owns which buffer when a worker exchanges packets with another thread.
 */
#ifndef IXYD_DATAPATH_H
#define IXYD_DATAPATH_H

#include <stddef.h>
#include <stdint.h>

/* --- cffi cdef begin --- */

#define IXYD_PKT_HEADROOM 128   /* data[] starts 128 bytes into every pool entry */
#define IXYD_TX_CLEAN_BATCH 32  /* TX buffers are reclaimed 32 at a time (DPDK tx_rs_thresh) */
#define IXYD_MAX_BATCH 256      /* largest batch ixyd_forward and a worker accept */
#define IXYD_RXE_82599 0x20000000    /* RXE, bit 29 (docs/reference/82599.md#rx-descriptors); 82576: L4E */
#define IXYD_RXE_82576 0x80000000    /* RXE, bit 31 (docs/reference/82576.md#descriptors) */

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

/* ---------------------------------------------------------------- worker
 *
 * A worker is one thread in ixyd_worker_run. Each round it polls its RX queues in turn and
 * handles every batch as that queue's forwarding entry says, services the queue's
 * exception channel, runs its packet generators, and publishes its counters. The control
 * plane steers it only through memory: forwarding entries, generator slots, the stop flag.
 * The loop takes no lock and makes no syscall; the clock reads (clock_gettime through the
 * vDSO) are there only while a rate-limited generator runs (once per generator batch) or
 * a capture is armed (once per captured batch).
 *
 * Forwarding entry: one 64-bit word per RX queue, so one atomic load gives a consistent
 * view (no seqlock, no retry: the worker never waits for the control plane). The worker
 * loads it once per batch (acquire) and decodes it only when it changed, so a change takes
 * effect between two batches: every received frame is handled under exactly one entry
 * and none is lost or sent twice by a switch. The TX queue is an index into the worker's
 * own TX table, fixed when the worker is built, so no entry can point a worker at a queue
 * it does not own. The worker publishes the word it applies in its queue stats (applied):
 * once applied equals the entry's word, every later batch uses it.
 *
 * SPSC rings (exception channels): a ring of packet pointers with one producer thread and
 * one consumer thread. head and tail count pushes and pops since init (free-running 32-bit
 * counters; head - tail is the fill level) and sit on separate cache lines. The producer
 * reads tail (acquire: the consumer is done with those slots), writes slots, then
 * publishes head (release: the slots and the frames they point to are visible to whoever
 * reads head); the consumer mirrors it. Each index has one writer, so no CAS is needed.
 *
 * Buffer ownership. A mempool is a stack without atomics, so exactly one thread may
 * allocate from a pool or free into it. While a worker runs:
 *  1. The worker owns the pools of its RX queues and of its generators. It sends only
 *     buffers of those pools, so the TX clean-up, which frees each sent buffer into its own
 *     pool, also frees only into pools the worker owns.
 *  2. A TX queue belongs to one worker: only that worker sends on it and cleans it.
 *  3. An exception channel's host thread (the TAP bridge) never allocates or frees. It takes
 *     full buffers from to_host and empty ones from `empty` (the worker fills that ring
 *     from the RX queue's pool, in EXCEPTION mode), and hands every buffer back through
 *     the channel it came from (another channel may belong to another worker): through
 *     to_wire (a frame to send) or through `returned` (done with it). The worker frees or
 *     sends what comes back; frames wait in to_wire while the TX ring is full.
 *  4. Pushing a pointer into a ring hands the buffer over; the pusher does not touch it again.
 *  5. A buffer in a ring or in the host's hands is still counted as taken from its pool.
 *     Once the worker's thread has ended (joined), the control thread owns the worker's
 *     pools and may free into them: worker.py drains the rings then (after the host thread
 *     has stopped using the channel). */

#define IXYD_MODE_DROP 0        /* free each frame, counted in dropped_by_mode */
#define IXYD_MODE_PORT 1        /* send on the entry's TX queue (normally another port's) */
#define IXYD_MODE_REFLECT 2     /* send on the entry's TX queue of the same port */
#define IXYD_MODE_EXCEPTION 3   /* hand to the host; host frames go out of the entry's TX queue */
#define IXYD_FWD_SWAP_MAC 0x1   /* entry flag: swap destination and source MAC before sending */
/* Forwarding entry word: generation 63:32 | flags 31:24 | mode 23:16 | TX queue index 15:0 */
#define IXYD_FWD_TXQ_MASK 0xFFFF
#define IXYD_FWD_MODE_SHIFT 16
#define IXYD_FWD_FLAGS_SHIFT 24
#define IXYD_FWD_GEN_SHIFT 32
#define IXYD_GEN_NO_SEQ 0xFFFF  /* generator seq_offset: frames carry no sequence number */

struct ixyd_fwd_entry {
    uint64_t word;               /* written only by ixyd_fwd_entry_set; 0 = DROP */
};

struct ixyd_spsc {
    struct ixyd_pkt **slots;     /* size entries */
    uint32_t mask;               /* size - 1; size is a power of two */
    uint32_t pad0[13];
    uint32_t head;               /* pushes since init: written by the producer only */
    uint32_t pad1[15];
    uint32_t tail;               /* pops since init: written by the consumer only */
    uint32_t pad2[15];
};

/* The rings between a worker and one host thread, for one RX queue. */
struct ixyd_exception {
    struct ixyd_spsc to_host;    /* worker -> host: frames received in EXCEPTION mode */
    struct ixyd_spsc to_wire;    /* host -> worker: frames to send */
    struct ixyd_spsc returned;   /* host -> worker: buffers the host is done with */
    struct ixyd_spsc empty;      /* worker -> host: empty buffers to carry frames to the wire */
};

/* A packet generator on one TX queue. The control plane fills the configuration and the
 * template before it publishes the generator (ixyd_worker_set_generator); afterwards only
 * the worker writes to it. */
struct ixyd_generator {
    struct ixyd_mempool *pool;   /* frames come from here; owned by the worker */
    struct ixyd_pkt *frame;      /* the template: data[0..size), a buffer of pool */
    uint64_t rate;               /* frames per second; 0: as fast as the TX ring takes them */
    uint64_t count;              /* frames to send in all; 0: no limit */
    uint64_t seq;                /* next sequence number */
    uint16_t size;               /* frame length in bytes, without FCS */
    uint16_t seq_offset;         /* byte offset of the 64-bit little-endian sequence number */
    uint32_t done;               /* published: 1 once count frames are sent */
    uint64_t credit;             /* worker's: frames it may send now, in 1e-9 frames */
    uint64_t last_ns;            /* worker's: CLOCK_MONOTONIC at the last credit update */
    uint64_t sent;               /* published: frames queued on the TX ring */
    uint64_t bytes;
    uint64_t no_buffer;          /* published: batches skipped because the pool was empty */
};

/* Published per RX queue of a worker (plain 64-bit stores, like ixyd_fwd_stats). */
struct ixyd_queue_stats {
    uint64_t packets;            /* frames received */
    uint64_t bytes;
    uint64_t sent;               /* PORT, REFLECT: queued on the TX ring */
    uint64_t dropped_by_mode;    /* DROP */
    uint64_t drop_tx_full;       /* PORT, REFLECT: TX ring full, freed */
    uint64_t to_host;            /* EXCEPTION: handed to the host */
    uint64_t drop_exception_full; /* EXCEPTION: to_host ring full, freed */
    uint64_t from_host;          /* host frames queued on the TX ring */
    uint64_t drop_from_host;     /* host frames freed: the queue was never in EXCEPTION mode */
    uint64_t applied;            /* the entry word in effect */
};

/* Capture: a mirror ring of copied frames, one per RX queue, one producer (the worker)
 * and one consumer (ixyd/capture.py's drain thread). Indices work like ixyd_spsc's. Each
 * slot holds a pcap record (header, then incl_len bytes) so the consumer copies records
 * out as they are. The worker copies a received batch in only while the queue's capture
 * pointer is set (ixyd_worker_set_capture), before it handles the batch; when the ring is
 * full the copies are dropped and counted, the frames themselves are handled as always.
 * Timestamps: one CLOCK_REALTIME read per captured batch, so the frames of a batch share
 * one. session: the consumer's number for the current capture, stamped into every slot;
 * the consumer skips slots of an earlier capture the worker may still have written in the
 * batch it was handling when that capture was disarmed. */
#define IXYD_CAPTURE_DATA 2048  /* bytes of frame a slot holds: a whole receive buffer */

struct ixyd_capture_slot {
    uint32_t session;            /* the ring's session when the worker wrote the slot */
    uint32_t reserved[3];
    uint32_t ts_sec;             /* pcap record header (nanosecond pcap), host byte order */
    uint32_t ts_nsec;
    uint32_t incl_len;           /* bytes in data[]: min(orig_len, snaplen) */
    uint32_t orig_len;           /* the frame's length, without FCS */
    uint8_t data[IXYD_CAPTURE_DATA];
};

struct ixyd_capture {
    struct ixyd_capture_slot *slots;   /* size entries */
    uint32_t mask;               /* size - 1; size is a power of two */
    uint32_t snaplen;            /* consumer's, set before arming: bytes copied per frame */
    uint32_t session;            /* consumer's, set before arming */
    uint32_t pad0[11];
    uint32_t head;               /* copies since init: written by the worker only */
    uint32_t pad1[15];
    uint32_t tail;               /* copies consumed: written by the consumer only */
    uint32_t pad2[15];
    uint64_t captured;           /* published by the worker: frames copied in */
    uint64_t dropped;            /* published by the worker: copies dropped, ring full */
};

struct ixyd_worker_queue {
    struct ixyd_rxq *rxq;
    struct ixyd_fwd_entry *entry;
    struct ixyd_exception *exception;  /* NULL: this queue has no exception channel */
    struct ixyd_capture *capture;  /* NULL: not capturing; ixyd_worker_set_capture */
    struct ixyd_txq *txq;        /* worker's: decoded from the entry */
    struct ixyd_txq *host_txq;   /* worker's: TX queue of the last EXCEPTION entry, for host frames */
    uint32_t mode;               /* worker's: decoded from the entry */
    uint32_t flags;
    struct ixyd_queue_stats stats;
};

struct ixyd_worker_stats {
    uint64_t iterations;         /* rounds over all RX queues */
    uint64_t polls;              /* RX polls */
    uint64_t empty_polls;        /* RX polls that returned nothing */
    uint64_t packets;            /* frames received, all queues */
    uint64_t bytes;
    uint64_t generated;          /* frames queued by generators */
};

struct ixyd_worker {
    struct ixyd_worker_queue *queues;
    uint32_t nqueues;
    uint32_t batch;
    struct ixyd_txq **txqs;      /* the TX queues this worker owns; entries name them by index */
    struct ixyd_generator **generators;  /* one slot per TX queue, NULL: none */
    uint32_t ntxq;
    uint32_t pad;
    struct ixyd_worker_stats stats;
};

/* SPSC ring. init returns -1 unless size is a power of two (2..65536). push (producer
 * only) takes as many of pkts as fit and returns how many; pop (consumer only) returns up
 * to max. count is the fill level as seen now (any thread). */
int ixyd_spsc_init(struct ixyd_spsc *r, struct ixyd_pkt **slots, uint32_t size);
uint32_t ixyd_spsc_push(struct ixyd_spsc *r, struct ixyd_pkt **pkts, uint32_t n);
uint32_t ixyd_spsc_pop(struct ixyd_spsc *r, struct ixyd_pkt **out, uint32_t max);
uint32_t ixyd_spsc_count(struct ixyd_spsc *r);
/* Four rings of size slots each; slots has 4 * size entries. */
int ixyd_exception_init(struct ixyd_exception *x, struct ixyd_pkt **slots, uint32_t size);

/* Control plane, one writer per entry: publish a new entry word with the next generation
 * (release store). Returns -1 (entry unchanged) for a mode, flags or index out of range. */
int ixyd_fwd_entry_set(struct ixyd_fwd_entry *e, uint32_t mode, uint32_t flags, uint32_t txq);

/* queues[k].rxq, .entry and .exception are set by the caller; the rest is initialised here.
 * batch is clamped to 1..IXYD_MAX_BATCH. Returns -1 for a NULL pointer or ntxq > 65535. */
int ixyd_worker_init(struct ixyd_worker *w, struct ixyd_worker_queue *queues, uint32_t nqueues,
                     struct ixyd_txq **txqs, struct ixyd_generator **generators, uint32_t ntxq,
                     uint32_t batch);
/* Publish (release) generator g, or NULL, for TX queue index txq; -1 for a bad index. The
 * generator it replaces may be in use until the worker's current round ends. */
int ixyd_worker_set_generator(struct ixyd_worker *w, uint32_t txq, struct ixyd_generator *g);
/* Arm (release) capture ring c, or disarm with NULL, for RX queue index rxq; -1 for a bad
 * index. The worker may copy into the ring it replaces until its current round ends. */
int ixyd_worker_set_capture(struct ixyd_worker *w, uint32_t rxq, struct ixyd_capture *c);
/* Capture ring over size slots (a power of two, 2..65536); -1 otherwise. Consumer only:
 * drain copies the pcap records (16-byte header and data) of up to max_frames slots of
 * `session` into out, as many as fit in out_size bytes, skips slots of other sessions, and
 * returns the bytes written; *frames gets the number of records. */
int ixyd_capture_init(struct ixyd_capture *c, struct ixyd_capture_slot *slots, uint32_t size);
uint32_t ixyd_capture_drain(struct ixyd_capture *c, uint32_t session, uint8_t *out,
                            uint32_t out_size, uint32_t max_frames, uint32_t *frames);
/* Run rounds until *stop != 0, or a fixed number of them; both return the frames received.
 * *stop == IXYD_WORKER_STALL is fault injection (a hung worker, for the watchdog tests):
 * the loop spins without polling or counting rounds until *stop changes again. */
#define IXYD_WORKER_STALL 2
uint64_t ixyd_worker_run(struct ixyd_worker *w, volatile uint32_t *stop);
uint64_t ixyd_worker_iterations(struct ixyd_worker *w, uint64_t iterations);

/* TAP bridge: the per-frame loops of ixyd/tap.py's TapBridge, run on the bridge's thread
 * (the channel's host side, rule 3 above: it never allocates or frees) with the GIL
 * released, so one call moves a batch each way. The thread, its poll() wait, stopping and
 * the counters' totals stay in Python; tap.py's module docstring says what each counter
 * and each drop means. Every buffer the bridge holds is in exactly one of its three
 * arrays (n_empty + n_outgoing + n_done, never more than capacity). */
struct ixyd_tap_stats {
    uint64_t to_kernel;          /* frames from the wire written to the TAP */
    uint64_t to_kernel_bytes;
    uint64_t from_kernel;        /* frames read from the TAP for the worker (after padding) */
    uint64_t from_kernel_bytes;
    uint64_t padded;             /* runts zero-padded to min_frame */
    uint64_t drop_write_full;    /* a frame from the wire: the TAP write would block */
    uint64_t drop_write_error;   /* a frame from the wire: the TAP write failed otherwise */
    uint64_t drop_oversize;      /* a kernel frame longer than buf_size */
    uint64_t drop_stopped;       /* a kernel frame the worker did not take before the stop */
};

struct ixyd_tap_bridge {
    struct ixyd_exception *x;
    int fd;                      /* the TAP: non-blocking, IFF_NO_PI (one frame per read/write) */
    uint32_t batch;              /* frames per direction per step: 1..capacity / 4 */
    uint32_t capacity;           /* the channel's ring size: the most buffers the bridge holds */
    uint32_t buf_size;           /* bytes a buffer's data[] holds */
    uint32_t min_frame;          /* shorter frames from the kernel are zero-padded to this */
    uint32_t starved;            /* the last step found no empty buffer: read nothing, wait */
    struct ixyd_pkt **empty;     /* n_empty buffers lent by the worker, not yet filled */
    struct ixyd_pkt **outgoing;  /* n_outgoing frames from the kernel the worker has not taken */
    struct ixyd_pkt **done;      /* n_done buffers written to the kernel (or dropped), to return */
    uint32_t n_empty, n_outgoing, n_done;
    uint32_t overflow_size;
    uint8_t *overflow;           /* a read's second iovec: catches (and measures) oversize frames */
    struct ixyd_tap_stats stats; /* since the owner last folded them into its totals and zeroed them */
};

/* slots: 3 * capacity entries (capacity = the channel's ring size). -1 for a NULL pointer,
 * a negative fd, batch outside 1..capacity / 4 or buf_size / min_frame out of order. */
int ixyd_tap_bridge_init(struct ixyd_tap_bridge *b, struct ixyd_exception *x, int fd,
                         uint32_t batch, struct ixyd_pkt **slots, uint8_t *overflow,
                         uint32_t overflow_size, uint32_t buf_size, uint32_t min_frame);
/* One round: write up to batch frames from to_host to the TAP and give their buffers back,
 * then read up to batch frames from the TAP into lent buffers and push them to to_wire.
 * Returns the frames handled (written or dropped, read or dropped as oversize), or -errno
 * when a read fails otherwise than EAGAIN (the buffers stay accounted in the bridge). */
int64_t ixyd_tap_bridge_step(struct ixyd_tap_bridge *b);
/* Offer the outgoing frames to the worker again and give back what is done. give_up:
 * first count the outgoing frames the worker did not take as drop_stopped and give them
 * back with the unused empty buffers. Returns the buffers the bridge still holds. */
uint32_t ixyd_tap_bridge_hand_back(struct ixyd_tap_bridge *b, int give_up);

/* One aligned 32-bit access to a mapped BAR; offset in bytes. */
uint32_t ixyd_mmio_read32(volatile uint32_t *bar, uint32_t offset);
void ixyd_mmio_write32(volatile uint32_t *bar, uint32_t offset, uint32_t value);

/* --- cffi cdef end --- */

_Static_assert(offsetof(struct ixyd_pkt, data) == IXYD_PKT_HEADROOM,
               "packet data must start IXYD_PKT_HEADROOM bytes into the entry");
_Static_assert(IXYD_PKT_HEADROOM % 128 == 0, "82599 buffers are 128-byte aligned");
_Static_assert(sizeof(struct ixyd_fwd_stats) == 5 * sizeof(uint64_t), "published layout");
_Static_assert(offsetof(struct ixyd_spsc, head) == 64 && offsetof(struct ixyd_spsc, tail) == 128,
               "producer and consumer indices on separate cache lines");
_Static_assert(offsetof(struct ixyd_capture, head) == 64 && offsetof(struct ixyd_capture, tail) == 128,
               "capture producer and consumer indices on separate cache lines");
_Static_assert(offsetof(struct ixyd_capture_slot, ts_sec) == 16 &&
               offsetof(struct ixyd_capture_slot, data) == 32,
               "a capture slot ends in a pcap record: 16-byte header, then the data");

#endif /* IXYD_DATAPATH_H */
