/* Guest driver of the partition bus: see bus.h. */
#include "rt.h"
#include "bus.h"

#define PAGE 4096
#define MGMT_RING_BYTES ((1 + PYKVM_BUS_MGMT_DATA_PAGES) * PAGE)
#define SPIN_LIMIT 200000000ull

uint32_t bus_version;
uint32_t bus_last_status;
uint32_t bus_host_versions[PYKVM_BUS_MAX_VERSIONS];
uint32_t bus_host_nversions;
int bus_nchannels;
struct bus_channel bus_channels[BUS_MAX_CHANNELS];
uint64_t bus_doorbells;

static uint8_t mgmt_area[2 * MGMT_RING_BYTES] __attribute__((aligned(PAGE)));
static uint8_t ring_pool[BUS_MAX_CHANNELS][2 * BUS_RING_PAGES * PAGE] __attribute__((aligned(PAGE)));
static struct rt_ring mgmt_out, mgmt_in;
static int use_irq;
static uint32_t next_gpadl = 1;

/* one received management message: descriptor, then struct pykvm_bus_msg and its body */
static union {
    uint8_t raw[1024];
    uint64_t align;
} mgmt_pkt;


static void doorbell(uint32_t relid)
{
    bus_doorbells++;
    bus_doorbell(relid);
}

void bus_use_irq(void)
{
    bus_irq_init(0);
    use_irq = 1;
}

const void *bus_payload(const void *pkt, uint32_t *len)
{
    const struct pykvm_vmpacket *d = pkt;
    uint32_t off = (uint32_t)d->offset8 * 8, total = (uint32_t)d->len8 * 8;
    if (len)
        *len = total > off ? total - off : 0;
    return (const uint8_t *)pkt + off;
}

const char *bus_version_text(uint32_t v, char *buf)
{
    snprintf(buf, 12, "%u.%u", v >> 16, v & 0xffff);
    return buf;
}

const char *bus_status_text(uint32_t s)
{
    switch (s) {
    case PYKVM_BUS_OK: return "ok";
    case PYKVM_BUS_E_VERSION: return "no common version";
    case PYKVM_BUS_E_INVALID: return "invalid request";
    case PYKVM_BUS_E_LIMIT: return "over a limit";
    case PYKVM_BUS_E_STATE: return "wrong state";
    case PYKVM_BUS_E_NOT_FOUND: return "not found";
    case PYKVM_BUS_E_IO: return "I/O error";
    case PYKVM_BUS_E_READ_ONLY: return "read-only";
    }
    return "unknown status";
}

int bus_connected(void)
{
    return inl(PYKVM_PORT_BUS + PYKVM_BUS_CTL_COMMAND) == PYKVM_BUS_STATE_CONNECTED;
}

void bus_disconnect(void)
{
    outl(PYKVM_PORT_BUS + PYKVM_BUS_CTL_COMMAND, PYKVM_BUS_CMD_DISCONNECT);
}

/* A wait that spun this long asks (one exit) whether the host still serves us:
 * after a host-side disconnect no reply or free space ever comes. */
static int host_gone(uint64_t spins)
{
    return (spins & 1023) == 1023 && !bus_connected();
}

static int mgmt_send(uint32_t type, const void *body, uint32_t size)
{
    uint8_t buf[sizeof(struct pykvm_bus_msg) + sizeof(struct pykvm_bus_gpadl_header)];
    struct pykvm_bus_msg *h = (struct pykvm_bus_msg *)buf;
    if (size > sizeof(buf) - sizeof(*h))
        return RING_EINVAL;
    h->type = type;
    h->size = size;
    if (size)
        memcpy(buf + sizeof(*h), body, size);
    for (uint64_t spins = 0; spins < SPIN_LIMIT; spins++) {
        int r = ring_write_inband(&mgmt_out, 0, 0, buf, sizeof(*h) + size);
        if (r == RING_SIGNAL)
            doorbell(PYKVM_BUS_MGMT_RELID);
        if (r >= 0)
            return 0;
        if (r != RING_FULL)
            return BUS_ERR_IO;
        if (host_gone(spins))
            return BUS_ERR_GONE;
        cpu_relax();
    }
    return BUS_ERR_FULL;
}

