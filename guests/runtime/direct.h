/*
 * Service side of direct channels (pykvm_abi.h "provider v1.2"): a client
 * partition's rings mapped into this guest, read and written here with no host
 * code per message. The client can change its ring pages at any moment, so
 * every packet is copied out before it is checked (ring_read), indices are
 * read once per step, and a ring that breaks closes that channel alone.
 *
 * direct_msg_check() is the parser of the root's open/close messages; it has
 * no dependencies beyond the ABI header, so tests build it on the host
 * (tests/direct_harness.c) and cross-check it against a Python mirror.
 */
#ifndef RT_DIRECT_H
#define RT_DIRECT_H
#include <stdint.h>
#include "pykvm_abi.h"
#include "ring.h"

#define DIRECT_OK 0
#define DIRECT_ERR_SHORT (-1)      /* message shorter than struct pykvm_direct_msg */
#define DIRECT_ERR_OP (-2)         /* unknown op */
#define DIRECT_ERR_ID (-3)         /* id out of range */
#define DIRECT_ERR_WHERE (-4)      /* gpa or doorbell not the ones of that id */
#define DIRECT_ERR_PAGES (-5)      /* ring_pages / inbound_offset out of range */
#define DIRECT_ERR_RULES (-6)      /* unknown rule bits or max_message out of range */
#define DIRECT_ERR_RING (-7)       /* the ring is broken (channel closed) */
#define DIRECT_ERR_BIG (-8)        /* a packet over max_message (channel closed) */
#define DIRECT_ERR_DATA (-9)       /* data_gpa / data_pages / max_transfer out of range */
#define DIRECT_BLK_BROKEN (-1)     /* direct_blk_check: not a block request at all (close the channel) */

struct direct_channel {
    int open;
    uint32_t id, doorbell, version, rules, max_message;
    uint8_t *data;                 /* the client's data buffer mapped here, or 0 */
    uint32_t data_bytes, max_transfer;
    struct rt_ring in;             /* client -> service: read here */
    struct rt_ring out;            /* service -> client: written here */
    uint64_t packets_in, packets_out, signals;
};

/* Check a message copied out of the provider ring (len bytes at m): DIRECT_OK or DIRECT_ERR_*. */
int direct_msg_check(const struct pykvm_direct_msg *m, uint32_t len);

/* A block request over a direct channel, checked (pykvm_abi.h "block over a direct channel"). */
struct direct_blk {
    uint32_t op;
    uint64_t sector;
    uint32_t count;                /* READ / WRITE only */
    uint32_t offset, length;       /* bytes of the data buffer: offset + length <= data_bytes */
};
/* Check the payload of a block request (len bytes, already copied out of the ring)
 * against the channel's rules and a disk of `sectors` sectors: PYKVM_BUS_OK with *out
 * filled, the PYKVM_BUS_E_* status to answer (E_INVALID, E_READ_ONLY, E_LIMIT), or
 * DIRECT_BLK_BROKEN for a payload too short to be a request (close the channel). */
int direct_blk_check(const void *payload, uint32_t len, uint32_t data_bytes, uint32_t max_transfer,
                     uint32_t rules, uint64_t sectors, struct direct_blk *out);
/* Copy a message of len bytes at p (the provider ring's packet) into *m, zero-filled, and
 * check it: direct_msg_check()'s result. */
int direct_msg_read(const void *p, uint32_t len, struct pykvm_direct_msg *m);
/* Attach the rings a checked PYKVM_DIRECT_OPEN names: DIRECT_OK or DIRECT_ERR_RING. */
int direct_attach(struct direct_channel *c, const struct pykvm_direct_msg *m);
/* Next packet (copied into pkt, descriptor first): its length, 0 if none, or < 0:
 * the channel broke and is closed (DIRECT_ERR_RING, DIRECT_ERR_BIG). */
int direct_recv(struct direct_channel *c, void *pkt, uint32_t max);
/* Write one packet and signal the client when the ring says so: 0, RING_FULL, or
 * DIRECT_ERR_RING (closed). */
int direct_send(struct direct_channel *c, uint16_t type, uint64_t trans_id, const void *payload, uint32_t len);
void direct_close(struct direct_channel *c);
#endif
