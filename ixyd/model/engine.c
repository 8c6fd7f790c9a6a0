/* 82599 model: the packet engine. See engine.h for the division of labour. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- register offsets and bits this engine reads or counts into (docs/reference/82599.md) ---- */
#define REG_EICR 0x00800
#define EICR_RX_MISS (1u << 17)
#define EICR_LSC (1u << 20)
#define REG_RXCTRL 0x03000
#define RXCTRL_RXEN 0x1u
#define REG_HLREG0 0x04240
#define HLREG0_RXCRCSTRP 0x2u
#define HLREG0_JUMBOEN 0x4u
#define HLREG0_TXPADEN 0x400u
#define REG_MAXFRS 0x04268
#define REG_FCTRL 0x05080
#define FCTRL_MPE 0x100u
#define FCTRL_UPE 0x200u
#define FCTRL_BAM 0x400u
#define REG_RXCSUM 0x05000
#define RXCSUM_PCSD (1u << 13)
#define REG_DMATXCTL 0x04A80
#define DMATXCTL_TE 0x1u
#define REG_MRQC 0x05818
#define REG_RETA 0x05C00
#define REG_RSSRK 0x05C80
#define REG_RAL 0x0A200 /* canonical RAR block, 128 entries; 0x5400 aliases 0..15 */
#define RAH_AV 0x80000000u
#define REG_RXPBSIZE0 0x03C00 /* packet buffer 0 size: KB in bits 19:10 */
#define REG_RQSMR 0x02300
#define REG_TQSM 0x08600
#define RXDCTL_ENABLE (1u << 25)
#define TXDCTL_ENABLE (1u << 25)
#define SRRCTL_DROP_EN (1u << 28)
/* statistics (#statistics); 32-bit clear-on-read registers live in the register file */
#define REG_CRCERRS 0x04000
#define REG_MPC0 0x03FA0
#define REG_GPRC 0x04074
#define REG_BPRC 0x04078
#define REG_MPRC 0x0407C
#define REG_GPTC 0x04080
#define REG_RUC 0x040A4
#define REG_ROC 0x040AC
#define REG_TPR 0x040D0
#define REG_TPT 0x040D4
#define REG_MPTC 0x040F0
#define REG_BPTC 0x040F4
#define REG_QPRC(n) (0x01030u + 0x40u * (n))
#define REG_QPRDC(n) (0x01430u + 0x40u * (n))
#define REG_QPTC(n) (0x06030u + 0x40u * (n))

static inline uint32_t rxq_block(uint32_t q) { return q < 64 ? 0x01000u + 0x40u * q : 0x0D000u + 0x40u * (q - 64); }
static inline uint32_t txq_block(uint32_t q) { return 0x06000u + 0x40u * q; }
#define Q_BAL 0x00
#define Q_BAH 0x04
#define Q_LEN 0x08
#define Q_HEAD 0x10
#define Q_SRRCTL 0x14
#define Q_TAIL 0x18
#define Q_DCTL 0x28
#define Q_TDWBAL 0x38
#define Q_TDWBAH 0x3C

/* descriptor bits (#rx-descriptors, #tx-descriptors) */
#define RXD_STAT_DD 0x1u
#define RXD_STAT_EOP 0x2u
#define TXD_DTYP_MASK 0x00F00000u
#define TXD_DTYP_DATA 0x00300000u
#define TXD_DTYP_CTXT 0x00200000u
#define TXD_EOP 0x01000000u
#define TXD_RS 0x08000000u
#define TXD_DEXT 0x20000000u
#define TXD_STAT_DD 0x1u

#define MIN_FRAME 60        /* without FCS */
#define STD_MAX_FRAME 1518  /* with FCS */
#define MAX_FRAME 16384
#define PB_SLOTS 4096
#define TAP_BURST 32

struct rxq_cfg {
    uint64_t ring;
    uint32_t size, bsize;
    uint8_t enabled, drop_en, stat;
};
struct txq_cfg {
    uint64_t ring, head_wb;
    uint32_t size;
    uint8_t enabled, stat, wthresh, head_wb_enabled;
};
struct pb_frame {
    uint8_t *data;
    uint32_t length;
    uint16_t queue;
    uint32_t hash;
    uint32_t info;
};
struct flow_rx {
    uint64_t next;
    uint64_t seen[16]; /* 1024-sequence window for duplicate detection */
};

enum wire_kind { WIRE_NONE, WIRE_CABLE, WIRE_TAP, WIRE_TRAFFIC };

struct model_traffic {
    struct model_port *port;
    /* generator */
    int running;
    uint8_t dst[6], src[6];
    uint32_t size, flows, burst, window, ip_base;
    uint64_t count, rate;
    uint16_t stream;
    uint64_t start_ns;
    uint64_t *flow_seq;
    struct model_traffic *checker;
    /* checker */
    int32_t expect_stream;
    struct flow_rx *flow_rx;
    struct model_traffic_stats st;
    uint8_t scratch[MAX_FRAME];
};

struct model_port {
    uint32_t *regs;
    struct model *m;
    uint32_t index;
    int removed, dma_enabled;
    /* link: enabled by AN restart, up once the delay passed and the wire and peer allow */
    int link_enabled, link_forced_down, link_was_up;
    uint64_t link_up_at;
    int wire;
    struct model_port *peer;
    int tap_fd;
    struct model_traffic *traffic;
    /* configuration cached from the register file, refreshed when cfg_gen moves */
    uint32_t cfg_gen, cfg_seen;
    int rxen, te, crc_strip, tx_pad, rss, pcsd;
    uint32_t max_frame, fctrl, mrqc;
    uint8_t key[40], reta[128];
    uint8_t mac[128][6], mac_valid[128];
    uint32_t n_macs;
    struct rxq_cfg rxq[MODEL_QUEUES];
    struct txq_cfg txq[MODEL_QUEUES];
    uint8_t tx_active[MODEL_QUEUES];
    uint32_t n_tx_active;
    uint64_t stat64[MODEL_STAT64_COUNT];
    /* the on-chip receive packet buffer (frames waiting for descriptors), FIFO */
    struct pb_frame pb[PB_SLOTS];
    uint32_t pb_head, pb_count, pb_bytes, pb_capacity;
    struct model_port_counters c;
    uint8_t txbuf[MAX_FRAME + 8];
    uint8_t rxbuf[MAX_FRAME + 8];
};

