/*
 * bus-hostile: a guest that attacks the host's side of the partition bus.
 *
 * Command line (all optional):
 *   seed=S     random seed (default 1)
 *   ops=N      hostile operations (default 1000)
 *   crash=1    open echo, echo 3 messages, then panic (for the crash-core test)
 *
 * It connects, opens the echo channel, then for N operations does random
 * things to the host: scribbles its ring headers (indices beyond the ring,
 * unaligned, pending_send_sz and interrupt_mask garbage), publishes
 * descriptors with offsets outside the packet, lengths that wrap, bad types
 * and flags, GPA-direct and transfer-page range lists that lie, changes packet
 * bytes after publishing them, sends management messages of unknown types,
 * wrong sizes, bogus GPADLs and wrong states, and floods doorbells. When the
 * host closes the channel (CLOSED) it reopens it with a fresh GPADL; when the
 * host disconnects it (too many violations) it connects again. At the end it
 * reopens echo cleanly and checks that 20 echoes come back intact.
 *
 * Serial output: "hostile: seed=S ops=N\n", then
 *   "hostile: done: R reopens, C reconnects, K closed by the host, M management messages\n"
 *   "hostile: clean echo ok\n"
 * and exit_code(0x2a) (status 85). Failures: 2 cannot connect, 3 cannot
 * reopen echo, 5 the clean echo failed.
 */
#include "rt.h"
#include "bus.h"

#define OK_CODE 0x2a
#define CLEAN_ECHOES 20
#define RESET_AFTER 256         /* ops on one channel before the guest starts it afresh */
#define PAGE 4096

static const uint32_t bus_versions[1] = { PYKVM_BUS_VERSION_1_0 };
static const uint32_t echo_versions[2] = { PYKVM_ECHO_V1_1, PYKVM_ECHO_V1_0 };
static struct bus_channel *echo;
static uint64_t rs;
static uint32_t reopens, reconnects, closed_seen, mgmt_sent, channel_ops;

static uint8_t buf[640] __attribute__((aligned(8)));
static uint8_t pkt[4200] __attribute__((aligned(8)));
static uint8_t rings[2][2 * BUS_RING_PAGES * PAGE] __attribute__((aligned(PAGE)));   /* used in turn */

static uint64_t rnd(void)
{
    rs ^= rs >> 12;
    rs ^= rs << 25;
    rs ^= rs >> 27;
    return rs * 0x2545F4914F6CDD1Dull;
}

static uint32_t pick(uint32_t n)
{
    return (uint32_t)((rnd() >> 32) % n);
}

/* ---------------------------------------------------------------- keeping a channel */
static void reconnect(void)
{
    for (int attempt = 0; attempt < 8; attempt++) {
        bus_disconnect();
        if (bus_connect(bus_versions, 1) > 0 && (echo = bus_find(PYKVM_BUS_IF_ECHO_LO, PYKVM_BUS_IF_ECHO_HI))) {
            reconnects++;
            channel_ops = 0;
            return;
        }
    }
    printf("hostile: cannot connect\n");
    exit_code(2);
}

static void send_msg(uint32_t type, const void *body, uint32_t size)
{
    struct pykvm_bus_msg *m = (struct pykvm_bus_msg *)buf;
    m->type = type;
    m->size = size;
    memcpy(m + 1, body, size);
    bus_mgmt_raw(PYKVM_VMPKT_DATA_INBAND, buf, sizeof(*m) + size);
}

static void ring_fresh(struct rt_ring *r, uint8_t *base)
{
    volatile struct pykvm_ring_header *h = (volatile struct pykvm_ring_header *)base;
    h->write_index = h->read_index = h->interrupt_mask = h->pending_send_sz = 0;
    h->feature_bits = PYKVM_RING_FEAT_PENDING_SEND_SZ;   /* only the fields: guest memory writes are slow */
    ring_attach(r, base, BUS_RING_PAGES * PAGE);
}

/* Echo again on fresh rings in one round trip: tear down the old ring GPADL (which closes
 * the channel if the host has not yet), build a new one on the other ring area, open. */
