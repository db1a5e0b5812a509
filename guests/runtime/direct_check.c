/* The parser of direct-channel messages: no runtime dependencies (built on the host by tests too). */
#include "direct.h"

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
    return DIRECT_OK;
}