struct iommu_map {
    uint64_t iova, size;
    uint8_t *host;
};

struct model {
    pthread_mutex_t lock;
    uint32_t control_waiting;
    uint32_t nports;
    struct model_port *ports[MODEL_MAX_PORTS];
    struct iommu_map maps[MODEL_MAX_MAPS];
    uint32_t nmaps;
    struct iommu_map *last_map;
    uint64_t faults;
    struct model_fault fault_log[MODEL_FAULT_LOG];
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint32_t R(struct model_port *p, uint32_t off) { return __atomic_load_n(&p->regs[off >> 2], __ATOMIC_ACQUIRE); }
static inline void W(struct model_port *p, uint32_t off, uint32_t v) { __atomic_store_n(&p->regs[off >> 2], v, __ATOMIC_RELEASE); }
static inline void COUNT(struct model_port *p, uint32_t off, uint32_t n) { __atomic_fetch_add(&p->regs[off >> 2], n, __ATOMIC_RELAXED); }
static inline void COUNT64(struct model_port *p, uint32_t which, uint64_t n) { __atomic_fetch_add(&p->stat64[which], n, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------------ lifecycle */

struct model *model_new(uint32_t nports)
{
    if (nports == 0 || nports > MODEL_MAX_PORTS)
        return NULL;
    struct model *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    pthread_mutex_init(&m->lock, NULL);
    m->nports = nports;
    for (uint32_t i = 0; i < nports; i++) {
        struct model_port *p = calloc(1, sizeof(*p));
        if (!p || !(p->regs = aligned_alloc(4096, MODEL_BAR_SIZE))) {
            free(p);
            model_free(m);
            return NULL;
        }
        memset(p->regs, 0, MODEL_BAR_SIZE);
        p->m = m;
        p->index = i;
        p->tap_fd = -1;
        m->ports[i] = p;
    }
    return m;
}

static void pb_clear(struct model_port *p)
{
    while (p->pb_count) {
        free(p->pb[p->pb_head].data);
        p->pb_head = (p->pb_head + 1) % PB_SLOTS;
        p->pb_count--;
    }
    p->pb_bytes = 0;
    p->c.rx_buffered = 0;
}

static void traffic_free(struct model_traffic *t)
{
    if (!t)
        return;
    free(t->flow_seq);
    free(t->flow_rx);
    free(t);
}

void model_free(struct model *m)
{
    if (!m)
        return;
    for (uint32_t i = 0; i < MODEL_MAX_PORTS; i++) {
        struct model_port *p = m->ports[i];
        if (!p)
            continue;
        pb_clear(p);
        traffic_free(p->traffic);
        free(p->regs);
        free(p);
    }
    pthread_mutex_destroy(&m->lock);
    free(m);
}

struct model_port *model_port(struct model *m, uint32_t index) { return index < m->nports ? m->ports[index] : NULL; }
volatile uint32_t *model_port_regs(struct model_port *p) { return p->regs; }

void model_lock(struct model *m)
{
    __atomic_fetch_add(&m->control_waiting, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&m->lock);
    __atomic_fetch_sub(&m->control_waiting, 1, __ATOMIC_RELAXED);
}
void model_unlock(struct model *m) { pthread_mutex_unlock(&m->lock); }

/* ------------------------------------------------------------------ registers */

uint32_t model_reg_load(struct model_port *p, uint32_t off) { return R(p, off); }
void model_reg_store(struct model_port *p, uint32_t off, uint32_t v) { W(p, off, v); }
uint32_t model_reg_take(struct model_port *p, uint32_t off) { return __atomic_exchange_n(&p->regs[off >> 2], 0, __ATOMIC_ACQ_REL); }
void model_reg_or(struct model_port *p, uint32_t off, uint32_t bits) { __atomic_fetch_or(&p->regs[off >> 2], bits, __ATOMIC_ACQ_REL); }
void model_reg_and(struct model_port *p, uint32_t off, uint32_t bits) { __atomic_fetch_and(&p->regs[off >> 2], bits, __ATOMIC_ACQ_REL); }
uint64_t model_stat64_take(struct model_port *p, uint32_t which)
{
    return which < MODEL_STAT64_COUNT ? __atomic_exchange_n(&p->stat64[which], 0, __ATOMIC_ACQ_REL) : 0;
}
void model_config_changed(struct model_port *p) { __atomic_fetch_add(&p->cfg_gen, 1, __ATOMIC_RELEASE); }

void model_load_register_image(struct model_port *p, const uint32_t *image)
{
    model_lock(p->m);
    for (uint32_t i = 0; i < MODEL_BAR_SIZE / 4; i++)
        __atomic_store_n(&p->regs[i], image[i], __ATOMIC_RELAXED);
    memset(p->stat64, 0, sizeof(p->stat64));
    model_config_changed(p);
    model_unlock(p->m);
}

static void refresh_config(struct model_port *p)
{
    uint32_t gen = __atomic_load_n(&p->cfg_gen, __ATOMIC_ACQUIRE);
    if (gen == p->cfg_seen)
        return;
    p->cfg_seen = gen;
    p->rxen = R(p, REG_RXCTRL) & RXCTRL_RXEN;
    p->te = R(p, REG_DMATXCTL) & DMATXCTL_TE;
    uint32_t hl = R(p, REG_HLREG0);
    p->crc_strip = !!(hl & HLREG0_RXCRCSTRP);
    p->tx_pad = !!(hl & HLREG0_TXPADEN);
    p->max_frame = STD_MAX_FRAME;
    if (hl & HLREG0_JUMBOEN) {
        uint32_t mfs = R(p, REG_MAXFRS) >> 16;
        p->max_frame = mfs > MAX_FRAME ? MAX_FRAME : mfs;
    }
    p->fctrl = R(p, REG_FCTRL);
    p->pb_capacity = R(p, REG_RXPBSIZE0) & 0xFFC00u;
    p->mrqc = R(p, REG_MRQC);
    p->rss = (p->mrqc & 0xF) == 1; /* MRQE = 0001: RSS only (#rss) */
    p->pcsd = !!(R(p, REG_RXCSUM) & RXCSUM_PCSD);
    for (uint32_t i = 0; i < 10; i++) {
        uint32_t k = R(p, REG_RSSRK + 4 * i);
        for (uint32_t b = 0; b < 4; b++)
            p->key[4 * i + b] = (uint8_t)(k >> (8 * b));
    }
    for (uint32_t i = 0; i < 32; i++) {
        uint32_t r = R(p, REG_RETA + 4 * i);
        for (uint32_t b = 0; b < 4; b++)
            p->reta[4 * i + b] = (r >> (8 * b)) & 0xF;
    }
    p->n_macs = 0;
    for (uint32_t i = 0; i < 128; i++) {
        uint32_t lo = R(p, REG_RAL + 8 * i), hi = R(p, REG_RAL + 8 * i + 4);
        p->mac_valid[i] = !!(hi & RAH_AV);
        if (p->mac_valid[i])
            p->n_macs = i + 1;
        for (uint32_t b = 0; b < 4; b++)
            p->mac[i][b] = (uint8_t)(lo >> (8 * b));
        p->mac[i][4] = (uint8_t)hi;
        p->mac[i][5] = (uint8_t)(hi >> 8);
    }
    p->n_tx_active = 0;
    for (uint32_t q = 0; q < MODEL_QUEUES; q++) {
        uint32_t b = rxq_block(q);
        struct rxq_cfg *rq = &p->rxq[q];
        rq->ring = ((uint64_t)R(p, b + Q_BAH) << 32) | R(p, b + Q_BAL);
        rq->size = R(p, b + Q_LEN) / 16;
        uint32_t srrctl = R(p, b + Q_SRRCTL);
        rq->bsize = (srrctl & 0x1F) * 1024;
        rq->drop_en = !!(srrctl & SRRCTL_DROP_EN);
        rq->enabled = (R(p, b + Q_DCTL) & RXDCTL_ENABLE) && rq->size && rq->bsize;
        rq->stat = (R(p, REG_RQSMR + 4 * (q / 4)) >> (8 * (q % 4))) & 0xF;

        b = txq_block(q);
        struct txq_cfg *tq = &p->txq[q];
        tq->ring = ((uint64_t)R(p, b + Q_BAH) << 32) | R(p, b + Q_BAL);
        tq->size = R(p, b + Q_LEN) / 16;
        uint32_t txdctl = R(p, b + Q_DCTL);
        tq->enabled = (txdctl & TXDCTL_ENABLE) && tq->size;
        tq->wthresh = (txdctl >> 16) & 0x7F;
        uint32_t wbal = R(p, b + Q_TDWBAL);
        tq->head_wb_enabled = wbal & 1;
        tq->head_wb = ((uint64_t)R(p, b + Q_TDWBAH) << 32) | (wbal & ~3u);
        tq->stat = (R(p, REG_TQSM + 4 * (q / 4)) >> (8 * (q % 4))) & 0xF;
        if (tq->enabled)
            p->tx_active[p->n_tx_active++] = (uint8_t)q;
    }
}

/* ------------------------------------------------------------------ IOMMU */

static void record_fault(struct model_port *p, uint64_t iova, uint32_t length, int write)
{
    struct model *m = p->m;
    struct model_fault *f = &m->fault_log[m->faults % MODEL_FAULT_LOG];
    f->iova = iova;
    f->length = length;
    f->port = (uint16_t)p->index;
    f->write = (uint16_t)write;
    __atomic_store_n(&m->faults, m->faults + 1, __ATOMIC_RELEASE);
    p->c.dma_faults++;
}

/* Translate a device access of `length` bytes at `iova`. No mapping: a fault is recorded
 * (like a DMAR fault) and NULL returned, so no data moves. */
static uint8_t *dma(struct model_port *p, uint64_t iova, uint32_t length, int write)
{
    struct model *m = p->m;
    struct iommu_map *c = m->last_map;
    if (c && iova - c->iova < c->size && length <= c->size - (iova - c->iova))
        return c->host + (iova - c->iova);
    for (uint32_t i = 0; i < m->nmaps; i++) {
        c = &m->maps[i];
        if (iova - c->iova < c->size && length <= c->size - (iova - c->iova)) {
            m->last_map = c;
            return c->host + (iova - c->iova);
        }
    }
    record_fault(p, iova, length, write);
    return NULL;
}

int model_iommu_map(struct model *m, uint64_t iova, uint64_t size, uint64_t vaddr)
{
    int rc = 0;
    model_lock(m);
    if (size == 0 || iova + size < iova) {
        rc = -EINVAL;
    } else if (m->nmaps == MODEL_MAX_MAPS) {
        rc = -ENOSPC;
    } else {
        for (uint32_t i = 0; i < m->nmaps; i++)
            if (iova < m->maps[i].iova + m->maps[i].size && m->maps[i].iova < iova + size)
                rc = -EEXIST;
        if (!rc)
            m->maps[m->nmaps++] = (struct iommu_map){iova, size, (uint8_t *)(uintptr_t)vaddr};
    }
    model_unlock(m);
    return rc;
}

int model_iommu_unmap(struct model *m, uint64_t iova, uint64_t size)
{
    int rc = -ENOENT;
    model_lock(m);
    for (uint32_t i = 0; i < m->nmaps; i++) {
        if (m->maps[i].iova == iova && m->maps[i].size == size) {
            m->maps[i] = m->maps[--m->nmaps];
            m->last_map = NULL;
            rc = 0;
            break;
        }
    }
    model_unlock(m);
    return rc;
}

uint32_t model_iommu_count(struct model *m) { return m->nmaps; }
uint64_t model_fault_count(struct model *m) { return __atomic_load_n(&m->faults, __ATOMIC_ACQUIRE); }

uint32_t model_fault_log(struct model *m, struct model_fault *out, uint32_t max)
{
    model_lock(m);
    uint64_t n = m->faults < MODEL_FAULT_LOG ? m->faults : MODEL_FAULT_LOG;
    uint32_t k = 0;
    for (uint64_t i = m->faults - n; i < m->faults && k < max; i++)
        out[k++] = m->fault_log[i % MODEL_FAULT_LOG];
    model_unlock(m);
    return k;
}

/* ------------------------------------------------------------------ link */

void model_port_set_dma_enabled(struct model_port *p, int enabled)
{
    model_lock(p->m);
    p->dma_enabled = enabled;
    model_unlock(p->m);
}

/* Start (delay_ns >= 0) or stop (delay_ns < 0) link establishment, e.g. AUTOC.AN_RESTART. */
void model_port_link_enable(struct model_port *p, int64_t delay_ns)
{
    model_lock(p->m);
    p->link_enabled = delay_ns >= 0;
    p->link_up_at = delay_ns >= 0 ? now_ns() + (uint64_t)delay_ns : 0;
    model_unlock(p->m);
}

void model_port_set_link(struct model_port *p, int up)
{
    model_lock(p->m);
    p->link_forced_down = !up;
    model_unlock(p->m);
}

static int side_ready(struct model_port *p, uint64_t now)
{
    return p && !p->removed && p->link_enabled && !p->link_forced_down && now >= p->link_up_at;
}

static int link_up(struct model_port *p, uint64_t now)
{
    if (!side_ready(p, now))
        return 0;
    switch (p->wire) {
    case WIRE_CABLE: return side_ready(p->peer, now);
    case WIRE_TAP:
    case WIRE_TRAFFIC: return 1;
    default: return 0;
    }
}

static int update_link(struct model_port *p, uint64_t now)
{
    int up = link_up(p, now);
    if (up != p->link_was_up) {
        p->link_was_up = up;
        model_reg_or(p, REG_EICR, EICR_LSC); /* link status change cause (#interrupts) */
    }
    return up;
}

int model_port_link_up(struct model_port *p)
{
    model_lock(p->m);
    int up = update_link(p, now_ns());
    model_unlock(p->m);
    return up;
}

void model_port_remove(struct model_port *p)
{
    model_lock(p->m);
    p->removed = 1;
    /* After a surprise removal every MMIO read completes with all-ones (#surprise-removal),
     * also for native code reading the mapping directly. */
    memset(p->regs, 0xFF, MODEL_BAR_SIZE);
    pb_clear(p);
    model_unlock(p->m);
}

void model_port_flush(struct model_port *p)
{
    model_lock(p->m);
    pb_clear(p);
    p->link_enabled = 0;
    p->link_was_up = 0;
    model_unlock(p->m);
}

void model_port_counters(struct model_port *p, struct model_port_counters *out)
{
    model_lock(p->m);
    *out = p->c;
    model_unlock(p->m);
}

/* ------------------------------------------------------------------ RSS (#rss) */

uint32_t model_toeplitz(const uint8_t *key, const uint8_t *data, uint32_t length)
{
    uint32_t hash = 0;
    uint32_t window = ((uint32_t)key[0] << 24) | ((uint32_t)key[1] << 16) | ((uint32_t)key[2] << 8) | key[3];
    for (uint32_t i = 0; i < length; i++) {
        uint8_t next = i + 4 < 40 ? key[i + 4] : 0;
        for (int bit = 7; bit >= 0; bit--) {
            if (data[i] & (1u << bit))
                hash ^= window;
            window = (window << 1) | ((next >> bit) & 1);
        }
    }
    return hash;
}

#define MRQC_IPV4_TCP (1u << 16)
#define MRQC_IPV4 (1u << 17)
#define MRQC_IPV6 (1u << 20)
#define MRQC_IPV6_TCP (1u << 21)
#define MRQC_IPV4_UDP (1u << 22)
#define MRQC_IPV6_UDP (1u << 23)
#define PTYPE_IPV4 0x10u
#define PTYPE_IPV6 0x40u
#define PTYPE_TCP 0x100u
#define PTYPE_UDP 0x200u

/* Parse the L3/L4 headers, returning the packet-type bits of the write-back's low dword and,
 * when RSS is on, the hash, its type (bits 3:0) and the RETA queue. */
static void classify(struct model_port *p, const uint8_t *f, uint32_t len, uint32_t *info, uint32_t *hash, uint32_t *queue)
{
    *info = 0;
    *hash = 0;
    *queue = 0;
    uint32_t l3 = 14;
    uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
    if (type == 0x8100 && len >= 18) {
        type = (uint16_t)(f[16] << 8 | f[17]);
        l3 = 18;
    }
    uint8_t in[36];
    uint32_t in_len = 0, rss_type = 0, ptype = 0;
    if (type == 0x0800 && len >= l3 + 20 && (f[l3] >> 4) == 4) {
        uint32_t ihl = (f[l3] & 0xF) * 4u;
        uint8_t proto = f[l3 + 9];
        int fragment = ((f[l3 + 6] & 0x3F) | f[l3 + 7]) != 0;
        ptype = PTYPE_IPV4;
        memcpy(in, f + l3 + 12, 8);
        int l4 = !fragment && len >= l3 + ihl + 4 && ihl >= 20;
        if (l4 && proto == 6) {
            ptype |= PTYPE_TCP;
            if (p->mrqc & MRQC_IPV4_TCP) { memcpy(in + 8, f + l3 + ihl, 4); in_len = 12; rss_type = 1; }
        } else if (l4 && proto == 17) {
            ptype |= PTYPE_UDP;
            if (p->mrqc & MRQC_IPV4_UDP) { memcpy(in + 8, f + l3 + ihl, 4); in_len = 12; rss_type = 7; }
        }
        if (!in_len && (p->mrqc & MRQC_IPV4)) { in_len = 8; rss_type = 2; }
    } else if (type == 0x86DD && len >= l3 + 40) {
        uint8_t next = f[l3 + 6];
        ptype = PTYPE_IPV6;
        memcpy(in, f + l3 + 8, 32);
        int l4 = len >= l3 + 44;
        if (l4 && next == 6) {
            ptype |= PTYPE_TCP;
            if (p->mrqc & MRQC_IPV6_TCP) { memcpy(in + 32, f + l3 + 40, 4); in_len = 36; rss_type = 3; }
        } else if (l4 && next == 17) {
            ptype |= PTYPE_UDP;
            if (p->mrqc & MRQC_IPV6_UDP) { memcpy(in + 32, f + l3 + 40, 4); in_len = 36; rss_type = 8; }
        }
        if (!in_len && (p->mrqc & MRQC_IPV6)) { in_len = 32; rss_type = 5; }
    }
    if (p->rss && in_len) {
        *hash = model_toeplitz(p->key, in, in_len);
        *queue = p->reta[*hash & 0x7F];
        *info = rss_type;
    }
    *info |= ptype;
}

/* ------------------------------------------------------------------ receive (§7.1) */

static uint32_t crc32_table[256];
static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc32_table[i] = c;
    }
}
static uint32_t crc32(const uint8_t *d, uint32_t n)
{
    if (!crc32_table[1])
        crc32_init();
    uint32_t c = 0xFFFFFFFFu;
    for (uint32_t i = 0; i < n; i++)
        c = crc32_table[(c ^ d[i]) & 0xFF] ^ (c >> 8);
    return ~c;
}

/* Write one frame into queue q's ring. Returns 1 when delivered (or lost to a DMA fault),
 * 0 when the queue cannot take it now (disabled, or too few free descriptors). */
static int deliver(struct model_port *p, uint32_t q, const uint8_t *frame, uint32_t length, uint32_t hash, uint32_t info)
{
    struct rxq_cfg *rq = &p->rxq[q];
    if (!rq->enabled || !p->dma_enabled)
        return 0;
    uint32_t b = rxq_block(q);
    uint32_t head = R(p, b + Q_HEAD), tail = R(p, b + Q_TAIL);
    if (head >= rq->size || tail >= rq->size)
        return 0;
    /* descriptors from RDH up to, not including, RDT belong to hardware (#ring-mechanics) */
    uint32_t free_desc = (tail + rq->size - head) % rq->size;
    uint32_t needed = (length + rq->bsize - 1) / rq->bsize;
    if (free_desc < needed)
        return 0;
    uint32_t done = 0;
    for (uint32_t k = 0; k < needed; k++) {
        uint8_t *d = dma(p, rq->ring + 16ull * head, 16, 1);
        uint32_t chunk = length - done < rq->bsize ? length - done : rq->bsize;
        if (d) {
            uint64_t buffer;
            memcpy(&buffer, d, 8);
            uint8_t *dst = dma(p, buffer, chunk, 1);
            if (dst)
                memcpy(dst, frame + done, chunk);
            /* advanced write-back (#rx-descriptors): everything first, the status dword with DD last */
            uint32_t lo = info, hi = p->pcsd ? hash : 0, len_vlan = chunk;
            uint32_t status = RXD_STAT_DD | (k == needed - 1 ? RXD_STAT_EOP : 0);
            memcpy(d, &lo, 4);
            memcpy(d + 4, &hi, 4);
            memcpy(d + 12, &len_vlan, 4);
            __atomic_store_n((uint32_t *)(d + 8), status, __ATOMIC_RELEASE);
        }
        done += chunk;
        head = head + 1 == rq->size ? 0 : head + 1;
    }
    W(p, b + Q_HEAD, head);
    COUNT(p, REG_QPRC(rq->stat), 1);
    COUNT64(p, MODEL_STAT64_QBRC + rq->stat, length);
    p->c.rx_delivered++;
    p->c.rx_delivered_bytes += length;
    p->c.rx_queue_frames[q]++;
    return 1;
}

/* The head-of-line decision for one frame: deliver it, drop it for a DROP_EN queue without
 * descriptors, or leave it waiting in the packet buffer (returns 0). */
static int dispatch(struct model_port *p, struct pb_frame *f)
{
    if (deliver(p, f->queue, f->data, f->length, f->hash, f->info))
        return 1;
    if (p->dma_enabled && p->rxq[f->queue].enabled && p->rxq[f->queue].drop_en) {
        COUNT(p, REG_QPRDC(p->rxq[f->queue].stat), 1);
        p->c.rx_no_descriptor++;
        return 1;
    }
    return 0;
}

static uint32_t drain_packet_buffer(struct model_port *p)
{
    uint32_t n = 0;
    while (p->pb_count) {
        struct pb_frame *f = &p->pb[p->pb_head];
        if (!dispatch(p, f))
            break;
        p->pb_bytes -= f->length;
        free(f->data);
        p->pb_head = (p->pb_head + 1) % PB_SLOTS;
        p->pb_count--;
        n++;
    }
    p->c.rx_buffered = p->pb_count;
    return n;
}

static int l2_accept(struct model_port *p, const uint8_t *f)
{
    for (uint32_t i = 0; i < p->n_macs; i++)
        if (p->mac_valid[i] && !memcmp(p->mac[i], f, 6))
            return 1;
    static const uint8_t bcast[6] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    if (!memcmp(f, bcast, 6))
        return !!(p->fctrl & FCTRL_BAM);
    if (f[0] & 1)
        return !!(p->fctrl & FCTRL_MPE); /* the multicast table (MTA) is not modelled */
    return !!(p->fctrl & FCTRL_UPE);
}

/* A frame (without FCS) arrives from the wire. */
static void port_receive(struct model_port *p, const uint8_t *frame, uint32_t length, uint64_t now)
{
    p->c.rx_wire_frames++;
    if (p->removed)
        return;
    refresh_config(p);
    if (!link_up(p, now)) {
        p->c.rx_link_down++;
        return;
    }
    if (!p->rxen) {
        p->c.rx_disabled++;
        return;
    }
    COUNT(p, REG_TPR, 1);
    COUNT64(p, MODEL_STAT64_TOR, length + 4);
    if (length < MIN_FRAME || length + 4 > p->max_frame) {
        COUNT(p, length < MIN_FRAME ? REG_RUC : REG_ROC, 1);
        p->c.rx_size_errors++;
        return;
    }
    if (!l2_accept(p, frame)) {
        p->c.rx_filtered++;
        return;
    }
    p->c.rx_accepted++;
    COUNT(p, REG_GPRC, 1);
    COUNT64(p, MODEL_STAT64_GORC, length + 4);
    if (frame[0] & 1)
        COUNT(p, (frame[0] == 0xFF && !memcmp(frame, frame + 1, 5)) ? REG_BPRC : REG_MPRC, 1);

    struct pb_frame f = {.data = NULL, .length = length};
    uint32_t queue;
    classify(p, frame, length, &f.info, &f.hash, &queue);
    f.queue = (uint16_t)queue;
    const uint8_t *data = frame;
    if (!p->crc_strip) { /* HLREG0.RXCRCSTRP = 0: the FCS stays in the buffer */
        memcpy(p->rxbuf, frame, length);
        uint32_t fcs = crc32(frame, length);
        memcpy(p->rxbuf + length, &fcs, 4);
        data = p->rxbuf;
        f.length += 4;
    }
    if (!p->pb_count) {
        f.data = (uint8_t *)data;
        if (dispatch(p, &f))
            return;
    }
    if (p->pb_count == PB_SLOTS || p->pb_bytes + f.length > p->pb_capacity || !(f.data = malloc(f.length))) {
        COUNT(p, REG_MPC0, 1);
        model_reg_or(p, REG_EICR, EICR_RX_MISS);
        p->c.rx_missed++;
        return;
    }
    memcpy(f.data, data, f.length);
    p->pb[(p->pb_head + p->pb_count) % PB_SLOTS] = f;
    p->pb_count++;
    p->pb_bytes += f.length;
    p->c.rx_buffered = p->pb_count;
}

int model_receive_frame(struct model_port *p, const uint8_t *frame, uint32_t length)
{
    if (length > MAX_FRAME)
        return -1;
    model_lock(p->m);
    port_receive(p, frame, length, now_ns());
    model_unlock(p->m);
    return 0;
}

/* ------------------------------------------------------------------ traffic generator/checker */

#define TRAFFIC_MAGIC 0x47595849u /* "IXYG" */
#define T_MAGIC 42
#define T_STREAM 46
#define T_FLOW 48
#define T_LEN 50
#define T_SEQ 52
#define T_PATTERN 60

static inline uint8_t pattern_byte(uint64_t seq, uint32_t flow, uint32_t j) { return (uint8_t)(seq * 7 + j * 13 + flow); }

static uint16_t ip_checksum(const uint8_t *h)
{
    uint32_t s = 0;
    for (int i = 0; i < 20; i += 2)
        s += (uint32_t)h[i] << 8 | h[i + 1];
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)~s;
}