static int reopen_once(void)
{
    static uint32_t next_gpadl = 0x40000000;
    static int which;
    uint8_t *mem = rings[which ^= 1];
    struct pykvm_bus_gpadl_header gh;
    memset(&gh, 0, 16);
    gh.gpadl = next_gpadl++;
    gh.total = gh.count = 2 * BUS_RING_PAGES;
    for (uint32_t i = 0; i < gh.total; i++)
        gh.pfns[i] = va_to_pa(mem + i * PAGE) >> 12;
    ring_fresh(&echo->out, mem);
    ring_fresh(&echo->in, mem + BUS_RING_PAGES * PAGE);
    if (echo->gpadl) {
        struct pykvm_bus_gpadl_result t = { echo->gpadl, 0 };
        send_msg(PYKVM_BUS_MSG_GPADL_TEARDOWN, &t, sizeof(t));
    }
    echo->open = 0;
    echo->gpadl = 0;
    send_msg(PYKVM_BUS_MSG_GPADL_HEADER, &gh, sizeof(gh));
    struct pykvm_bus_open op = { .relid = echo->relid, .ring_gpadl = gh.gpadl, .inbound_offset = BUS_RING_PAGES,
                                 .version_count = 2, .versions = { echo_versions[0], echo_versions[1] } };
    send_msg(PYKVM_BUS_MSG_OPEN, &op, sizeof(op));
    struct pykvm_bus_gpadl_result gr;
    struct pykvm_bus_open_result res;
    if (bus_mgmt_wait(PYKVM_BUS_MSG_GPADL_CREATED, gh.gpadl, &gr, sizeof(gr)) || gr.status != PYKVM_BUS_OK)
        return -1;
    echo->gpadl = gh.gpadl;
    if (bus_mgmt_wait(PYKVM_BUS_MSG_OPEN_RESULT, echo->relid, &res, sizeof(res)) || res.status != PYKVM_BUS_OK)
        return -1;
    echo->version = res.version;
    echo->closed_by_host = 0;
    echo->open = 1;
    ring_mask(&echo->in);           /* we poll: no interrupt per reply */
    return 0;
}

static void reopen(void)
{
    for (int attempt = 0; attempt < 8; attempt++) {
        if (!bus_connected())
            reconnect();
        if (!reopen_once()) {
            reopens++;
            channel_ops = 0;
            return;
        }
        reconnect();    /* gone, or refused (our bogus GPADLs used up the host's limit) */
    }
    printf("hostile: cannot reopen echo\n");
    exit_code(3);
}

static void ensure_open(uint32_t op)
{
    if ((op & 63) == 63 && !bus_connected())
        reconnect();
    bus_poll();
    if (echo->closed_by_host) {
        closed_seen++;
        echo->closed_by_host = 0;
    }
    if (!echo->open || ++channel_ops > RESET_AFTER)
        reopen();
}

/* ---------------------------------------------------------------- raw ring writes */
static uint32_t wild_index(uint32_t size)
{
    switch (pick(6)) {
    case 0: return size;                            /* just past the end */
    case 1: return size + 8 * pick(100000);         /* far beyond */
    case 2: return 0xfffffff8u;                     /* wraps */
    case 3: return (pick(size) & ~7u) | (1 + pick(7));   /* unaligned */
    case 4: return pick(size) & ~7u;                /* valid, but a lie */
    default: return (uint32_t)rnd();
    }
}

static void put(struct rt_ring *r, uint32_t pos, const void *src, uint32_t n)
{
    const uint8_t *s = src;
    pos %= r->size;
    uint32_t first = r->size - pos;
    if (n <= first) {
        memcpy((void *)(r->data + pos), s, n);
    } else {
        memcpy((void *)(r->data + pos), s, first);
        memcpy((void *)r->data, s + first, n - first);
    }
}

/* Write `n` bytes as a packet at the current write index and publish `publish` bytes. */
static void publish_raw(const void *bytes, uint32_t n, uint32_t publish)
{
    struct rt_ring *r = &echo->out;
    uint32_t wr = r->hdr->write_index % r->size & ~7u;
    put(r, wr, bytes, n);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->hdr->write_index = (wr + publish) % r->size;
    bus_doorbell(echo->relid);
}

static void fill_random(uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, n - i < 8 ? n - i : 8);
    }
}