int bus_mgmt_raw(uint16_t type, const void *payload, uint32_t len)
{
    int r = ring_write(&mgmt_out, type, 0, 0, payload, len);
    if (r == RING_SIGNAL)
        doorbell(PYKVM_BUS_MGMT_RELID);
    return r < 0 ? r : 0;
}

static struct bus_channel *by_relid(uint32_t relid)
{
    for (int i = 0; i < bus_nchannels; i++)
        if (bus_channels[i].relid == relid)
            return &bus_channels[i];
    return 0;
}

/* Ask the host to tear down ch's GPADLs; their ids stay set until GPADL_TORNDOWN comes. */
static void teardown_gpadls(struct bus_channel *ch)
{
    ch->tearing = 1;
    uint32_t ids[2] = { ch->gpadl, ch->data_gpadl };
    for (int i = 0; i < 2; i++)
        if (ids[i]) {
            struct pykvm_bus_gpadl_result t = { ids[i], 0 };
            mgmt_send(PYKVM_BUS_MSG_GPADL_TEARDOWN, &t, sizeof(t));
        }
}

/* What every management message the driver did not wait for does. */
static void mgmt_async(const struct pykvm_bus_msg *m)
{
    const void *body = m + 1;
    if (m->type == PYKVM_BUS_MSG_RESCIND && m->size >= sizeof(struct pykvm_bus_relid_msg)) {
        const struct pykvm_bus_relid_msg *r = body;
        struct bus_channel *ch = by_relid(r->relid);
        if (ch && !ch->rescinded) {
            ch->rescinded = 1;
            ch->open = 0;
            /* the ids stay until GPADL_TORNDOWN: the slot's pages are not reused before */
            teardown_gpadls(ch);
            struct pykvm_bus_relid_msg rel = { ch->relid, 0 };
            mgmt_send(PYKVM_BUS_MSG_RELID_RELEASED, &rel, sizeof(rel));
        }
    } else if (m->type == PYKVM_BUS_MSG_GPADL_TORNDOWN && m->size >= sizeof(struct pykvm_bus_gpadl_result)) {
        const struct pykvm_bus_gpadl_result *g = body;
        for (int i = 0; i < bus_nchannels && g->gpadl; i++) {
            struct bus_channel *c = &bus_channels[i];
            if (c->tearing && c->gpadl == g->gpadl)
                c->gpadl = 0;
            if (c->tearing && c->data_gpadl == g->gpadl)
                c->data_gpadl = 0;
        }
    } else if (m->type == PYKVM_BUS_MSG_CLOSED && m->size >= sizeof(struct pykvm_bus_relid_msg)) {
        const struct pykvm_bus_relid_msg *r = body;
        struct bus_channel *ch = by_relid(r->relid);
        if (ch) {
            ch->closed_by_host = 1;
            ch->closed_reason = r->reason;
            ch->open = 0;
        }
    } else if (m->type == PYKVM_BUS_MSG_OFFER && m->size >= sizeof(struct pykvm_bus_offer)) {
        /* an offer while running (a service offered again after a rescind) takes the slot of
         * a rescinded channel whose GPADL is gone, so its ring pages are free again */
        const struct pykvm_bus_offer *o = body;
        int slot = -1;
        for (int i = 0; i < bus_nchannels && slot < 0; i++)
            if (bus_channels[i].rescinded && !bus_channels[i].gpadl && !bus_channels[i].data_gpadl)
                slot = i;
        if (slot < 0 && bus_nchannels < BUS_MAX_CHANNELS)
            slot = bus_nchannels++;
        if (slot < 0 || by_relid(o->relid))
            return;                 /* no room, or a relid we hold: ignore it */
        struct bus_channel *ch = &bus_channels[slot];
        memset(ch, 0, sizeof(*ch));
        ch->relid = o->relid;
        ch->if_lo = o->interface_lo;
        ch->if_hi = o->interface_hi;
        ch->inst_lo = o->instance_lo;
        ch->inst_hi = o->instance_hi;
        ch->offer_flags = o->flags;
        ch->nversions = o->version_count <= PYKVM_BUS_MAX_SERVICE_VERSIONS ? o->version_count
                                                                           : PYKVM_BUS_MAX_SERVICE_VERSIONS;
        for (uint32_t i = 0; i < ch->nversions; i++)
            ch->versions[i] = o->versions[i];
        ch->ring_mem = ring_pool[slot];
    }
    /* anything else unasked for (a late TORNDOWN, ...) needs nothing */
}

