/* Service side of direct channels; see direct.h. */
#include "rt.h"
#include "direct.h"

int direct_msg_read(const void *p, uint32_t len, struct pykvm_direct_msg *m)
{
    memset(m, 0, sizeof(*m));
    memcpy(m, p, len < sizeof(*m) ? len : sizeof(*m));
    return direct_msg_check(m, len);
}

int direct_attach(struct direct_channel *c, const struct pykvm_direct_msg *m)
{
    uint8_t *base = (uint8_t *)(uintptr_t)m->gpa;
    memset(c, 0, sizeof(*c));
    if (ring_attach(&c->in, base, m->inbound_offset * PYKVM_BUS_PAGE_SIZE) ||
        ring_attach(&c->out, base + m->inbound_offset * PYKVM_BUS_PAGE_SIZE,
                    (m->ring_pages - m->inbound_offset) * PYKVM_BUS_PAGE_SIZE))
        return DIRECT_ERR_RING;
    c->id = m->id;
    c->doorbell = m->doorbell;
    c->version = m->version;
    c->rules = m->rules;
    c->max_message = m->max_message;
    c->data = m->data_pages ? (uint8_t *)(uintptr_t)m->data_gpa : 0;
    c->data_bytes = m->data_pages * PYKVM_BUS_PAGE_SIZE;
    c->max_transfer = m->max_transfer;
    c->open = 1;
    return DIRECT_OK;
}

void direct_close(struct direct_channel *c)
{
    c->open = 0;                   /* never touch its pages again: they may be gone */
}

int direct_recv(struct direct_channel *c, void *pkt, uint32_t max)
{
    if (!c->open)
        return DIRECT_ERR_RING;
    int n = ring_read(&c->in, pkt, max);
    if (n == 0)
        return 0;
    if (n < 0) {
        direct_close(c);
        return DIRECT_ERR_RING;
    }
    /* pkt is our copy: what we check is what we use */
    const struct pykvm_vmpacket *d = pkt;
    if ((uint32_t)n - d->offset8 * 8u > c->max_message) {
        direct_close(c);
        return DIRECT_ERR_BIG;
    }
    c->packets_in++;
    if (ring_read_done(&c->in)) {
        c->signals++;
        bus_doorbell(c->doorbell);
    }
    return n;
}

int direct_send(struct direct_channel *c, uint16_t type, uint64_t trans_id, const void *payload, uint32_t len)
{
    if (!c->open)
        return DIRECT_ERR_RING;
    int r = ring_write(&c->out, type, 0, trans_id, payload, len);
    if (r == RING_FULL)
        return RING_FULL;
    if (r < 0) {
        direct_close(c);
        return DIRECT_ERR_RING;
    }
    c->packets_out++;
    if (r == RING_SIGNAL) {
        c->signals++;
        bus_doorbell(c->doorbell);
    }
    return 0;
}
