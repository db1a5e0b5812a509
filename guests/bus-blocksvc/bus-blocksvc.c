/*
 * bus-blocksvc: a service partition's guest. It serves the block-storage
 * interface (PYKVM_BUS_IF_BLOCK_*) to other partitions through the root's
 * provider channel (pykvm_abi.h "provider v1.0"), over a RAM disk it owns or,
 * with store=disk, over the host's block service (its partition's `disk`).
 * Clients use it with the same driver they use against the host's block
 * service; they cannot tell which partition serves them.
 *
 * Command line (all optional):
 *   sectors=N        RAM disk size in sectors (default 2048, at most 4096)
 *   crash_after=N    dereference NULL after serving N requests, but only when
 *                    generation=0 (the root appends generation=K to a restarted
 *                    partition's command line, so a restart does not crash again)
 *   crash_after_writes=N  the same, after completing N writes (generation 0 only)
 *   crash_mixed=1    crash_after also waits until it served requests both relayed by the
 *                    root and over a direct channel (so clients of both paths see the crash)
 *   ro=1             a read-only disk (writes answered PYKVM_BUS_E_READ_ONLY)
 *   store=disk       serve the host's block service's disk (`disk = FILE` in the
 *                    topology, `--disk FILE`) instead of a RAM disk: every read and
 *                    write goes to the host first, and a client's write is completed
 *                    only after the host completed it (a FLUSH after the host flushed),
 *                    so a write a client saw completed survives this partition's
 *                    crash; a restarted generation serves the same file
 *   remap=0          open the provider channel at v1.0 only (no remapped requests)
 *   probe=1          on each INFO or FLUSH after a remapped request, read the
 *                    window where that request's buffer was and print whether
 *                    it is still mapped (it must not be: reads give all ones)
 *   versions=1.1,1.0 the block versions to register, newest first (default 1.0);
 *                    a relayed request for another version is answered
 *                    PYKVM_BUS_E_VERSION
 *   hostile=tag      answer every request with a wrong transaction id
 *   hostile=length   answer every request with 1024 data bytes too many
 *   hostile=silent   never answer (the root's request_timeout must step in)
 *   direct=1         open the provider channel at v1.2 too: clients the broker lets go
 *                    direct get block over a direct channel (pykvm_abi.h "block over a
 *                    direct channel"): their rings and data buffer are mapped here and
 *                    every request is served guest to guest, no host code per request
 *
 * At provider v1.1 (the default) a request of a client partition may come
 * remapped: its buffer is mapped in this guest's physical address space
 * (pykvm_abi.h, reserved2 == PYKVM_PROVIDER_REQ_REMAPPED) and read or written
 * in place.
 *
 * Over a direct channel every request is copied out of the shared ring and checked
 * (direct_blk_check: the byte range inside the client's data buffer, the sectors
 * inside the disk, the size within the broker's max_transfer, no write for a
 * read-only client) before anything is read or written; a request that is not one
 * at all, a broken ring or a packet over max_message closes that channel alone.
 *
 * The RAM disk starts with sector s byte i = (s * 151 + i * 7 + (i >> 8)) & 0xff,
 * the pattern of bus-block with seed 0, so reads before any write are checkable.
 *
 * Serial output:
 *   "blocksvc: connected, N offers\n"
 *   "blocksvc: serving S sectors, generation G, versions 1.1 1.0\n"
 *   with hostile=MODE: "blocksvc: hostile: MODE\n"
 *   the first request of each version: "blocksvc: a client at version V\n"
 *   on crash_after: "blocksvc: served N requests, crashing\n" then #PF at 0 (status 16)
 *   probe=1: "blocksvc: window after request: unmapped\n" (or "...: still mapped: 0x<hex>\n")
 *   on a rescind or unload of the provider channel:
 *     "blocksvc: served N requests, M remapped\n", "blocksvc: provider channel gone\n"
 *     then power-off (status 0)
 *   direct channels: "blocksvc: channel K open, version V, rules R, max M, data P pages,
 *   max transfer T\n", "blocksvc: channel K closed by the root, N served\n", then
 *   "blocksvc: channel K window after close: unmapped\n" (a read of its rings and data
 *   buffer), "blocksvc: channel K broken (reason), closed\n"
 *   with store=disk the serving line is "blocksvc: serving S sectors of the host's
 *   disk, generation G\n"
 * Failures: exit 2 connect refused, 3 no provider offer (the topology gives the
 * partition nothing to provide), 4 open or register refused, 5 the ring broke,
 * 6 store=disk without a host block offer, or the host's block service failed,
 * or a malformed versions= or hostile= argument.
 */