/* Read one management message; 1 and *out set, 0 if none, < 0 on a broken ring. */
static int mgmt_read(const struct pykvm_bus_msg **out)
{
    int n = ring_read(&mgmt_in, mgmt_pkt.raw, sizeof(mgmt_pkt.raw));
    if (n < 0)
        return BUS_ERR_IO;
    if (n == 0)
        return 0;
    if (ring_read_done(&mgmt_in))
        doorbell(PYKVM_BUS_MGMT_RELID);
    uint32_t len;
    const struct pykvm_bus_msg *m = bus_payload(mgmt_pkt.raw, &len);
    if (len < sizeof(*m) || m->size > len - sizeof(*m))
        return BUS_ERR_IO;
    *out = m;
    return 1;
}

int bus_poll(void)
{
    const struct pykvm_bus_msg *m;
    int n = 0, r;
    while ((r = mgmt_read(&m)) > 0) {
        mgmt_async(m);
        n++;
    }
    return r < 0 ? r : n;
}

/* Wait for a message of `type` whose first u32 is `id` (any id if match_id is 0); copy its body. */
static int mgmt_wait(uint32_t type, int match_id, uint32_t id, void *body, uint32_t size)
{
    for (uint64_t spins = 0; spins < SPIN_LIMIT; spins++) {
        uint32_t seen = bus_irq_count;
        const struct pykvm_bus_msg *m;
        int r = mgmt_read(&m);
        if (r < 0)
            return r;
        if (r == 0) {
            if (host_gone(spins))
                return BUS_ERR_GONE;
            if (use_irq)
                bus_irq_wait(seen);
            else
                cpu_relax();
            continue;
        }
        if (m->type == type && m->size >= size && (!match_id || *(const uint32_t *)(m + 1) == id)) {
            memcpy(body, m + 1, size);
            return 0;
        }
        mgmt_async(m);
    }
    return BUS_ERR_IO;
}

int bus_mgmt_wait(uint32_t type, uint32_t id, void *body, uint32_t size)
{
    return mgmt_wait(type, 1, id, body, size);
}

