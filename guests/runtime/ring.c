/* Guest side of the partition bus rings; see ring.h and BUS.md. */
#include "ring.h"

void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);

_Static_assert(sizeof(struct pykvm_ring_header) == PYKVM_RING_HEADER_SIZE, "ring header is one page");
_Static_assert(sizeof(struct pykvm_vmpacket) == 16, "packet descriptor is 16 bytes");

/* x86 is TSO: only store->load needs a real fence; the others stop the compiler. */
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline uint32_t ld32(volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st32(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

int ring_attach(struct rt_ring *r, void *base, uint32_t bytes)
{
    if (bytes < 2 * PYKVM_BUS_PAGE_SIZE || bytes % PYKVM_BUS_PAGE_SIZE)
        return RING_EINVAL;
    r->hdr = base;
    r->data = (volatile uint8_t *)base + PYKVM_RING_HEADER_SIZE;
    r->size = bytes - PYKVM_RING_HEADER_SIZE;
    r->read = ld32(&r->hdr->read_index);
    if (r->read >= r->size || r->read % PYKVM_RING_ALIGN)
        return RING_EINVAL;
    return 0;
}

int ring_init(struct rt_ring *r, void *base, uint32_t bytes)
{
    if (bytes < 2 * PYKVM_BUS_PAGE_SIZE || bytes % PYKVM_BUS_PAGE_SIZE)
        return RING_EINVAL;
    memset(base, 0, PYKVM_RING_HEADER_SIZE);
    ((struct pykvm_ring_header *)base)->feature_bits = PYKVM_RING_FEAT_PENDING_SEND_SZ;
    return ring_attach(r, base, bytes);
}

/* Bytes used from read index rd to write index wr. */
static inline uint32_t used(const struct rt_ring *r, uint32_t wr, uint32_t rd)
{
    return wr >= rd ? wr - rd : r->size - rd + wr;
}

static inline int bad_index(const struct rt_ring *r, uint32_t i)
{
    return i >= r->size || i % PYKVM_RING_ALIGN;
}

/* Copy n bytes to the data area at *pos (wrapping) and advance *pos. */
static void put(struct rt_ring *r, uint32_t *pos, const void *src, uint32_t n)
{
    uint32_t first = r->size - *pos;
    if (n <= first) {
        memcpy((void *)(r->data + *pos), src, n);
        *pos += n;
        if (*pos == r->size)
            *pos = 0;
    } else {
        memcpy((void *)(r->data + *pos), src, first);
        memcpy((void *)r->data, (const uint8_t *)src + first, n - first);
        *pos = n - first;
    }
}

/* Copy n bytes from the data area at pos (wrapping) into dst. */
static void get(const struct rt_ring *r, uint32_t pos, void *dst, uint32_t n)
{
    uint32_t first = r->size - pos;
    if (n <= first) {
        memcpy(dst, (const void *)(r->data + pos), n);
    } else {
        memcpy(dst, (const void *)(r->data + pos), first);
        memcpy((uint8_t *)dst + first, (const void *)r->data, n - first);
    }
}

uint32_t ring_packet_bytes(uint32_t range_bytes, uint32_t len)
{
    return sizeof(struct pykvm_vmpacket) + range_bytes + ((len + 7) & ~7u) + PYKVM_RING_TRAILER_SIZE;
}

static uint32_t range_pages(const struct rt_gpa_buf *b)
{
    return (uint32_t)(((b->addr & (PYKVM_BUS_PAGE_SIZE - 1)) + b->len + PYKVM_BUS_PAGE_SIZE - 1) / PYKVM_BUS_PAGE_SIZE);
}

/* Reserve need bytes: the current write index, or RING_FULL / RING_EINVAL. */
static int64_t reserve(struct rt_ring *r, uint32_t need)
{
    uint32_t wr = ld32(&r->hdr->write_index);
    uint32_t rd = ld32(&r->hdr->read_index);
    if (bad_index(r, wr) || bad_index(r, rd))
        return RING_EINVAL;
    /* keep 8 bytes free so that a full ring never looks empty */
    if (r->size - used(r, wr, rd) < need + PYKVM_RING_ALIGN) {
        st32(&r->hdr->pending_send_sz, need + PYKVM_RING_ALIGN);
        mb();   /* the reader frees space, then reads pending_send_sz: look again */
        rd = ld32(&r->hdr->read_index);
        if (bad_index(r, rd))
            return RING_EINVAL;
        if (r->size - used(r, wr, rd) < need + PYKVM_RING_ALIGN)
            return RING_FULL;
    }
    return wr;
}

/* Publish the packet written from wr to pos; the signalling rule. */
static int publish(struct rt_ring *r, uint32_t wr, uint32_t pos)
{
    uint64_t trailer = (uint64_t)wr << 32;
    put(r, &pos, &trailer, sizeof(trailer));
    wmb();      /* the packet before the index */
    st32(&r->hdr->write_index, pos);
    if (ld32(&r->hdr->pending_send_sz))
        st32(&r->hdr->pending_send_sz, 0);
    mb();       /* the index before reading the reader's state */
    if (ld32(&r->hdr->interrupt_mask))
        return RING_OK;
    return ld32(&r->hdr->read_index) == wr ? RING_SIGNAL : RING_OK;
}

static int write_packet(struct rt_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                        const struct rt_gpa_buf *bufs, uint32_t nbufs, const void *payload, uint32_t len)
{
    static const uint8_t zeros[8];
    uint32_t range_bytes = 0, i;
    if (flags & ~PYKVM_VMPKT_FLAG_COMPLETION_REQ || len > r->size)
        return RING_EINVAL;
    if (type == PYKVM_VMPKT_DATA_GPA_DIRECT) {
        if (!nbufs || nbufs > 64)
            return RING_EINVAL;
        range_bytes = sizeof(struct pykvm_gpa_direct_header);
        for (i = 0; i < nbufs; i++) {
            if (!bufs[i].len || range_pages(&bufs[i]) > 1024)
                return RING_EINVAL;
            range_bytes += sizeof(struct pykvm_gpa_range) + 8 * range_pages(&bufs[i]);
        }
    }
    uint32_t need = ring_packet_bytes(range_bytes, len);
    if (need - PYKVM_RING_TRAILER_SIZE > 0xffff * 8u || need + PYKVM_RING_ALIGN > r->size)
        return RING_EINVAL;
    int64_t got = reserve(r, need);
    if (got < 0)
        return (int)got;
    uint32_t wr = (uint32_t)got, pos = wr;
    struct pykvm_vmpacket d = {
        .type = type,
        .offset8 = (uint16_t)((sizeof(d) + range_bytes) / 8),
        .len8 = (uint16_t)((need - PYKVM_RING_TRAILER_SIZE) / 8),
        .flags = flags,
        .trans_id = trans_id,
    };
    put(r, &pos, &d, sizeof(d));
    if (range_bytes) {
        struct pykvm_gpa_direct_header h = { .reserved = 0, .range_count = nbufs };
        put(r, &pos, &h, sizeof(h));
        for (i = 0; i < nbufs; i++) {
            struct pykvm_gpa_range g = {
                .byte_count = bufs[i].len,
                .byte_offset = (uint32_t)(bufs[i].addr & (PYKVM_BUS_PAGE_SIZE - 1)),
            };
            uint64_t pfn = bufs[i].addr / PYKVM_BUS_PAGE_SIZE;
            uint32_t n = range_pages(&bufs[i]), k;
            put(r, &pos, &g, sizeof(g));
            for (k = 0; k < n; k++, pfn++)
                put(r, &pos, &pfn, sizeof(pfn));
        }
    }
    put(r, &pos, payload, len);
    put(r, &pos, zeros, (-len) & 7);
    return publish(r, wr, pos);
}

int ring_write(struct rt_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
               const void *payload, uint32_t len)
{
    if (type != PYKVM_VMPKT_DATA_INBAND && type != PYKVM_VMPKT_COMP)
        return RING_EINVAL;   /* packets with range lists have their own writers */
    return write_packet(r, type, flags, trans_id, 0, 0, payload, len);
}

int ring_write_inband(struct rt_ring *r, uint64_t trans_id, uint16_t flags, const void *payload, uint32_t len)
{
    return write_packet(r, PYKVM_VMPKT_DATA_INBAND, flags, trans_id, 0, 0, payload, len);
}

int ring_write_completion(struct rt_ring *r, uint64_t trans_id, const void *payload, uint32_t len)
{
    return write_packet(r, PYKVM_VMPKT_COMP, 0, trans_id, 0, 0, payload, len);
}

int ring_write_gpa_direct(struct rt_ring *r, uint64_t trans_id, uint16_t flags,
                          const struct rt_gpa_buf *bufs, uint32_t nbufs, const void *payload, uint32_t len)
{
    return write_packet(r, PYKVM_VMPKT_DATA_GPA_DIRECT, flags, trans_id, bufs, nbufs, payload, len);
}

int ring_read(struct rt_ring *r, void *pkt, uint32_t max)
{
    uint32_t wr = ld32(&r->hdr->write_index);
    if (bad_index(r, wr))
        return RING_EINVAL;
    rmb();      /* the index before the packet */
    uint32_t avail = used(r, wr, r->read);
    if (!avail)
        return RING_OK;
    struct pykvm_vmpacket d;
    if (avail < sizeof(d) + PYKVM_RING_TRAILER_SIZE)
        return RING_EINVAL;
    get(r, r->read, &d, sizeof(d));
    uint32_t total = (uint32_t)d.len8 * 8;
    if (total < sizeof(d) || total + PYKVM_RING_TRAILER_SIZE > avail || d.offset8 < 2 || d.offset8 > d.len8)
        return RING_EINVAL;
    if (total > max)
        return RING_TOOBIG;
    memcpy(pkt, &d, sizeof(d));
    get(r, (r->read + sizeof(d)) % r->size, (uint8_t *)pkt + sizeof(d), total - sizeof(d));
    r->read = (r->read + total + PYKVM_RING_TRAILER_SIZE) % r->size;
    return (int)total;
}

int ring_read_done(struct rt_ring *r)
{
    uint32_t old = ld32(&r->hdr->read_index);
    if (old == r->read)
        return 0;
    uint32_t wr = ld32(&r->hdr->write_index);
    st32(&r->hdr->read_index, r->read);   /* our loads of the packets are done (x86: loads before stores) */
    mb();       /* read_index before pending_send_sz */
    uint32_t pending = ld32(&r->hdr->pending_send_sz);
    if (!pending || bad_index(r, old) || bad_index(r, wr))
        return 0;
    uint32_t before = r->size - used(r, wr, old), now = r->size - used(r, wr, r->read);
    return before < pending && pending <= now;
}

int ring_empty(struct rt_ring *r)
{
    return ld32(&r->hdr->write_index) == r->read;
}

void ring_mask(struct rt_ring *r)
{
    st32(&r->hdr->interrupt_mask, 1);
}

int ring_unmask(struct rt_ring *r)
{
    st32(&r->hdr->interrupt_mask, 0);
    mb();       /* the mask before the index */
    return !ring_empty(r);
}