/* A descriptor that lies: lengths that wrap or exceed what was published, offsets outside the packet, bad types. */
static void bad_descriptor(void)
{
    struct pykvm_vmpacket *d = (struct pykvm_vmpacket *)buf;
    uint32_t len8 = 2 + pick(8);
    fill_random(buf, 8 * len8 + 8);
    d->type = PYKVM_VMPKT_DATA_INBAND;
    d->offset8 = 2;
    d->len8 = (uint16_t)len8;
    d->flags = 0;
    switch (pick(8)) {
    case 0: d->len8 = 0xffff; break;
    case 1: d->len8 = (uint16_t)pick(2); break;
    case 2: d->offset8 = (uint16_t)(len8 + 1 + pick(100)); break;
    case 3: d->offset8 = (uint16_t)pick(2); break;
    case 4: d->type = (uint16_t)rnd(); break;
    case 5: d->flags = (uint16_t)(2 + pick(0xfffe)); break;
    case 6: d->len8 = (uint16_t)(len8 + 1 + pick(3)); break;   /* more than published */
    default: fill_random(buf, 16); break;
    }
    publish_raw(buf, 8 * len8 + 8, 8 * len8 + 8);
}

/* GPA-direct or transfer-page range lists that do not add up, name pages outside RAM, or are huge. */
static void bad_ranges(int xfer)
{
    static const uint64_t pfns[] = { 1ull << 40, ~0ull, 0xfee00, 0x8000000, 0x7fff, 0 };
    struct pykvm_vmpacket *d = (struct pykvm_vmpacket *)buf;
    uint32_t *w = (uint32_t *)(buf + 16);
    uint32_t nwords = 2 + 2 * pick(6);
    for (uint32_t i = 0; i < nwords; i++)
        w[i] = (uint32_t)rnd();
    static const uint32_t counts[] = { 0, 1, 2, 65, 0xffffffffu, 3 };
    w[1] = counts[pick(6)];
    if (!xfer && nwords >= 6) {
        w[2] = pick(2) ? 4096 : 1 + pick(8192);      /* byte_count */
        w[3] = pick(2) ? pick(4097) : (uint32_t)rnd(); /* byte_offset */
        uint64_t p = pfns[pick(6)];
        memcpy(&w[4], &p, 8);
    }
    uint32_t len8 = 2 + nwords / 2 + pick(3);
    d->type = xfer ? PYKVM_VMPKT_DATA_XFER_PAGES : PYKVM_VMPKT_DATA_GPA_DIRECT;
    d->offset8 = (uint16_t)(2 + nwords / 2 - pick(2));
    d->len8 = (uint16_t)len8;
    d->flags = 0;
    d->trans_id = rnd();
    publish_raw(buf, 8 * len8 + 8, 8 * len8 + 8);
}

static int send_echo(uint32_t len, uint64_t tid)
{
    struct pykvm_echo_msg *h = (struct pykvm_echo_msg *)buf;
    h->op = PYKVM_ECHO_OP_ECHO;
    h->len = len;
    fill_random(buf + sizeof(*h), len);
    int r = ring_write_inband(&echo->out, tid, pick(4) ? 0 : PYKVM_VMPKT_FLAG_COMPLETION_REQ, buf, sizeof(*h) + len);
    if (r == RING_SIGNAL || (r == RING_OK && !pick(16)))
        bus_doorbell(echo->relid);
    return r;
}