int bus_connect(const uint32_t *versions, int n)
{
    if (n < 1 || n > PYKVM_BUS_MAX_VERSIONS)
        return BUS_ERR_IO;
    if (ring_init(&mgmt_out, mgmt_area, MGMT_RING_BYTES) || ring_init(&mgmt_in, mgmt_area + MGMT_RING_BYTES, MGMT_RING_BYTES))
        return BUS_ERR_IO;
    uint64_t gpa = va_to_pa(mgmt_area);
    outl(PYKVM_PORT_BUS + PYKVM_BUS_CTL_GPA_LO, (uint32_t)gpa);
    outl(PYKVM_PORT_BUS + PYKVM_BUS_CTL_GPA_HI, (uint32_t)(gpa >> 32));
    outl(PYKVM_PORT_BUS + PYKVM_BUS_CTL_COMMAND, PYKVM_BUS_CMD_CONNECT);
    if (inl(PYKVM_PORT_BUS + PYKVM_BUS_CTL_COMMAND) != PYKVM_BUS_STATE_CONNECTED)
        return BUS_ERR_REFUSED;

    struct pykvm_bus_initiate ic = { .count = (uint32_t)n, .target_vcpu = 0 };
    for (int i = 0; i < n; i++)
        ic.versions[i] = versions[i];
    int r = mgmt_send(PYKVM_BUS_MSG_INITIATE_CONTACT, &ic, sizeof(ic));
    struct pykvm_bus_version_response vr;
    if (r || (r = mgmt_wait(PYKVM_BUS_MSG_VERSION_RESPONSE, 0, 0, &vr, sizeof(vr))))
        return r;
    bus_host_nversions = vr.count <= PYKVM_BUS_MAX_VERSIONS ? vr.count : PYKVM_BUS_MAX_VERSIONS;
    for (uint32_t i = 0; i < bus_host_nversions; i++)
        bus_host_versions[i] = vr.supported[i];
    if (!vr.accepted) {
        bus_last_status = PYKVM_BUS_E_VERSION;
        return BUS_ERR_REFUSED;
    }
    bus_version = vr.version;

    bus_nchannels = 0;
    if ((r = mgmt_send(PYKVM_BUS_MSG_REQUEST_OFFERS, 0, 0)))
        return r;
    uint32_t dummy;
    /* offers arrive first and are collected by mgmt_async */
    if ((r = mgmt_wait(PYKVM_BUS_MSG_ALL_OFFERS_DELIVERED, 0, 0, &dummy, 0)))
        return r;
    return bus_nchannels;
}

struct bus_channel *bus_find(uint64_t if_lo, uint64_t if_hi)
{
    for (int i = 0; i < bus_nchannels; i++)
        if (bus_channels[i].if_lo == if_lo && bus_channels[i].if_hi == if_hi && !bus_channels[i].rescinded)
            return &bus_channels[i];
    return 0;
}

/* Describe `pages` pages at va to the host as a new GPADL: its id, or < 0. */
static int make_gpadl(const uint8_t *va, uint32_t pages)
{
    struct pykvm_bus_gpadl_header gh;
    if (pages < 1 || pages > PYKVM_BUS_GPADL_PFNS_PER_MSG)
        return BUS_ERR_IO;
    memset(&gh, 0, sizeof(gh));
    gh.gpadl = next_gpadl++;
    gh.total = gh.count = pages;
    for (uint32_t i = 0; i < gh.total; i++)
        gh.pfns[i] = va_to_pa(va + i * PAGE) >> 12;
    int r = mgmt_send(PYKVM_BUS_MSG_GPADL_HEADER, &gh, sizeof(gh));
    struct pykvm_bus_gpadl_result gr;
    if (r || (r = mgmt_wait(PYKVM_BUS_MSG_GPADL_CREATED, 1, gh.gpadl, &gr, sizeof(gr))))
        return r;
    if (gr.status != PYKVM_BUS_OK) {
        bus_last_status = gr.status;
        return BUS_ERR_REFUSED;
    }
    return (int)gh.gpadl;
}

int bus_wait_torn(struct bus_channel *ch)
{
    for (uint64_t spins = 0; spins < SPIN_LIMIT && (ch->gpadl || ch->data_gpadl); spins++) {
        uint32_t seen = bus_irq_count;
        const struct pykvm_bus_msg *m;
        int r = mgmt_read(&m);
        if (r < 0)
            return r;
        if (r > 0) {
            mgmt_async(m);
            continue;
        }
        if (host_gone(spins))
            return BUS_ERR_GONE;
        if (use_irq)
            bus_irq_wait(seen);
        else
            cpu_relax();
    }
    return ch->gpadl || ch->data_gpadl ? BUS_ERR_IO : 0;
}

int bus_open(struct bus_channel *ch, const uint32_t *versions, int n)
{
    return bus_open_data(ch, versions, n, 0, 0);
}

