/* The parsers of direct-channel messages and block requests: no runtime dependencies
 * (built on the host by tests too, tests/direct_harness.c). */
#include "direct.h"

static void copy(void *d, const void *s, uint32_t n)
{
    uint8_t *dd = d;
    const uint8_t *ss = s;
    while (n--)
        *dd++ = *ss++;
}

int direct_msg_check(const struct pykvm_direct_msg *m, uint32_t len)
{
    if (len < sizeof(*m))
        return DIRECT_ERR_SHORT;
    if (m->op != PYKVM_DIRECT_OPEN && m->op != PYKVM_DIRECT_CLOSE)
        return DIRECT_ERR_OP;
    if (m->id >= PYKVM_DIRECT_MAX)
        return DIRECT_ERR_ID;
    if (m->op == PYKVM_DIRECT_CLOSE)
        return DIRECT_OK;
    if (m->gpa != PYKVM_DIRECT_GPA + (uint64_t)m->id * PYKVM_DIRECT_STRIDE ||
        m->doorbell != PYKVM_DIRECT_DOORBELL_BASE + m->id)
        return DIRECT_ERR_WHERE;
    if (m->ring_pages < 4 || m->ring_pages > PYKVM_DIRECT_MAX_PAGES ||
        m->inbound_offset < 2 || m->inbound_offset > m->ring_pages - 2)
        return DIRECT_ERR_PAGES;
    if (m->rules & ~(uint32_t)PYKVM_DIRECT_RULE_READ_ONLY || m->max_message < 8 || m->max_message > (1u << 20))
        return DIRECT_ERR_RULES;
    if (m->data_pages ? m->data_pages > PYKVM_DIRECT_DATA_MAX_PAGES || m->data_gpa != m->gpa + PYKVM_DIRECT_DATA_OFFSET
                      : m->data_gpa != 0)
        return DIRECT_ERR_DATA;
    if (m->max_transfer % PYKVM_BLK_SECTOR || m->max_transfer > PYKVM_BLK_MAX_SECTORS * PYKVM_BLK_SECTOR)
        return DIRECT_ERR_DATA;
    return DIRECT_OK;
}

int direct_blk_check(const void *payload, uint32_t len, uint32_t data_bytes, uint32_t max_transfer,
                     uint32_t rules, uint64_t sectors, struct direct_blk *out)
{
    struct pykvm_blk_request rq;
    struct pykvm_blk_buffer b = { 0, 0 };
    if (len < sizeof(rq))
        return DIRECT_BLK_BROKEN;
    copy(&rq, payload, sizeof(rq));      /* a copy of a copy: fields are read once, here */
    out->op = rq.op;
    out->sector = rq.sector;
    out->count = out->offset = out->length = 0;
    if (rq.op == PYKVM_BLK_OP_INFO || rq.op == PYKVM_BLK_OP_FLUSH)
        return PYKVM_BUS_OK;
    if (rq.op != PYKVM_BLK_OP_READ && rq.op != PYKVM_BLK_OP_WRITE)
        return PYKVM_BUS_E_INVALID;
    if (len < sizeof(rq) + sizeof(b))
        return DIRECT_BLK_BROKEN;
    copy(&b, (const uint8_t *)payload + sizeof(rq), sizeof(b));
    if (rq.count < 1 || rq.count > PYKVM_BLK_MAX_SECTORS)
        return PYKVM_BUS_E_INVALID;
    if (rq.op == PYKVM_BLK_OP_WRITE && (rules & PYKVM_DIRECT_RULE_READ_ONLY))
        return PYKVM_BUS_E_READ_ONLY;
    if (rq.count * PYKVM_BLK_SECTOR > max_transfer)
        return PYKVM_BUS_E_LIMIT;
    if (b.length != rq.count * PYKVM_BLK_SECTOR || b.offset > data_bytes || b.length > data_bytes - b.offset)
        return PYKVM_BUS_E_INVALID;
    if (rq.sector >= sectors || rq.count > sectors - rq.sector)
        return PYKVM_BUS_E_INVALID;
    out->count = rq.count;
    out->offset = b.offset;
    out->length = b.length;
    return PYKVM_BUS_OK;
}