static void put16(uint8_t *d, uint16_t v) { d[0] = (uint8_t)(v >> 8); d[1] = (uint8_t)v; }
static void put32(uint8_t *d, uint32_t v) { put16(d, (uint16_t)(v >> 16)); put16(d + 2, (uint16_t)v); }
static uint16_t get16(const uint8_t *d) { return (uint16_t)(d[0] << 8 | d[1]); }

/* Ethernet / IPv4 / UDP, then magic, stream, flow, length, sequence number and a pattern
 * that depends on both, so any changed byte is caught. */
static uint32_t traffic_build(struct model_traffic *t, uint32_t flow, uint64_t seq, uint8_t *f)
{
    uint32_t n = t->size;
    memcpy(f, t->dst, 6);
    memcpy(f + 6, t->src, 6);
    put16(f + 12, 0x0800);
    uint8_t *ip = f + 14;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, (uint16_t)(n - 14));
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = 17;
    put32(ip + 12, t->ip_base + flow);
    put32(ip + 16, t->ip_base + 0x00800001u);
    put16(ip + 10, ip_checksum(ip));
    uint8_t *udp = f + 34;
    put16(udp, (uint16_t)(1024 + flow));
    put16(udp + 2, 9000);
    put16(udp + 4, (uint16_t)(n - 34));
    put16(udp + 6, 0);
    uint32_t magic = TRAFFIC_MAGIC;
    memcpy(f + T_MAGIC, &magic, 4);
    memcpy(f + T_STREAM, &t->stream, 2);
    uint16_t fl = (uint16_t)flow, len16 = (uint16_t)n;
    memcpy(f + T_FLOW, &fl, 2);
    memcpy(f + T_LEN, &len16, 2);
    memcpy(f + T_SEQ, &seq, 8);
    for (uint32_t j = T_PATTERN; j < n; j++)
        f[j] = pattern_byte(seq, flow, j);
    return n;
}