/* ---------------------------------------------------------------- management messages that break the rules */
static void bad_management(void)
{
    struct pykvm_bus_msg *m = (struct pykvm_bus_msg *)buf;
    uint32_t *body = (uint32_t *)(m + 1);
    uint32_t size = 0;
    memset(buf, 0, sizeof(buf));
    switch (pick(10)) {
    case 0:     /* unknown types, and host->guest types */
        m->type = pick(2) ? 19 + pick(1000) : (uint32_t[]){ 0, 2, 4, 5, 9, 13, 17, 18 }[pick(8)];
        size = 8 * pick(8);
        break;
    case 1:     /* a known type whose size field lies */
        m->type = 1 + pick(16);
        size = 8 * pick(8);
        m->size = pick(2) ? (uint32_t)rnd() : size + 8;
        fill_random((uint8_t *)body, size);
        mgmt_sent++;
        bus_mgmt_raw(PYKVM_VMPKT_DATA_INBAND, buf, sizeof(*m) + size);
        return;
    case 2: {   /* GPADL headers: pages outside RAM, in the hole, repeated, too many, counts over totals */
        struct pykvm_bus_gpadl_header *g = (void *)body;
        static const uint32_t totals[] = { 0, 1, 3, 61, 4097, 0xffffffffu };
        m->type = PYKVM_BUS_MSG_GPADL_HEADER;
        size = sizeof(*g);
        g->gpadl = 0x80000000u | (uint32_t)rnd();
        g->total = totals[pick(6)];
        g->count = pick(4) ? (g->total < 4 ? g->total : 4) : 61 + pick(100);
        static const uint64_t bad[] = { 1ull << 40, ~0ull, 0xfee00, 0xc0000, 0x8000, 0x100000 };
        for (uint32_t i = 0; i < 4; i++)
            g->pfns[i] = pick(3) ? bad[pick(6)] : 0x100 + pick(4);   /* else low RAM, maybe repeated */
        break;
    }
    case 3: {   /* a body for a GPADL nobody is building, or with too many pfns */
        struct pykvm_bus_gpadl_body *g = (void *)body;
        m->type = PYKVM_BUS_MSG_GPADL_BODY;
        size = sizeof(*g);
        g->gpadl = pick(2) ? echo->gpadl : (uint32_t)rnd();
        g->count = pick(2) ? 61 + pick(1000) : 1;
        g->pfns[0] = 1ull << 40;
        break;
    }
    case 4: {   /* teardowns: unknown, or the GPADL under the open channel */
        struct pykvm_bus_gpadl_result *t = (void *)body;
        m->type = PYKVM_BUS_MSG_GPADL_TEARDOWN;
        size = sizeof(*t);
        t->gpadl = pick(4) ? 0x80000000u | (uint32_t)rnd() : echo->gpadl;
        break;
    }
    case 5: {   /* opens: unknown channels, the open echo again, bogus GPADLs, bad ring offsets */
        struct pykvm_bus_open *o = (void *)body;
        m->type = PYKVM_BUS_MSG_OPEN;
        size = sizeof(*o);
        o->relid = pick(2) ? echo->relid : (uint32_t)rnd();
        o->ring_gpadl = pick(2) ? echo->gpadl : (uint32_t)rnd();
        o->inbound_offset = pick(10);
        o->target_vcpu = pick(2) ? 0 : pick(2) ? pick(256) : (uint32_t)rnd();
        o->version_count = pick(6);
        o->versions[0] = pick(2) ? PYKVM_ECHO_V1_0 : (uint32_t)rnd();
        break;
    }
    case 6: {   /* close of channels that are not open, release of ones never rescinded */
        struct pykvm_bus_relid_msg *c = (void *)body;
        m->type = pick(2) ? PYKVM_BUS_MSG_CLOSE : PYKVM_BUS_MSG_RELID_RELEASED;
        size = sizeof(*c);
        c->relid = pick(2) ? 2 + pick(3) : (uint32_t)rnd();
        break;
    }
    case 7: {   /* contact again, with garbage */
        struct pykvm_bus_initiate *ic = (void *)body;
        m->type = PYKVM_BUS_MSG_INITIATE_CONTACT;
        size = sizeof(*ic);
        ic->count = pick(10);
        ic->target_vcpu = pick(2) ? 0 : pick(2) ? pick(256) : (uint32_t)rnd();
        ic->versions[0] = (uint32_t)rnd();
        break;
    }
    case 8:     /* a management packet that is not in-band */
        m->type = PYKVM_BUS_MSG_REQUEST_OFFERS;
        mgmt_sent++;
        bus_mgmt_raw(PYKVM_VMPKT_COMP, buf, sizeof(*m));
        return;
    default:    /* bytes */
        size = 8 * pick(16);
        fill_random(buf, sizeof(*m) + size);
        mgmt_sent++;
        bus_mgmt_raw(PYKVM_VMPKT_DATA_INBAND, buf, sizeof(*m) + size);
        return;
    }
    m->size = size;
    mgmt_sent++;
    bus_mgmt_raw(PYKVM_VMPKT_DATA_INBAND, buf, sizeof(*m) + size);
}