#include "rt.h"
#include "bus.h"
#include "direct.h"

#define SECTOR PYKVM_BLK_SECTOR
#define MAX_SECTORS 4096
#define MAX_DATA (PYKVM_PROVIDER_MAX_SECTORS * SECTOR)

static uint8_t disk[MAX_SECTORS * SECTOR] __attribute__((aligned(4096)));
static uint8_t pkt[MAX_DATA + 256] __attribute__((aligned(8)));
static uint8_t reply[MAX_DATA + 1024 + sizeof(struct pykvm_blk_response)] __attribute__((aligned(8)));
static uint8_t hpkt[256] __attribute__((aligned(8)));
static uint8_t bounce[MAX_DATA] __attribute__((aligned(4096)));
static struct bus_channel *host_disk;     /* store=disk: the host's block service */
static uint64_t host_id = 1;
static uint8_t dpkt[512] __attribute__((aligned(8)));
static struct direct_channel chans[PYKVM_DIRECT_MAX];
static struct {                           /* a completion that found the client's ring full */
    int waiting;
    uint64_t trans_id;
    struct pykvm_blk_response rs;
} held[PYKVM_DIRECT_MAX];
static uint64_t dserved[PYKVM_DIRECT_MAX];

/* One request to the host's block service, data in buf (GPA-direct); its response, or status E_IO. */
static struct pykvm_blk_response host_io(uint32_t op, uint64_t sector, uint32_t count, void *buf)
{
    struct pykvm_blk_response rs = { .status = PYKVM_BUS_E_IO };
    struct pykvm_blk_request rq = { .op = op, .sector = sector, .count = count };
    struct rt_gpa_buf b = { .addr = va_to_pa(buf), .len = count * SECTOR };
    uint64_t id = host_id++;
    if (bus_send_packet(host_disk, count ? PYKVM_VMPKT_DATA_GPA_DIRECT : PYKVM_VMPKT_DATA_INBAND,
                        PYKVM_VMPKT_FLAG_COMPLETION_REQ, id, &b, count ? 1 : 0, &rq, sizeof(rq)))
        return rs;
    int n = bus_recv_wait(host_disk, hpkt, sizeof(hpkt), 2000000000ull);
    const struct pykvm_vmpacket *d = (const void *)hpkt;
    uint32_t len;
    const void *p = bus_payload(hpkt, &len);
    if (n > 0 && d->type == PYKVM_VMPKT_COMP && d->trans_id == id && len >= sizeof(rs))
        memcpy(&rs, p, sizeof(rs));
    return rs;
}

/* A remapped request on the RAM disk: copy between the window and the disk in place. */
static uint32_t ram_io(uint32_t op, uint64_t sector, uint32_t count, uint64_t gpa)
{
    if (op == PYKVM_BLK_OP_READ)
        memcpy((void *)(uintptr_t)gpa, disk + sector * SECTOR, count * SECTOR);
    else
        memcpy(disk + sector * SECTOR, (const void *)(uintptr_t)gpa, count * SECTOR);
    return PYKVM_BUS_OK;
}

/* A remapped request with store=disk: the host's block service only takes this guest's RAM,
 * so the window's bytes go through `bounce` a PYKVM_PROVIDER_MAX_SECTORS piece at a time. */
static uint32_t window_io(uint32_t op, uint64_t sector, uint32_t count, uint64_t gpa)
{
    for (uint32_t done = 0; done < count;) {
        uint32_t n = count - done < PYKVM_PROVIDER_MAX_SECTORS ? count - done : PYKVM_PROVIDER_MAX_SECTORS;
        uint8_t *w = (uint8_t *)(uintptr_t)(gpa + (uint64_t)done * SECTOR);
        if (op == PYKVM_BLK_OP_WRITE)
            memcpy(bounce, w, n * SECTOR);
        uint32_t st = host_io(op, sector + done, n, bounce).status;
        if (st != PYKVM_BUS_OK)
            return st;
        if (op == PYKVM_BLK_OP_READ)
            memcpy(w, bounce, n * SECTOR);
        done += n;
    }
    return PYKVM_BUS_OK;
}

static RT_NORETURN void crash(const char *what, uint64_t n)
{
    printf("blocksvc: served %llu %s, crashing\n", (unsigned long long)n, what);
    page_unmap(0);
    volatile uint8_t *null = 0;
    __asm__("" : "+r"(null));
    (void)*null;
    exit_code(5);
}