uint32_t model_traffic_frame(struct model_traffic *t, uint32_t flow, uint64_t seq, uint8_t *out)
{
    return traffic_build(t, flow, seq, out);
}

static void traffic_check(struct model_traffic *t, const uint8_t *f, uint32_t len)
{
    struct model_traffic_stats *st = &t->st;
    st->received++;
    st->received_bytes += len;
    uint32_t magic;
    uint16_t stream, flow, flen;
    uint64_t seq;
    if (len < T_PATTERN)
        goto foreign;
    memcpy(&magic, f + T_MAGIC, 4);
    memcpy(&stream, f + T_STREAM, 2);
    memcpy(&flow, f + T_FLOW, 2);
    memcpy(&flen, f + T_LEN, 2);
    memcpy(&seq, f + T_SEQ, 8);
    if (magic != TRAFFIC_MAGIC || flow >= MODEL_MAX_FLOWS || (t->expect_stream >= 0 && stream != t->expect_stream))
        goto foreign;
    st->valid++;
    /* bytes 0..11 (MACs) may be rewritten by a forwarder; everything after must be intact */
    int bad = flen != len || get16(f + 12) != 0x0800 || ip_checksum(f + 14) != 0 || get16(f + 16) != len - 14 ||
              get16(f + 38) != len - 34 || f[23] != 17;
    for (uint32_t j = T_PATTERN; j < len && !bad; j++)
        bad = f[j] != pattern_byte(seq, flow, j);
    if (bad) {
        st->corrupt++;
        return;
    }
    struct flow_rx *fr = &t->flow_rx[flow];
    if (seq >= fr->next) {
        uint64_t advance = seq + 1 - fr->next;
        if (advance >= 1024) {
            memset(fr->seen, 0, sizeof(fr->seen));
        } else {
            for (uint64_t s = fr->next; s <= seq; s++)
                fr->seen[(s % 1024) / 64] &= ~(1ull << (s % 64));
        }
        st->gaps += seq - fr->next;
        fr->next = seq + 1;
    } else if (fr->next - seq <= 1024) {
        uint64_t bit = 1ull << (seq % 64);
        if (fr->seen[(seq % 1024) / 64] & bit) {
            st->duplicates++;
            return;
        }
        st->reordered++;
        st->gaps--;
    } else {
        st->reordered++;
        st->gaps--;
        st->unique++;
        return;
    }
    fr->seen[(seq % 1024) / 64] |= 1ull << (seq % 64);
    st->unique++;
    return;
foreign:
    st->foreign++;
}

