/* The 82599 model's packet engine: what the silicon does per packet.
 *
 * Control (register semantics, reset, timers, wires) lives in Python (ixyd/model/nic.py);
 * this file moves frames: TX descriptor rings -> wire -> RX filters, RSS, packet buffer ->
 * RX descriptor rings, with every DMA translated through the model's IOMMU table.
 * Register facts: docs/reference/82599.md, whose headings the #marks in engine.c name;
 * section numbers (§7.1 ...) cite the 82599 datasheet.
 */
#ifndef IXYD_MODEL_ENGINE_H
#define IXYD_MODEL_ENGINE_H

#include <stdint.h>

#define MODEL_BAR_SIZE 0x20000u
#define MODEL_MAX_PORTS 8
#define MODEL_MAX_MAPS 512
#define MODEL_FAULT_LOG 64
#define MODEL_QUEUES 128
#define MODEL_STAT_COUNTERS 16
#define MODEL_MAX_FLOWS 4096

/* Counts the model keeps for itself: the truth tests compare the driver against.
 * 64-bit, never cleared by register reads. */
struct model_port_counters {
    uint64_t rx_wire_frames;      /* frames that reached the port's MAC from the wire */
    uint64_t rx_link_down;        /* arrived while the link was down: lost on the wire */
    uint64_t rx_disabled;         /* RXCTRL.RXEN = 0: not received */
    uint64_t rx_size_errors;      /* runt or oversize (RUC / ROC) */
    uint64_t rx_filtered;         /* rejected by the L2 filters (FCTRL, RAL/RAH) */
    uint64_t rx_accepted;         /* passed the filters (GPRC) */
    uint64_t rx_delivered;        /* written to an RX ring */
    uint64_t rx_delivered_bytes;  /* bytes written to RX buffers (incl. FCS when not stripped) */
    uint64_t rx_no_descriptor;    /* dropped for a DROP_EN queue without descriptors (QPRDC) */
    uint64_t rx_missed;           /* dropped because the packet buffer was full (MPC) */
    uint64_t rx_buffered;         /* frames currently waiting in the packet buffer */
    uint64_t tx_frames;           /* frames put on the wire */
    uint64_t tx_bytes;            /* their bytes, without FCS */
    uint64_t tx_descriptors;      /* descriptors consumed */
    uint64_t tx_malformed;        /* frames dropped: bad descriptor, oversize, DMA fault */
    uint64_t dma_faults;          /* IOMMU faults caused by this port */
    uint64_t wire_dropped;        /* sent while the peer could not take it (no wire) */
    uint64_t rx_queue_frames[MODEL_QUEUES];
    uint64_t tx_queue_frames[MODEL_QUEUES];
};

/* 64-bit counters that span a register pair (datasheet 8.2.3.23): read through
 * model_stat64_take so the low and high halves come from one snapshot. */
#define MODEL_STAT64_GORC 0
#define MODEL_STAT64_GOTC 1
#define MODEL_STAT64_TOR 2
#define MODEL_STAT64_QBRC 3           /* + stat counter index 0..15 */
#define MODEL_STAT64_QBTC 19          /* + stat counter index 0..15 */
#define MODEL_STAT64_COUNT 35

struct model_fault {
    uint64_t iova;
    uint32_t length;
    uint16_t port;
    uint16_t write;               /* 1 = device wrote memory, 0 = device read */
};

/* Sequence-numbered test traffic, like MoonGen's generator and verifier. */
struct model_traffic_stats {
    uint64_t sent;                /* generator: frames handed to the port's receive path */
    uint64_t received;            /* checker: frames taken from the port's transmit path */
    uint64_t received_bytes;
    uint64_t valid;               /* carried our signature and an in-range flow */
    uint64_t unique;              /* valid and not seen before */
    uint64_t duplicates;
    uint64_t reordered;           /* arrived after a later sequence number of the same flow */
    uint64_t corrupt;             /* payload, length or IP/UDP header differs from what was sent */
    uint64_t foreign;             /* not generator traffic, or from an unexpected stream */
    uint64_t gaps;                /* sequence numbers skipped and not (yet) filled in */
};

struct model;
struct model_port;
struct model_traffic;

/* lifecycle */
struct model *model_new(uint32_t nports);
void model_free(struct model *m);
struct model_port *model_port(struct model *m, uint32_t index);
volatile uint32_t *model_port_regs(struct model_port *p);

/* registers: single aligned 32-bit atomic accesses to the register file */
uint32_t model_reg_load(struct model_port *p, uint32_t offset);
void model_reg_store(struct model_port *p, uint32_t offset, uint32_t value);
uint32_t model_reg_take(struct model_port *p, uint32_t offset);          /* read and clear */
void model_reg_or(struct model_port *p, uint32_t offset, uint32_t bits);
void model_reg_and(struct model_port *p, uint32_t offset, uint32_t bits);
uint64_t model_stat64_take(struct model_port *p, uint32_t which);       /* see MODEL_STAT64_* */
void model_load_register_image(struct model_port *p, const uint32_t *image);
void model_config_changed(struct model_port *p);

/* port state owned by the control plane */
void model_port_set_dma_enabled(struct model_port *p, int enabled);     /* BME and not GIO_DIS */
void model_port_link_enable(struct model_port *p, int64_t delay_ns);    /* < 0: disable */
void model_port_set_link(struct model_port *p, int up);                 /* fault hook: force down */
int model_port_link_up(struct model_port *p);
void model_port_remove(struct model_port *p);                           /* surprise removal */
void model_port_flush(struct model_port *p);                            /* reset: drop buffered frames */
void model_port_counters(struct model_port *p, struct model_port_counters *out);

/* wires */
void model_wire_none(struct model_port *p);
void model_wire_cable(struct model_port *a, struct model_port *b);
void model_wire_tap(struct model_port *p, int fd);
struct model_traffic *model_wire_traffic(struct model_port *p);
void model_traffic_configure(struct model_traffic *t, const uint8_t *dst_mac, const uint8_t *src_mac,
                             uint32_t frame_size, uint32_t flows, uint64_t count, uint64_t rate_pps,
                             uint32_t burst, uint32_t window, uint16_t stream, uint32_t ip_base);
void model_traffic_pair(struct model_traffic *generator, struct model_traffic *checker);
void model_traffic_expect_stream(struct model_traffic *t, int32_t stream);
void model_traffic_start(struct model_traffic *t);
void model_traffic_stop(struct model_traffic *t);
void model_traffic_stats(struct model_traffic *t, struct model_traffic_stats *out);
uint32_t model_traffic_frame(struct model_traffic *t, uint32_t flow, uint64_t seq, uint8_t *out);
int model_receive_frame(struct model_port *p, const uint8_t *frame, uint32_t length);

/* IOMMU */
int model_iommu_map(struct model *m, uint64_t iova, uint64_t size, uint64_t vaddr);
int model_iommu_unmap(struct model *m, uint64_t iova, uint64_t size);
uint32_t model_iommu_count(struct model *m);
uint64_t model_fault_count(struct model *m);
uint32_t model_fault_log(struct model *m, struct model_fault *out, uint32_t max);

/* running */
uint32_t model_step(struct model *m, uint32_t budget);
void model_run(struct model *m, volatile uint32_t *stop);
void model_lock(struct model *m);
void model_unlock(struct model *m);

/* helpers shared with Python */
uint32_t model_toeplitz(const uint8_t *key, const uint8_t *data, uint32_t length);

#endif
