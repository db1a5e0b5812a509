/*
 * Guest driver of the partition bus (host side: pykvm/bus/host.py).
 *
 * bus_connect() hands the host the management rings (trapped registers, once),
 * negotiates the bus version and collects the offers. bus_open() builds a
 * GPADL for a channel's two rings and opens it at a service version both
 * sides speak. Data moves through rings and doorbells with no exit; replies
 * are awaited by polling, or by halting until the bus interrupt
 * (PYKVM_BUS_VECTOR) arrives when interrupts are enabled (bus_use_irq).
 *
 * Asynchronous host messages (RESCIND, CLOSED) are taken whenever the driver
 * reads the management ring: the channel is marked (rescinded / closed_by_host)
 * and its calls fail with BUS_ERR_GONE; a rescinded channel's GPADL is torn
 * down and its relid released. An OFFER that comes later (the service offered
 * again) takes a rescinded channel's slot: bus_find / bus_wait_offer find it.
 */
#ifndef RT_BUS_H
#define RT_BUS_H

#include <stdint.h>

#include "pykvm_abi.h"
#include "ring.h"

#define BUS_MAX_CHANNELS 8
#define BUS_RING_PAGES 4            /* per direction, header page included */

#define BUS_ERR_IO (-10)            /* the host did not answer / a ring broke */
#define BUS_ERR_REFUSED (-11)       /* the host refused (status in bus_last_status) */
#define BUS_ERR_GONE (-12)          /* the channel was rescinded or closed by the host */
#define BUS_ERR_FULL (-13)          /* no room after waiting */

struct bus_channel {
    uint32_t relid;
    uint32_t version;               /* in force once open */
    uint64_t if_lo, if_hi, inst_lo, inst_hi;
    uint32_t nversions;
    uint32_t versions[PYKVM_BUS_MAX_SERVICE_VERSIONS];
    int open;
    int rescinded;
    int closed_by_host;
    uint32_t closed_reason;
    uint32_t offer_flags;           /* PYKVM_BUS_OFFER_FLAG_* */
    uint32_t gpadl;                 /* the rings' GPADL; kept until the host said it is torn down */
    uint32_t data_gpadl;            /* the data buffer's (bus_open_data), likewise */
    int tearing;                    /* its GPADLs are being torn down */
    struct rt_ring out;             /* guest -> host */
    struct rt_ring in;              /* host -> guest */
    uint8_t *ring_mem;              /* 2 * BUS_RING_PAGES pages */
    uint64_t xfer_gpa;              /* the channel's transfer page set (read-only), 0 if none */
    uint32_t xfer_pages;
};

extern uint32_t bus_version;         /* bus protocol version in force */
extern uint32_t bus_last_status;     /* status of the last refused request */
extern uint32_t bus_host_versions[PYKVM_BUS_MAX_VERSIONS];   /* on refusal: what the host speaks */
extern uint32_t bus_host_nversions;
extern int bus_nchannels;
extern struct bus_channel bus_channels[BUS_MAX_CHANNELS];
extern uint64_t bus_doorbells;       /* doorbells rung (for benchmarks) */

/* Use the bus interrupt to wait (installs the handler, enables interrupts). */
void bus_use_irq(void);
/* Connect with the given bus versions (newest first); the number of offers, or < 0. */
int bus_connect(const uint32_t *versions, int n);
struct bus_channel *bus_find(uint64_t if_lo, uint64_t if_hi);
/* Open at the newest common version; 0, BUS_ERR_REFUSED (see bus_last_status /
 * ch->versions) or another error. */
int bus_open(struct bus_channel *ch, const uint32_t *versions, int n);
/* bus_open giving the channel a data buffer too (an offer flagged PYKVM_BUS_OFFER_FLAG_DATA_BUFFER):
 * `pages` pages from the page-aligned `buf` (at most 60), its own GPADL. */
int bus_open_data(struct bus_channel *ch, const uint32_t *versions, int n, void *buf, uint32_t pages);
/* Wait until the host tore down ch's GPADLs (after a close or a rescind): only then may
 * their pages (rings, data buffer) be used again. 0, or BUS_ERR_* when the host never said so. */
int bus_wait_torn(struct bus_channel *ch);
int bus_close(struct bus_channel *ch);
int bus_unload(void);
/* Whether the host still serves this guest (one trapped read): it disconnects a
 * guest that keeps breaking the protocol, and then answers nothing. */
int bus_connected(void);
/* Drop the connection (the host closes every channel and GPADL); bus_connect again after. */
void bus_disconnect(void);
/* Write one packet of `type` (in-band or completion) with these bytes, unchecked, to
 * the management ring: for guests that test the host's refusals. 0 or RING_*. */
int bus_mgmt_raw(uint16_t type, const void *payload, uint32_t len);
/* Wait for the management message of `type` whose first u32 is `id` and copy
 * `size` bytes of its body; others are handled as bus_poll() does. 0 or BUS_ERR_*. */
int bus_mgmt_wait(uint32_t type, uint32_t id, void *body, uint32_t size);

/* In-band send (waits for room, rings the doorbell when the ring says so). */
int bus_send(struct bus_channel *ch, const void *msg, uint32_t len, uint64_t trans_id);
int bus_send_packet(struct bus_channel *ch, uint16_t type, uint16_t flags, uint64_t trans_id,
                    const struct rt_gpa_buf *bufs, uint32_t nbufs, const void *msg, uint32_t len);
/* Next packet into buf (descriptor first): its length, 0 if none (bus_recv)
 * or, for bus_recv_wait, after `spins` polls without one; < 0 on errors. */
int bus_recv(struct bus_channel *ch, void *buf, uint32_t max);
int bus_recv_wait(struct bus_channel *ch, void *buf, uint32_t max, uint64_t spins);
/* Payload of a received packet (descriptor's offset8) and its length. */
const void *bus_payload(const void *pkt, uint32_t *len);
/* A transfer-page packet's data: copy its ranges (in order, up to max bytes)
 * from the channel's transfer page set into dst, then complete the packet's
 * transaction so the host can reuse the pages; the bytes copied, or < 0. */
int bus_take_xfer(struct bus_channel *ch, const void *pkt, void *dst, uint32_t max);
/* Wait up to about `ms` milliseconds (halted, bus interrupts enabled) for an offer
 * of the interface that is not rescinded: after a RESCIND the host may offer the
 * service again, under a new relid, when its provider is back (several partitions,
 * pykvm_abi.h "recovery"). The channel (to bus_open again), or 0 when none came or
 * the host disconnected this guest. */
struct bus_channel *bus_wait_offer(uint64_t if_lo, uint64_t if_hi, uint32_t ms);
/* Read pending management messages (rescinds, closes, new offers); returns how many. */
int bus_poll(void);
const char *bus_status_text(uint32_t status);
/* "1.1" for 0x10001 into buf (>= 12 bytes). */
const char *bus_version_text(uint32_t v, char *buf);

#endif