int bus_open_data(struct bus_channel *ch, const uint32_t *versions, int n, void *buf, uint32_t pages)
{
    if (!ch || ch->open || ch->rescinded || n < 1 || n > PYKVM_BUS_MAX_SERVICE_VERSIONS || ch->gpadl ||
        ch->data_gpadl || (buf && !(ch->offer_flags & PYKVM_BUS_OFFER_FLAG_DATA_BUFFER)))
        return BUS_ERR_IO;
    ch->tearing = 0;
    uint32_t half = BUS_RING_PAGES * PAGE;
    if (ring_init(&ch->out, ch->ring_mem, half) || ring_init(&ch->in, ch->ring_mem + half, half))
        return BUS_ERR_IO;

    int r = make_gpadl(ch->ring_mem, 2 * BUS_RING_PAGES);
    if (r < 0)
        return r;
    ch->gpadl = (uint32_t)r;
    if (buf) {
        if ((r = make_gpadl(buf, pages)) < 0) {
            teardown_gpadls(ch);
            bus_wait_torn(ch);
            return r;
        }
        ch->data_gpadl = (uint32_t)r;
    }
    ch->closed_by_host = 0;

    struct pykvm_bus_open op = { .relid = ch->relid, .ring_gpadl = ch->gpadl, .inbound_offset = BUS_RING_PAGES,
                                 .target_vcpu = 0, .version_count = (uint32_t)n, .data_gpadl = ch->data_gpadl };
    for (int i = 0; i < n; i++)
        op.versions[i] = versions[i];
    struct pykvm_bus_open_result res;
    if ((r = mgmt_send(PYKVM_BUS_MSG_OPEN, &op, sizeof(op))) ||
        (r = mgmt_wait(PYKVM_BUS_MSG_OPEN_RESULT, 1, ch->relid, &res, sizeof(res))))
        return r;
    if (res.status != PYKVM_BUS_OK) {
        bus_last_status = res.status;
        if (res.status == PYKVM_BUS_E_VERSION) {
            ch->nversions = res.count <= PYKVM_BUS_MAX_SERVICE_VERSIONS ? res.count : PYKVM_BUS_MAX_SERVICE_VERSIONS;
            for (uint32_t i = 0; i < ch->nversions; i++)
                ch->versions[i] = res.supported[i];
        }
        teardown_gpadls(ch);
        bus_wait_torn(ch);
        return BUS_ERR_REFUSED;
    }
    ch->version = res.version;
    ch->xfer_gpa = res.xfer_gpa;
    ch->xfer_pages = res.xfer_pages;
    ch->open = 1;
    return 0;
}

int bus_close(struct bus_channel *ch)
{
    if (!ch)
        return BUS_ERR_IO;
    int r = 0;
    if (ch->open) {
        struct pykvm_bus_relid_msg c = { ch->relid, 0 };
        r = mgmt_send(PYKVM_BUS_MSG_CLOSE, &c, sizeof(c));
        ch->open = 0;
    }
    if ((ch->gpadl || ch->data_gpadl) && !ch->tearing) {
        teardown_gpadls(ch);
        int t = bus_wait_torn(ch);
        if (!r)
            r = t;
    }
    return r;
}

int bus_unload(void)
{
    uint32_t dummy;
    int r = mgmt_send(PYKVM_BUS_MSG_UNLOAD, 0, 0);
    if (!r)
        r = mgmt_wait(PYKVM_BUS_MSG_UNLOAD_RESPONSE, 0, 0, &dummy, 0);
    return r;
}

int bus_send_packet(struct bus_channel *ch, uint16_t type, uint16_t flags, uint64_t trans_id,
                    const struct rt_gpa_buf *bufs, uint32_t nbufs, const void *msg, uint32_t len)
{
    for (uint64_t spins = 0; spins < SPIN_LIMIT; spins++) {
        if (!ch->open)
            return BUS_ERR_GONE;
        int r = type == PYKVM_VMPKT_DATA_GPA_DIRECT
                    ? ring_write_gpa_direct(&ch->out, trans_id, flags, bufs, nbufs, msg, len)
                    : ring_write(&ch->out, type, flags, trans_id, msg, len);
        if (r == RING_SIGNAL)
            doorbell(ch->relid);
        if (r >= 0)
            return 0;
        if (r != RING_FULL)
            return BUS_ERR_IO;
        if ((spins & 1023) == 1023 && bus_poll() < 0)
            return BUS_ERR_IO;
        cpu_relax();
    }
    return BUS_ERR_FULL;
}