/* The root's PYKVM_DIRECT_OPEN / PYKVM_DIRECT_CLOSE (len bytes at p, copied out of the provider ring). */
static void provider_msg(const uint8_t *p, uint32_t len)
{
    struct pykvm_direct_msg m;
    int r = direct_msg_read(p, len, &m);
    if (r) {
        printf("blocksvc: a malformed direct message from the root (%d), ignored\n", r);
        return;
    }
    struct direct_channel *c = &chans[m.id];
    if (m.op == PYKVM_DIRECT_CLOSE) {
        int had_data = c->data != 0;
        if (c->open)
            printf("blocksvc: channel %u closed by the root, %llu served\n", m.id, (unsigned long long)dserved[m.id]);
        direct_close(c);
        held[m.id].waiting = 0;
        /* the root removed the pages before telling us: reads there are unclaimed MMIO now */
        uint64_t base = PYKVM_DIRECT_GPA + (uint64_t)m.id * PYKVM_DIRECT_STRIDE;
        uint64_t v = *(volatile const uint64_t *)(uintptr_t)base;
        uint64_t w = had_data ? *(volatile const uint64_t *)(uintptr_t)(base + PYKVM_DIRECT_DATA_OFFSET) : ~0ull;
        if (v == ~0ull && w == ~0ull)
            printf("blocksvc: channel %u window after close: unmapped\n", m.id);
        else
            printf("blocksvc: channel %u window after close: still mapped: 0x%llx 0x%llx\n", m.id,
                   (unsigned long long)v, (unsigned long long)w);
        return;
    }
    char vb[12];
    if (direct_attach(c, &m)) {
        printf("blocksvc: channel %u: its rings are broken, not served\n", m.id);
        return;
    }
    dserved[m.id] = 0;
    held[m.id].waiting = 0;
    printf("blocksvc: channel %u open, version %s, rules %u, max %u, data %u pages, max transfer %u\n", m.id,
           bus_version_text(m.version, vb), m.rules, m.max_message, m.data_pages, m.max_transfer);
}

/* Send channel c's held completion; 1 when it went (or the channel closed), 0 while the ring is full. */
static int flush_held(struct direct_channel *c)
{
    if (!held[c->id].waiting)
        return 1;
    int r = direct_send(c, PYKVM_VMPKT_COMP, held[c->id].trans_id, &held[c->id].rs, sizeof(held[c->id].rs));
    if (r == RING_FULL)
        return 0;
    held[c->id].waiting = 0;
    return 1;
}

static uint64_t served, writes, relayed;   /* relayed: served by the root's copy or remap */

/* Serve the requests channel c has (a completion the client has no room for waits; so does the
 * channel): how many were taken. */
