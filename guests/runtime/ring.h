/*
 * Guest side of the partition bus rings (layout: "partition bus" in
 * pykvm_abi.h).  One struct rt_ring per direction: the guest writes the
 * guest->host ring and reads the host->guest ring.  Freestanding: needs only
 * memcpy/memset.  The functions that write return whether the other side
 * must be signalled (the caller rings the doorbell); the ring code itself
 * does no I/O.
 */
#ifndef RT_RING_H
#define RT_RING_H

#include <stddef.h>
#include <stdint.h>

#include "pykvm_abi.h"

/* Results (negative: nothing was written / read) */
#define RING_SIGNAL 1      /* written: signal the reader */
#define RING_OK 0          /* written: no signal needed; or ring_read: empty */
#define RING_FULL (-1)     /* no room: pending_send_sz now asks the reader to signal */
#define RING_EINVAL (-2)   /* bad arguments, or the other side broke the ring */
#define RING_TOOBIG (-3)   /* ring_read: the packet is larger than the buffer */

struct rt_ring {
    volatile struct pykvm_ring_header *hdr;
    volatile uint8_t *data;
    uint32_t size;         /* data area bytes */
    uint32_t read;         /* reader: consumed, not yet published by ring_read_done */
};

/* A physically contiguous buffer for a GPA direct packet. */
struct rt_gpa_buf {
    uint64_t addr;         /* guest-physical */
    uint32_t len;          /* > 0 */
};

/* Zero the header at base (one header page then data pages, bytes in all)
 * and advertise PYKVM_RING_FEAT_PENDING_SEND_SZ.  0, or RING_EINVAL if the
 * size is not 2 or more pages. */
int ring_init(struct rt_ring *r, void *base, uint32_t bytes);
/* Attach to a ring whose header is already set up (no zeroing). */
int ring_attach(struct rt_ring *r, void *base, uint32_t bytes);

/* Writers: RING_SIGNAL, RING_OK, RING_FULL or RING_EINVAL. */
int ring_write(struct rt_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
               const void *payload, uint32_t len);
int ring_write_inband(struct rt_ring *r, uint64_t trans_id, uint16_t flags,
                      const void *payload, uint32_t len);
int ring_write_completion(struct rt_ring *r, uint64_t trans_id, const void *payload, uint32_t len);
/* One range per buffer; the payload follows the range list. */
int ring_write_gpa_direct(struct rt_ring *r, uint64_t trans_id, uint16_t flags,
                          const struct rt_gpa_buf *bufs, uint32_t nbufs,
                          const void *payload, uint32_t len);
/* Bytes a packet with a `len`-byte payload (and range list) takes in the ring. */
uint32_t ring_packet_bytes(uint32_t range_bytes, uint32_t len);

/* Reader: copy the next whole packet (descriptor first; len8 * 8 bytes) into
 * pkt and consume it locally.  Returns the packet's length in bytes, RING_OK
 * (0) when empty, RING_TOOBIG (nothing consumed) or RING_EINVAL. */
int ring_read(struct rt_ring *r, void *pkt, uint32_t max);
/* Publish what ring_read consumed; 1 when a waiting writer must be signalled. */
int ring_read_done(struct rt_ring *r);
int ring_empty(struct rt_ring *r);
/* Interrupt mask of a ring this side reads: mask while polling; unmask
 * returns 1 when data arrived meanwhile (read on: no signal will come). */
void ring_mask(struct rt_ring *r);
int ring_unmask(struct rt_ring *r);

#endif