static uint32_t traffic_generate(struct model_port *p, struct model_traffic *t, uint64_t now)
{
    if (!t->running || !t->flows)
        return 0;
    uint64_t want = t->burst;
    if (t->count) {
        if (t->st.sent >= t->count) {
            t->running = 0;
            return 0;
        }
        if (t->count - t->st.sent < want)
            want = t->count - t->st.sent;
    }
    if (t->rate) {
        uint64_t due = (uint64_t)((unsigned __int128)(now - t->start_ns) * t->rate / 1000000000u) + 1;
        want = due > t->st.sent ? (due - t->st.sent < want ? due - t->st.sent : want) : 0;
    }
    if (t->window && t->checker) {
        uint64_t in_flight = t->st.sent - __atomic_load_n(&t->checker->st.unique, __ATOMIC_RELAXED);
        want = in_flight >= t->window ? 0 : (t->window - in_flight < want ? t->window - in_flight : want);
    }
    for (uint64_t i = 0; i < want; i++) {
        uint32_t flow = (uint32_t)(t->st.sent % t->flows);
        uint32_t n = traffic_build(t, flow, t->flow_seq[flow]++, t->scratch);
        t->st.sent++;
        port_receive(p, t->scratch, n, now);
    }
    return (uint32_t)want;
}