/* ---------------------------------------------------------------- one hostile operation */
static void hostile_op(void)
{
    struct rt_ring *out = &echo->out, *in = &echo->in;
    uint32_t k = pick(64);
    if (k < 16) {                                       /* plain echo traffic keeps the host reading */
        if (send_echo(pick(65), rnd()) < 0)
            channel_ops = RESET_AFTER;                  /* our own header is garbage: start afresh */
    } else if (k < 22) {                                /* change a packet after publishing it */
        uint32_t wr = out->hdr->write_index;
        if (send_echo(8 + pick(32), rnd()) >= 0) {
            uint64_t v = rnd();
            put(out, (wr & ~7u) + 8 * pick(4), &v, 8);
        }
    } else if (k < 28) {                                /* our outbound ring header */
        switch (pick(5)) {
        case 0: out->hdr->write_index = wild_index(out->size); break;
        case 1: out->hdr->read_index = wild_index(out->size); break;
        case 2: out->hdr->pending_send_sz = (uint32_t)rnd(); break;
        case 3: out->hdr->interrupt_mask = (uint32_t)rnd(); break;
        default: out->hdr->feature_bits = (uint32_t)rnd(); break;
        }
        bus_doorbell(echo->relid);
    } else if (k < 32) {                                /* our inbound ring header, then make the host write */
        switch (pick(4)) {
        case 0: in->hdr->read_index = wild_index(in->size); break;
        case 1: in->hdr->write_index = wild_index(in->size); break;
        case 2: in->hdr->pending_send_sz = (uint32_t)rnd(); break;
        default: in->hdr->interrupt_mask = (uint32_t)rnd(); break;
        }
        send_echo(pick(65), rnd());
        bus_doorbell(echo->relid);
    } else if (k < 40) {
        bad_descriptor();
    } else if (k < 44) {
        bad_ranges(0);
    } else if (k < 46) {
        bad_ranges(1);
    } else if (k < 50) {                                /* junk in the data area */
        uint64_t v = rnd();
        put(out, pick(out->size) & ~7u, &v, 8);
        bus_doorbell(echo->relid);
    } else if (k < 56) {                                /* doorbell floods, now and then of channels nobody has */
        for (uint32_t i = pick(12); i; i--)
            bus_doorbell(echo->relid);
        bus_doorbell(PYKVM_BUS_MGMT_RELID);
        if (!pick(16))
            bus_doorbell(100 + pick(1000));
    } else if (k < 62) {                                /* take replies; a broken inbound ring means start afresh */
        for (int i = 0; i < 4; i++) {
            int n = bus_recv(echo, pkt, sizeof(pkt));
            if (n < 0)
                channel_ops = RESET_AFTER;
            if (n <= 0)
                break;
        }
    } else if (k == 62) {
        bad_management();
    } else {
        send_echo(0, 0);
    }
}

/* ---------------------------------------------------------------- the checks */
static int clean_echo(uint32_t n)
{
    for (uint32_t seq = 1; seq <= n; seq++) {
        struct pykvm_echo_msg *h = (struct pykvm_echo_msg *)buf;
        uint32_t len = 8 + seq * 3;
        h->op = PYKVM_ECHO_OP_ECHO;
        h->len = len;
        for (uint32_t i = 0; i < len; i++)
            buf[sizeof(*h) + i] = (uint8_t)(seq * 7 + i);
        if (bus_send(echo, buf, sizeof(*h) + len, seq))
            return -1;
        int got = bus_recv_wait(echo, pkt, sizeof(pkt), 20000000ull);
        const struct pykvm_vmpacket *d = (const void *)pkt;
        uint32_t plen;
        const uint8_t *p = bus_payload(pkt, &plen);
        if (got <= 0 || d->trans_id != seq || plen < sizeof(*h) + len || memcmp(p, buf, sizeof(*h) + len))
            return -1;
    }
    return 0;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t seed = arg_u64(cmd, "seed", 1);
    uint32_t ops = (uint32_t)arg_u64(cmd, "ops", 1000);
    rs = seed * 0x9E3779B97F4A7C15ull + 1;
    printf("hostile: seed=%llu ops=%u\n", (unsigned long long)seed, ops);
    reconnect();
    reopen();

    if (arg_u64(cmd, "crash", 0)) {
        if (clean_echo(3))
            exit_code(5);
        panic("bus-hostile: crash requested with echo open");
    }

    for (uint32_t op = 0; op < ops; op++) {
        ensure_open(op);
        hostile_op();
    }

    channel_ops = RESET_AFTER;      /* a clean channel on the same connection, if the host still serves us */
    ensure_open(63);
    int ok = clean_echo(CLEAN_ECHOES) == 0;
    printf("hostile: done: %u reopens, %u reconnects, %u closed by the host, %u management messages\n",
           reopens, reconnects, closed_seen, mgmt_sent);
    printf("hostile: clean echo %s\n", ok ? "ok" : "FAILED");
    exit_code(ok ? OK_CODE : 5);
}