static int serve_direct(struct direct_channel *c, uint64_t sectors, int ro, int store_disk)
{
    int work = 0;
    while (c->open && flush_held(c)) {
        int n = direct_recv(c, dpkt, sizeof(dpkt));
        if (n == 0)
            break;
        if (n < 0) {
            printf("blocksvc: channel %u broken (%s), closed\n", c->id, n == DIRECT_ERR_BIG ? "over its size" : "ring");
            break;
        }
        work++;
        const struct pykvm_vmpacket *d = (const void *)dpkt;
        uint32_t len;
        const uint8_t *p = bus_payload(dpkt, &len);
        struct direct_blk b;
        int st = d->type == PYKVM_VMPKT_DATA_INBAND
                     ? direct_blk_check(p, len, c->data_bytes, c->max_transfer, c->rules, sectors, &b)
                     : DIRECT_BLK_BROKEN;
        if (st == DIRECT_BLK_BROKEN) {
            printf("blocksvc: channel %u: packet type %u of %u bytes is no block request, closed\n", c->id, d->type,
                   len);
            direct_close(c);
            break;
        }
        struct pykvm_blk_response *rs = &held[c->id].rs;
        memset(rs, 0, sizeof(*rs));
        rs->capacity = sectors;
        rs->sector_size = SECTOR;
        rs->flags = ro || (c->rules & PYKVM_DIRECT_RULE_READ_ONLY) ? PYKVM_BLK_FLAG_READ_ONLY : 0;
        if (st == PYKVM_BUS_OK && b.op == PYKVM_BLK_OP_FLUSH && store_disk)
            st = (int)host_io(PYKVM_BLK_OP_FLUSH, 0, 0, 0).status;
        else if (st == PYKVM_BUS_OK && b.op == PYKVM_BLK_OP_WRITE && ro)
            st = PYKVM_BUS_E_READ_ONLY;
        else if (st == PYKVM_BUS_OK && (b.op == PYKVM_BLK_OP_READ || b.op == PYKVM_BLK_OP_WRITE)) {
            /* checked: [offset, offset + length) is inside the data buffer mapped at c->data */
            uint64_t at = (uint64_t)(uintptr_t)(c->data + b.offset);
            st = (int)(store_disk ? window_io(b.op, b.sector, b.count, at) : ram_io(b.op, b.sector, b.count, at));
            if (b.op == PYKVM_BLK_OP_WRITE && st == PYKVM_BUS_OK)
                writes++;
        }
        rs->status = (uint32_t)st;
        held[c->id].trans_id = d->trans_id;
        held[c->id].waiting = 1;
        dserved[c->id]++;
        served++;
        flush_held(c);
    }
    return work;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t sectors = arg_u64(cmd, "sectors", 2048);
    uint64_t crash_after = arg_u64(cmd, "crash_after", 0);
    uint64_t crash_after_writes = arg_u64(cmd, "crash_after_writes", 0);
    char store[8];
    int store_disk = arg_str(cmd, "store", store, sizeof(store)) && !strcmp(store, "disk");
    uint64_t generation = arg_u64(cmd, "generation", 0);
    int ro = arg_u64(cmd, "ro", 0) != 0;
    int remap = arg_u64(cmd, "remap", 1) != 0;
    int probe = arg_u64(cmd, "probe", 0) != 0;
    int direct = arg_u64(cmd, "direct", 0) != 0;
    int crash_mixed = arg_u64(cmd, "crash_mixed", 0) != 0;
    uint32_t versions[PYKVM_BUS_MAX_SERVICE_VERSIONS] = { PYKVM_BLOCK_V1_0 };
    int nversions = arg_versions(cmd, "versions", versions, PYKVM_BUS_MAX_SERVICE_VERSIONS);
    char hostile[16] = "";
    arg_str(cmd, "hostile", hostile, sizeof(hostile));
    int bad_tag = !strcmp(hostile, "tag"), bad_len = !strcmp(hostile, "length"), silent = !strcmp(hostile, "silent");
    if (nversions < 0 || (hostile[0] && !bad_tag && !bad_len && !silent)) {
        printf("blocksvc: bad versions= or hostile= argument\n");
        exit_code(6);
    }
    if (nversions == 0)
        nversions = 1;
    uint32_t seen[PYKVM_BUS_MAX_SERVICE_VERSIONS];
    int nseen = 0;
    if (sectors < 1 || sectors > MAX_SECTORS)
        sectors = MAX_SECTORS;
    if (!store_disk)
        for (uint64_t s = 0; s < sectors; s++)
            for (uint32_t i = 0; i < SECTOR; i++)
                disk[s * SECTOR + i] = (uint8_t)(s * 151 + i * 7 + (i >> 8));

    bus_use_irq();
    uint32_t busv[1] = { PYKVM_BUS_VERSION_1_0 };
    int offers = bus_connect(busv, 1);
    if (offers < 0) {
        printf("blocksvc: connect refused (%d)\n", offers);
        exit_code(2);
    }
    printf("blocksvc: connected, %d offers\n", offers);
    struct bus_channel *ch = bus_find(PYKVM_BUS_IF_PROVIDER_LO, PYKVM_BUS_IF_PROVIDER_HI);
    if (!ch) {
        printf("blocksvc: no provider offer\n");
        exit_code(3);
    }
    if (store_disk) {
        uint32_t bwant[1] = { PYKVM_BLOCK_V1_0 };
        host_disk = bus_find(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI);
        if (!host_disk || bus_open(host_disk, bwant, 1)) {
            printf("blocksvc: store=disk needs the host's block service (topology: disk = FILE)\n");
            exit_code(6);
        }
        struct pykvm_blk_response info = host_io(PYKVM_BLK_OP_INFO, 0, 0, 0);
        if (info.status != PYKVM_BUS_OK || info.sector_size != SECTOR || !info.capacity) {
            printf("blocksvc: the host's disk: %s\n", bus_status_text(info.status));
            exit_code(6);
        }
        sectors = info.capacity;
        ro = ro || (info.flags & PYKVM_BLK_FLAG_READ_ONLY);
    }
    uint32_t want[3] = { PYKVM_PROVIDER_V1_2, PYKVM_PROVIDER_V1_1, PYKVM_PROVIDER_V1_0 };
    int first = direct ? 0 : remap ? 1 : 2;
    if (bus_open(ch, want + first, 3 - first)) {
        printf("blocksvc: open refused: %s\n", bus_status_text(bus_last_status));
        exit_code(4);
    }
    struct pykvm_provider_register reg = { .if_lo = PYKVM_BUS_IF_BLOCK_LO, .if_hi = PYKVM_BUS_IF_BLOCK_HI,
                                           .nversions = (uint32_t)nversions };
    for (int i = 0; i < nversions; i++)
        reg.versions[i] = versions[i];
    if (bus_send(ch, &reg, sizeof(reg), 0)) {
        printf("blocksvc: register failed\n");
        exit_code(4);
    }
    char vb[12];
    printf("blocksvc: serving %llu sectors%s, generation %llu, versions", (unsigned long long)sectors,
           store_disk ? " of the host's disk" : "", (unsigned long long)generation);
    for (int i = 0; i < nversions; i++)
        printf(" %s", bus_version_text(versions[i], vb));
    printf("\n");
    if (hostile[0])
        printf("blocksvc: hostile: %s\n", hostile);

    uint64_t remapped = 0, last_window = 0;
    for (;;) {
        uint32_t irqs = bus_irq_count;
        int n = bus_recv(ch, pkt, sizeof(pkt));
        if (n == 0)
            bus_poll();         /* the management ring: a rescind must not wait */
        if (n == BUS_ERR_GONE || ch->rescinded || ch->closed_by_host) {
            printf("blocksvc: served %llu requests, %llu remapped\n", (unsigned long long)served,
                   (unsigned long long)remapped);
            printf("blocksvc: provider channel gone\n");
            poweroff();
        }
        if (n < 0) {
            printf("blocksvc: ring broke (%d)\n", n);
            exit_code(5);
        }
        if (n == 0) {
            int work = 0;
            for (int i = 0; i < PYKVM_DIRECT_MAX; i++)
                if (chans[i].open)
                    work += serve_direct(&chans[i], sectors, ro, store_disk);
            if (crash_after && generation == 0 && served >= crash_after && (!crash_mixed || (relayed && served > relayed)))
                crash("requests", served);
            if (crash_after_writes && generation == 0 && writes >= crash_after_writes)
                crash("writes", writes);
            if (!work)
                bus_irq_wait(irqs);   /* a client's doorbell, the root's packet or message wakes it */
            continue;
        }
        const struct pykvm_vmpacket *d = (const void *)pkt;
        uint32_t len;
        const uint8_t *p = bus_payload(pkt, &len);
        if (d->type == PYKVM_VMPKT_DATA_INBAND && !(d->flags & PYKVM_VMPKT_FLAG_COMPLETION_REQ) && len >= 4 &&
            (*(const uint32_t *)p == PYKVM_DIRECT_OPEN || *(const uint32_t *)p == PYKVM_DIRECT_CLOSE)) {
            provider_msg(p, len);         /* p is our copy (pkt) */
            continue;
        }
        struct pykvm_blk_response *rs = (void *)reply;
        uint32_t out = 0;
        memset(rs, 0, sizeof(*rs));
        rs->capacity = sectors;
        rs->sector_size = SECTOR;
        rs->flags = ro ? PYKVM_BLK_FLAG_READ_ONLY : 0;
        rs->status = PYKVM_BUS_E_INVALID;
        if (silent)
            continue;
        if (d->type == PYKVM_VMPKT_DATA_INBAND && len >= sizeof(struct pykvm_blk_request)) {
            struct pykvm_blk_request rq;
            memcpy(&rq, p, sizeof(rq));
            int known = 0, first = 1;     /* reserved: the version the client's channel negotiated */
            for (int i = 0; i < nversions; i++)
                known |= versions[i] == rq.reserved;
            for (int i = 0; i < nseen; i++)
                first &= seen[i] != rq.reserved;
            if (known && first && nseen < PYKVM_BUS_MAX_SERVICE_VERSIONS) {
                seen[nseen++] = rq.reserved;
                printf("blocksvc: a client at version %s\n", bus_version_text(rq.reserved, vb));
            }
            if (!known)
                rq.op = 0;                /* answered PYKVM_BUS_E_VERSION below */
            uint32_t data = len - (uint32_t)sizeof(rq);
            int in_range = rq.count >= 1 && rq.count <= PYKVM_PROVIDER_MAX_SECTORS && rq.sector < sectors &&
                           rq.count <= sectors - rq.sector;
            if (!known) {
                rs->status = PYKVM_BUS_E_VERSION;
            } else if (rq.reserved2 == PYKVM_PROVIDER_REQ_REMAPPED) {
                /* the client's buffer is mapped at [gpa, gpa + length) for as long as we hold this request */
                struct pykvm_provider_remap rm;
                int ok = data >= sizeof(rm);
                if (ok)
                    memcpy(&rm, p + sizeof(rq), sizeof(rm));
                ok = ok && rq.count >= 1 && rq.count <= PYKVM_BLK_MAX_SECTORS && rq.sector < sectors &&
                     rq.count <= sectors - rq.sector && rm.length == rq.count * SECTOR &&
                     rm.gpa >= PYKVM_PROVIDER_REMAP_GPA &&
                     rm.gpa + rm.length <= PYKVM_PROVIDER_REMAP_GPA + PYKVM_PROVIDER_REMAP_PAGES * 4096ull;
                if (ok && rq.op == PYKVM_BLK_OP_WRITE && ro) {
                    rs->status = PYKVM_BUS_E_READ_ONLY;
                } else if (ok && (rq.op == PYKVM_BLK_OP_READ || rq.op == PYKVM_BLK_OP_WRITE)) {
                    rs->status = store_disk ? window_io(rq.op, rq.sector, rq.count, rm.gpa)
                                            : ram_io(rq.op, rq.sector, rq.count, rm.gpa);
                    if (rq.op == PYKVM_BLK_OP_WRITE && rs->status == PYKVM_BUS_OK)
                        writes++;
                }
                if (ok) {
                    remapped++;
                    last_window = rm.gpa;
                }
            } else if (rq.op == PYKVM_BLK_OP_INFO || rq.op == PYKVM_BLK_OP_FLUSH) {
                if (probe && last_window) {
                    uint64_t v = *(volatile const uint64_t *)(uintptr_t)last_window;
                    if (v == ~0ull)
                        printf("blocksvc: window after request: unmapped\n");
                    else
                        printf("blocksvc: window after request: still mapped: 0x%llx\n", (unsigned long long)v);
                }
                rs->status = PYKVM_BUS_OK;
                if (rq.op == PYKVM_BLK_OP_FLUSH && store_disk)
                    rs->status = host_io(PYKVM_BLK_OP_FLUSH, 0, 0, 0).status;
                rs->status = PYKVM_BUS_OK;
            } else if (rq.op == PYKVM_BLK_OP_READ && in_range) {
                if (store_disk) {
                    rs->status = host_io(PYKVM_BLK_OP_READ, rq.sector, rq.count, reply + sizeof(*rs)).status;
                } else {
                    memcpy(reply + sizeof(*rs), disk + rq.sector * SECTOR, rq.count * SECTOR);
                    rs->status = PYKVM_BUS_OK;
                }
                out = rs->status == PYKVM_BUS_OK ? rq.count * SECTOR : 0;
            } else if (rq.op == PYKVM_BLK_OP_WRITE && in_range && data >= rq.count * SECTOR) {
                if (ro) {
                    rs->status = PYKVM_BUS_E_READ_ONLY;
                } else if (store_disk) {
                    /* the data stays in pkt: the host copies it out before it completes */
                    rs->status = host_io(PYKVM_BLK_OP_WRITE, rq.sector, rq.count, (uint8_t *)p + sizeof(rq)).status;
                } else {
                    memcpy(disk + rq.sector * SECTOR, p + sizeof(rq), rq.count * SECTOR);
                    rs->status = PYKVM_BUS_OK;
                }
                if (rs->status == PYKVM_BUS_OK)
                    writes++;
            }
        }
        if (bad_len)
            out += 1024;                  /* reply has room for 2 sectors past the largest answer */
        if (bus_send_packet(ch, PYKVM_VMPKT_COMP, 0, d->trans_id + (bad_tag ? 0x1000 : 0), 0, 0, reply,
                            (uint32_t)sizeof(*rs) + out)) {
            printf("blocksvc: reply failed\n");
            exit_code(5);
        }
        served++;
        relayed++;
        if (crash_after && generation == 0 && served >= crash_after && (!crash_mixed || served > relayed))
            crash("requests", served);
        if (crash_after_writes && generation == 0 && writes == crash_after_writes)
            crash("writes", writes);
    }
}