struct model_traffic *model_wire_traffic(struct model_port *p)
{
    struct model_traffic *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->flow_seq = calloc(MODEL_MAX_FLOWS, sizeof(uint64_t));
    t->flow_rx = calloc(MODEL_MAX_FLOWS, sizeof(struct flow_rx));
    if (!t->flow_seq || !t->flow_rx) {
        traffic_free(t);
        return NULL;
    }
    t->port = p;
    t->expect_stream = -1;
    model_wire_none(p);
    model_lock(p->m);
    p->traffic = t;
    p->wire = WIRE_TRAFFIC;
    model_unlock(p->m);
    return t;
}

void model_traffic_configure(struct model_traffic *t, const uint8_t *dst_mac, const uint8_t *src_mac, uint32_t frame_size,
                             uint32_t flows, uint64_t count, uint64_t rate_pps, uint32_t burst, uint32_t window,
                             uint16_t stream, uint32_t ip_base)
{
    model_lock(t->port->m);
    memcpy(t->dst, dst_mac, 6);
    memcpy(t->src, src_mac, 6);
    t->size = frame_size < MIN_FRAME ? MIN_FRAME : frame_size > MAX_FRAME ? MAX_FRAME : frame_size;
    t->flows = flows == 0 ? 1 : flows > MODEL_MAX_FLOWS ? MODEL_MAX_FLOWS : flows;
    t->count = count;
    t->rate = rate_pps;
    t->burst = burst ? burst : 32;
    t->window = window;
    t->stream = stream;
    t->ip_base = ip_base;
    model_unlock(t->port->m);
}