int bus_send(struct bus_channel *ch, const void *msg, uint32_t len, uint64_t trans_id)
{
    return bus_send_packet(ch, PYKVM_VMPKT_DATA_INBAND, 0, trans_id, 0, 0, msg, len);
}

int bus_recv(struct bus_channel *ch, void *buf, uint32_t max)
{
    if (!ch->open && ring_empty(&ch->in))
        return BUS_ERR_GONE;
    int n = ring_read(&ch->in, buf, max);
    if (n > 0 && ring_read_done(&ch->in))
        doorbell(ch->relid);
    return n < 0 ? BUS_ERR_IO : n;
}

int bus_recv_wait(struct bus_channel *ch, void *buf, uint32_t max, uint64_t spins)
{
    for (uint64_t i = 0; i < spins; i++) {
        uint32_t seen = bus_irq_count;
        int n = bus_recv(ch, buf, max);
        if (n)
            return n;
        /* with interrupts every wake may be the management ring's (a rescind): look at once */
        if ((use_irq || (i & 1023) == 1023) && bus_poll() < 0)
            return BUS_ERR_IO;
        if (use_irq && !ring_empty(&mgmt_in)) {
            /* a management message (CLOSED, RESCIND) whose interrupt came before `seen` was
             * taken: halting now would wait for an interrupt that already happened */
            if (bus_poll() < 0)
                return BUS_ERR_IO;
            continue;
        }
        if (use_irq && ch->open)
            bus_irq_wait(seen);
        else
            cpu_relax();
    }
    return 0;
}

int bus_take_xfer(struct bus_channel *ch, const void *pkt, void *dst, uint32_t max)
{
    const struct pykvm_vmpacket *d = pkt;
    if (d->type != PYKVM_VMPKT_DATA_XFER_PAGES || !ch->xfer_gpa)
        return BUS_ERR_IO;
    const struct pykvm_xfer_page_header *h = (const void *)(d + 1);
    const struct pykvm_xfer_range *r = (const void *)(h + 1);
    uint32_t limit = ch->xfer_pages * PAGE, done = 0;
    if ((uint32_t)d->offset8 * 8 < sizeof(*d) + sizeof(*h) + h->range_count * sizeof(*r))
        return BUS_ERR_IO;
    for (uint32_t i = 0; i < h->range_count; i++) {
        if (r[i].byte_offset > limit || r[i].byte_count > limit - r[i].byte_offset || r[i].byte_count > max - done)
            return BUS_ERR_IO;
        memcpy((uint8_t *)dst + done, (const void *)(uintptr_t)(ch->xfer_gpa + r[i].byte_offset), r[i].byte_count);
        done += r[i].byte_count;
    }
    int rc = bus_send_packet(ch, PYKVM_VMPKT_COMP, 0, d->trans_id, 0, 0, 0, 0);
    return rc ? rc : (int)done;
}

struct bus_channel *bus_wait_offer(uint64_t if_lo, uint64_t if_hi, uint32_t ms)
{
    if (!use_irq)
        bus_use_irq();      /* wait halted, not spinning: the restarting partition needs the CPU */
    for (uint32_t i = 0; i <= ms; i++) {
        uint32_t seen = bus_irq_count;
        if (bus_poll() < 0)
            break;
        struct bus_channel *ch = bus_find(if_lo, if_hi);
        if (ch || !bus_connected())
            return ch;
        lapic_timer_oneshot(PYKVM_BUS_VECTOR, 1000000);   /* about 1 ms at KVM's 1 GHz APIC bus */
        bus_irq_wait(seen);
    }
    lapic_timer_stop();
    return 0;
}