void model_traffic_pair(struct model_traffic *generator, struct model_traffic *checker)
{
    model_lock(generator->port->m);
    generator->checker = checker;
    model_unlock(generator->port->m);
}

void model_traffic_expect_stream(struct model_traffic *t, int32_t stream)
{
    model_lock(t->port->m);
    t->expect_stream = stream;
    model_unlock(t->port->m);
}

void model_traffic_start(struct model_traffic *t)
{
    model_lock(t->port->m);
    t->running = 1;
    t->start_ns = now_ns() - (t->rate ? t->st.sent * 1000000000ull / t->rate : 0);
    model_unlock(t->port->m);
}

void model_traffic_stop(struct model_traffic *t)
{
    model_lock(t->port->m);
    t->running = 0;
    model_unlock(t->port->m);
}

void model_traffic_stats(struct model_traffic *t, struct model_traffic_stats *out)
{
    model_lock(t->port->m);
    *out = t->st;
    model_unlock(t->port->m);
}

/* ------------------------------------------------------------------ wires */

void model_wire_none(struct model_port *p)
{
    model_lock(p->m);
    if (p->wire == WIRE_CABLE && p->peer) {
        p->peer->wire = WIRE_NONE;
        p->peer->peer = NULL;
    }
    if (p->traffic) {
        for (uint32_t i = 0; i < p->m->nports; i++) /* no generator may keep pointing at it */
            if (p->m->ports[i]->traffic && p->m->ports[i]->traffic->checker == p->traffic)
                p->m->ports[i]->traffic->checker = NULL;
        traffic_free(p->traffic);
        p->traffic = NULL;
    }
    p->wire = WIRE_NONE;
    p->peer = NULL;
    p->tap_fd = -1;
    model_unlock(p->m);
}

void model_wire_cable(struct model_port *a, struct model_port *b)
{
    model_wire_none(a);
    model_wire_none(b);
    model_lock(a->m);
    a->wire = b->wire = WIRE_CABLE;
    a->peer = b;
    b->peer = a;
    model_unlock(a->m);
}

void model_wire_tap(struct model_port *p, int fd)
{
    model_wire_none(p);
    model_lock(p->m);
    p->wire = WIRE_TAP;
    p->tap_fd = fd;
    model_unlock(p->m);
}

/* ------------------------------------------------------------------ transmit (§7.2) */

static void put_on_wire(struct model_port *p, const uint8_t *frame, uint32_t length, uint64_t now)
{
    switch (p->wire) {
    case WIRE_CABLE: port_receive(p->peer, frame, length, now); break;
    case WIRE_TRAFFIC: traffic_check(p->traffic, frame, length); break;
    case WIRE_TAP:
        if (write(p->tap_fd, frame, length) < 0)
            p->c.wire_dropped++;
        break;
    default: p->c.wire_dropped++; break;
    }
}

/* Process queue q from TDH towards TDT, whole frames only, at most `budget` frames. */
static uint32_t transmit_queue(struct model_port *p, uint32_t q, uint32_t budget, uint64_t now)
{
    struct txq_cfg *tq = &p->txq[q];
    uint32_t b = txq_block(q);
    uint32_t head = R(p, b + Q_HEAD), tail = R(p, b + Q_TAIL);
    if (head >= tq->size || tail >= tq->size)
        return 0;
    uint32_t frames = 0;
    while (head != tail && frames < budget) {
        /* gather descriptors up to EOP; a frame whose EOP is not yet behind TDT waits */
        uint32_t i = head, length = 0, ndesc = 0;
        int eop = 0, broken = 0;
        while (!eop) {
            uint8_t *d = dma(p, tq->ring + 16ull * i, 16, 0);
            if (!d)
                return frames; /* the ring itself is unreachable: the queue stalls */
            uint64_t addr;
            uint32_t cmd;
            memcpy(&addr, d, 8);
            memcpy(&cmd, d + 8, 4);
            ndesc++;
            if (!(cmd & TXD_DEXT)) {
                broken = 1; /* legacy descriptors are not supported by this model */
                eop = 1;
            } else if ((cmd & TXD_DTYP_MASK) == TXD_DTYP_DATA) {
                uint32_t len = cmd & 0xFFFF;
                if (len == 0 || length + len > MAX_FRAME) {
                    broken = 1;
                } else {
                    uint8_t *src = dma(p, addr, len, 0);
                    if (src)
                        memcpy(p->txbuf + length, src, len);
                    else
                        broken = 1;
                    length += len;
                }
                eop = !!(cmd & TXD_EOP);
            } else if ((cmd & TXD_DTYP_MASK) != TXD_DTYP_CTXT) {
                broken = 1;
                eop = 1;
            }
            i = i + 1 == tq->size ? 0 : i + 1;
            if (!eop && i == tail)
                return frames;
        }
        if (broken || length == 0) {
            p->c.tx_malformed++;
        } else {
            if (p->tx_pad && length < MIN_FRAME) { /* HLREG0.TXPADEN */
                memset(p->txbuf + length, 0, MIN_FRAME - length);
                length = MIN_FRAME;
            }
            p->c.tx_frames++;
            p->c.tx_bytes += length;
            p->c.tx_queue_frames[q]++;
            COUNT(p, REG_GPTC, 1);
            COUNT(p, REG_TPT, 1);
            COUNT64(p, MODEL_STAT64_GOTC, length + 4);
            COUNT(p, REG_QPTC(tq->stat), 1);
            COUNT64(p, MODEL_STAT64_QBTC + tq->stat, length);
            if (p->txbuf[0] & 1)
                COUNT(p, (p->txbuf[0] == 0xFF && !memcmp(p->txbuf, p->txbuf + 1, 5)) ? REG_BPTC : REG_MPTC, 1);
            put_on_wire(p, p->txbuf, length, now);
        }
        /* descriptor write-back: DD for RS descriptors; with WTHRESH > 0 the hardware
         * writes back regardless of RS (#tx-queue-registers, #ring-mechanics) */
        for (uint32_t k = 0, j = head; k < ndesc; k++, j = j + 1 == tq->size ? 0 : j + 1) {
            uint8_t *d = dma(p, tq->ring + 16ull * j, 16, 1);
            uint32_t cmd;
            if (!d)
                continue;
            memcpy(&cmd, d + 8, 4);
            if ((cmd & TXD_RS) || tq->wthresh)
                __atomic_store_n((uint32_t *)(d + 12), TXD_STAT_DD, __ATOMIC_RELEASE);
        }
        p->c.tx_descriptors += ndesc;
        head = i;
        W(p, b + Q_HEAD, head);
        if (tq->head_wb_enabled) {
            uint8_t *wb = dma(p, tq->head_wb, 4, 1);
            if (wb)
                __atomic_store_n((uint32_t *)wb, head, __ATOMIC_RELEASE);
        }
        frames++;
    }
    return frames;
}

static uint32_t tap_receive(struct model_port *p, uint64_t now)
{
    uint32_t n = 0;
    for (; n < TAP_BURST; n++) {
        ssize_t got = read(p->tap_fd, p->txbuf, MAX_FRAME);
        if (got <= 0)
            break;
        uint32_t len = (uint32_t)got;
        if (len < MIN_FRAME) { /* a real sender's MAC pads runts before they reach the wire */
            memset(p->txbuf + len, 0, MIN_FRAME - len);
            len = MIN_FRAME;
        }
        port_receive(p, p->txbuf, len, now);
    }
    return n;
}

/* ------------------------------------------------------------------ running */

uint32_t model_step(struct model *m, uint32_t budget)
{
    uint32_t work = 0;
    pthread_mutex_lock(&m->lock);
    uint64_t now = now_ns();
    for (uint32_t i = 0; i < m->nports; i++) {
        struct model_port *p = m->ports[i];
        if (p->removed)
            continue;
        refresh_config(p);
        int up = update_link(p, now);
        work += drain_packet_buffer(p);
        if (up && p->te && p->dma_enabled)
            for (uint32_t k = 0; k < p->n_tx_active; k++)
                work += transmit_queue(p, p->tx_active[k], budget, now);
        if (up && p->wire == WIRE_TAP)
            work += tap_receive(p, now);
        if (up && p->wire == WIRE_TRAFFIC)
            work += traffic_generate(p, p->traffic, now);
    }
    pthread_mutex_unlock(&m->lock);
    return work;
}

void model_run(struct model *m, volatile uint32_t *stop)
{
    uint32_t idle = 0;
    while (!__atomic_load_n(stop, __ATOMIC_ACQUIRE)) {
        if (model_step(m, 64)) {
            idle = 0;
        } else if (++idle > 2000) {
            struct timespec ts = {0, 20000}; /* idle: poll every 20 us instead of spinning */
            nanosleep(&ts, NULL);
        }
        if (__atomic_load_n(&m->control_waiting, __ATOMIC_RELAXED))
            sched_yield();
    }
}
