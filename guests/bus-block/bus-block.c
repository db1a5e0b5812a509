/*
 * bus-block: drives the host's block storage service over the partition bus
 * (`pykvm run bus-block --disk FILE[,ro]`).
 *
 * Command line (all optional):
 *   rsec=S rcount=N   sectors to read and checksum first (default 0 and 8; N <= 64)
 *   wsec=S wcount=N   sectors to write with the seed's pattern (default 16 and 24; N <= 64)
 *   seed=N            pattern seed (default 1)
 *   crash=1           instead: write wcount sectors (N <= 128) as wcount/4
 *                     requests all in flight, then dereference NULL
 *   crash=2           instead: write the wcount sectors over and over, requests
 *                     alternating between the patterns of seed and seed + 1,
 *                     until the host stops the VM (run it with --timeout)
 *   reopen_ms=N       how long to wait for the block service to be offered again
 *                     after a rescind (default 60000, about; at most 8 reopens);
 *                     given, also how long to wait for a block offer missing at
 *                     connect (the service is between a crash and its restart):
 *                     "block: no block offer yet, waiting\n"
 *   versions=1.1,1.0  the block versions to open with, newest first (default 1.0)
 *   rounds=R          write, flush and read back R times, with seeds seed .. seed + R - 1
 *                     (default 1); then "block: R rounds done, K reopens\n"
 *   linger=1          at the end, keep the channel open until the host rescinds
 *                     it ("block: lingering\n", then "block: rescinded\n")
 *   probe=1           instead: for every block offer, open it, send INFO and read
 *                     sector 0: "block: offer K: info STATUS, read STATUS\n"
 *                     (statuses as bus_status_text, "no completion" for none,
 *                     "rescinded" when the offer was rescinded meanwhile), or
 *                     "block: offer K: rescinded\n" for one rescinded before
 *   hostile=flood     instead: send INFO requests without waiting until the host
 *                     closes the channel: "block: flood: channel closed by the
 *                     host after N requests (L limited)\n"
 *   hostile=malformed instead: send a block request of 8 bytes: "block: malformed:
 *                     channel closed by the host\n"
 *                     (both exit 7 when the host does not close the channel)
 *   hostile=direct    instead, on a direct channel: send requests naming bytes past
 *                     the data buffer, a length that is not count * 512, sectors past
 *                     the disk and more sectors than the policy's max transfer
 *                     ("block: hostile: 4 bad requests refused\n", exit 7 if one is
 *                     not), then scribble the ring's write index and ring the
 *                     doorbell flood=N times (default 10000): "block: hostile:
 *                     scribbled the ring, rang N doorbells\n", then power-off
 *
 * Direct channels: when the block offer carries PYKVM_BUS_OFFER_FLAG_DATA_BUFFER (a
 * service partition's guest serves it guest to guest), the driver gives a data buffer
 * of 32 pages at open ("block: direct channel, data buffer of 32 pages\n") and every
 * request is in-band, naming its bytes in that buffer (pykvm_abi.h "block over a direct
 * channel"): written data is copied into the buffer first, read data out of it after
 * the completion. After a rescind it waits until the host tore down the old channel's
 * GPADLs (the service side no longer maps them) before giving the buffer again.
 *
 * Recovery (a disk served by another partition, `pykvm up`): when the root
 * rescinds the block offer (the service partition went away), the request in
 * flight never completes; it fails with BUS_ERR_GONE, the driver waits for a
 * new offer of the block interface, opens it and issues that request again.
 * A write it saw completed is not written again.
 *
 * Pattern: byte i of sector s is (seed * 73 + s * 151 + i * 7 + (i >> 8)) & 0xff.
 * The checksum is 64-bit FNV-1a over the bytes read.
 *
 * Writes go out in requests of up to 16 sectors, each with two GPA-direct
 * buffers: the first 1536 bytes (or fewer) from a buffer that starts at 0xe00
 * in its page and crosses into the next one, the rest from a page-aligned
 * buffer spanning several pages. Reads land in one buffer that starts at 0x300
 * in its page (16 sectors span three pages).
 *
 * Serial output on a writable disk of C sectors, e.g. with the defaults:
 *   "bus: connected, version 1.0, 4 offers\n"
 *   "block: open, version 1.0\n"
 *   "block: C sectors of 512 bytes, read-only 0\n"
 *   "block: read 8 sectors at 0: fnv1a 0x<16 hex digits>\n"
 *   "block: wrote 24 sectors at 16\n"
 *   "block: flushed\n"
 *   "block: read back 24 sectors at 16: pattern ok\n"
 *   "block: read at sector C: invalid request\n"
 *   "block: done\n"
 * then power-off (status 0). On a read-only disk the write and read-back
 * lines are replaced by "block: write refused: read-only\n" (nothing is
 * written). With crash=1: "block: open, version 1.0\n" then
 * "block: N writes in flight, crashing\n" and a #PF on address 0 (status 16).
 * With crash=2: "block: open, version 1.0\n", "block: writing until stopped\n"
 * (then status 18 from --timeout).
 * An open refused for its version prints "block: open refused: version; this
 * guest speaks 2.0, the service 1.1, 1.0\n".
 * Failures print "block: ..." and exit with debug-exit codes: 2 connect
 * refused, 3 no block offer, 4 open refused, 5 a request failed or its
 * completion went missing, 6 read-back differs, 7 a refusal did not come
 * (read-only write or out-of-range read answered otherwise), 8 page 0 could
 * not be unmapped.
 */
#include "rt.h"
#include "bus.h"

#define SECTOR PYKVM_BLK_SECTOR
#define PAGE 4096
#define CHUNK 16                    /* sectors per request */
#define FIRST_PART 1536             /* bytes of a write taken from the mid-page buffer */
#define MAX_RW 64
#define MAX_CRASH 128
#define CRASH_PER_REQ 4

static uint8_t wbuf_a[2 * PAGE] __attribute__((aligned(PAGE)));
static uint8_t wbuf_b[4 * PAGE] __attribute__((aligned(PAGE)));
static uint8_t rbuf[4 * PAGE] __attribute__((aligned(PAGE)));
static uint8_t cbuf[2][MAX_CRASH * SECTOR + PAGE] __attribute__((aligned(PAGE)));
static uint8_t pkt[256] __attribute__((aligned(8)));
#define DATA_PAGES 32
static uint8_t dbuf[DATA_PAGES * PAGE] __attribute__((aligned(PAGE)));
static int direct;                  /* the open channel has a data buffer (block over a direct channel) */
static uint32_t doff;               /* where the next request's bytes go in dbuf */
static uint32_t last_off;           /* where the last request's went */
static struct bus_channel *ch;
static uint64_t next_id = 1;
static struct pykvm_blk_response last;
static uint32_t reopen_ms = 60000, reopens;
#define MAX_REOPENS 8

static uint8_t pattern(uint32_t seed, uint64_t s, uint32_t i)
{
    return (uint8_t)(seed * 73 + s * 151 + i * 7 + (i >> 8));
}

/* Fill n bytes at dst with the pattern of the disk bytes starting at byte `at` of sector s. */
static void fill(uint8_t *dst, uint32_t seed, uint64_t s, uint32_t at, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++, at++) {
        if (at == SECTOR) {
            at = 0;
            s++;
        }
        dst[k] = pattern(seed, s, at);
    }
}

static void buf_of(struct rt_gpa_buf *b, const void *va, uint32_t len)
{
    b->addr = va_to_pa(va);
    b->len = len;
}

/* A request over a direct channel: its bytes at doff in the data buffer (this guest's memory is
 * identity-mapped, so a buffer's guest-physical address is its address here). */
static int send_direct(uint32_t op, uint64_t sector, uint32_t count, const struct rt_gpa_buf *bufs, uint32_t nbufs)
{
    struct {
        struct pykvm_blk_request rq;
        struct pykvm_blk_buffer b;
    } m = { { .op = op, .sector = sector, .count = count }, { 0, 0 } };
    uint32_t total = 0;
    for (uint32_t i = 0; i < nbufs; i++)
        total += bufs[i].len;
    if (total > sizeof(dbuf))
        return BUS_ERR_IO;
    if (doff + total > sizeof(dbuf))
        doff = 0;
    m.b.offset = last_off = doff;
    m.b.length = total;
    if (op == PYKVM_BLK_OP_WRITE)
        for (uint32_t i = 0, at = doff; i < nbufs; at += bufs[i].len, i++)
            memcpy(dbuf + at, (const void *)(uintptr_t)bufs[i].addr, bufs[i].len);
    doff += (total + 7) & ~7u;
    return bus_send_packet(ch, PYKVM_VMPKT_DATA_INBAND, PYKVM_VMPKT_FLAG_COMPLETION_REQ, next_id++, 0, 0, &m,
                           nbufs ? sizeof(m) : sizeof(m.rq));
}

static int send_req(uint32_t op, uint64_t sector, uint32_t count, const struct rt_gpa_buf *bufs, uint32_t nbufs)
{
    if (direct)
        return send_direct(op, sector, count, bufs, nbufs);
    struct pykvm_blk_request rq = { .op = op, .sector = sector, .count = count };
    uint16_t type = nbufs ? PYKVM_VMPKT_DATA_GPA_DIRECT : PYKVM_VMPKT_DATA_INBAND;
    return bus_send_packet(ch, type, PYKVM_VMPKT_FLAG_COMPLETION_REQ, next_id++, bufs, nbufs, &rq, sizeof(rq));
}

#define GONE (-2)

/* Wait for the completion of request `id`; its status, -1 when none came, GONE when rescinded. */
static int64_t complete(uint64_t id)
{
    int n = bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull);
    if (n == BUS_ERR_GONE && ch->rescinded)
        return GONE;
    if (n <= 0)
        return -1;
    const struct pykvm_vmpacket *d = (const void *)pkt;
    uint32_t len;
    const void *p = bus_payload(pkt, &len);
    if (d->type != PYKVM_VMPKT_COMP || d->trans_id != id || len < sizeof(last))
        return -1;
    memcpy(&last, p, sizeof(last));
    return last.status;
}

static uint32_t want[PYKVM_BUS_MAX_SERVICE_VERSIONS] = { PYKVM_BLOCK_V1_0 };   /* versions= (opens and reopens) */
static int nwant;

/* Open ch, with the data buffer when the offer is served over a direct channel. */
static int open_block(void)
{
    direct = (ch->offer_flags & PYKVM_BUS_OFFER_FLAG_DATA_BUFFER) != 0;
    doff = 0;
    return direct ? bus_open_data(ch, want, nwant, dbuf, DATA_PAGES) : bus_open(ch, want, nwant);
}

/* The block offer was rescinded: wait for the service to be offered again and open it; 0 when open. */
static int reopen(void)
{
    char vb[12];
    if (reopens >= MAX_REOPENS)
        return -1;
    printf("block: channel rescinded, waiting for a new offer\n");
    struct bus_channel *old = ch;
    ch = bus_wait_offer(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI, reopen_ms);
    if (direct && bus_wait_torn(old)) {      /* the old service side may still map dbuf until then */
        printf("block: the old channel's buffer was never released\n");
        return -1;
    }
    if (!ch || open_block())
        return -1;
    reopens++;
    printf("block: reopened, version %s\n", bus_version_text(ch->version, vb));
    if (direct)
        printf("block: direct channel, data buffer of %u pages\n", DATA_PAGES);
    return 0;
}

static int probing;     /* probe=1: a rescind ends the offer's probe instead of waiting for a new offer */

/* One request and its completion; a request the rescind took is issued again on the reopened channel. */
static int64_t request(uint32_t op, uint64_t sector, uint32_t count, const struct rt_gpa_buf *bufs, uint32_t nbufs)
{
    for (;;) {
        uint64_t id = next_id;
        int r = send_req(op, sector, count, bufs, nbufs);
        int64_t st = r == BUS_ERR_GONE && ch->rescinded ? GONE : r ? -1 : complete(id);
        if (st == PYKVM_BUS_OK && direct && op == PYKVM_BLK_OP_READ) {
            uint32_t at = last_off;
            for (uint32_t i = 0; i < nbufs; at += bufs[i].len, i++)
                memcpy((void *)(uintptr_t)bufs[i].addr, dbuf + at, bufs[i].len);
        }
        if (st != GONE || probing)
            return st;
        if (reopen())
            return -1;
    }
}

static RT_NORETURN void fail(const char *what, int64_t status, uint32_t code)
{
    if (status < 0)
        printf("block: %s: no completion\n", what);
    else
        printf("block: %s: %s\n", what, bus_status_text((uint32_t)status));
    exit_code(code);
}

/* Read count (<= CHUNK) sectors at sector into rbuf + 0x300: one buffer over three pages. */
static const uint8_t *read_sectors(uint64_t sector, uint32_t count, const char *what)
{
    uint8_t *dst = rbuf + 0x300;
    struct rt_gpa_buf b;
    buf_of(&b, dst, count * SECTOR);
    int64_t st = request(PYKVM_BLK_OP_READ, sector, count, &b, 1);
    if (st != PYKVM_BUS_OK)
        fail(what, st, 5);
    return dst;
}

static uint64_t fnv1a(uint64_t h, const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* Write count sectors of the seed's pattern at sector; the status of the first failure, or 0. */
static int64_t write_pattern(uint32_t seed, uint64_t sector, uint32_t count)
{
    for (uint32_t done = 0; done < count; done += CHUNK) {
        uint32_t n = count - done < CHUNK ? count - done : CHUNK;
        uint32_t bytes = n * SECTOR, first = bytes < FIRST_PART ? bytes : FIRST_PART;
        struct rt_gpa_buf b[2];
        uint8_t *a = wbuf_a + 0xe00;
        fill(a, seed, sector + done, 0, first);
        buf_of(&b[0], a, first);
        uint32_t nb = 1;
        if (bytes > first) {
            fill(wbuf_b, seed, sector + done + first / SECTOR, first % SECTOR, bytes - first);
            buf_of(&b[1], wbuf_b, bytes - first);
            nb = 2;
        }
        int64_t st = request(PYKVM_BLK_OP_WRITE, sector + done, n, b, nb);
        if (st != PYKVM_BUS_OK)
            return st;
    }
    return 0;
}

/* Read back count sectors at sector and compare with the pattern; 1 when they match. */
static int verify(uint32_t seed, uint64_t sector, uint32_t count)
{
    for (uint32_t done = 0; done < count; done += CHUNK) {
        uint32_t n = count - done < CHUNK ? count - done : CHUNK;
        const uint8_t *p = read_sectors(sector + done, n, "read back");
        for (uint32_t k = 0; k < n; k++)
            for (uint32_t i = 0; i < SECTOR; i++)
                if (p[k * SECTOR + i] != pattern(seed, sector + done + k, i))
                    return 0;
    }
    return 1;
}

static RT_NORETURN void crash_mid_write(uint32_t seed, uint64_t sector, uint32_t count)
{
    if (page_unmap(0)) {
        printf("block: cannot unmap page 0\n");
        exit_code(8);
    }
    uint8_t *base = cbuf[0] + 0x100;         /* every request's buffer starts mid-page */
    fill(base, seed, sector, 0, count * SECTOR);
    uint32_t reqs = (count + CRASH_PER_REQ - 1) / CRASH_PER_REQ;
    printf("block: %u writes in flight, crashing\n", reqs);
    for (uint32_t done = 0; done < count; done += CRASH_PER_REQ) {
        uint32_t n = count - done < CRASH_PER_REQ ? count - done : CRASH_PER_REQ;
        struct rt_gpa_buf b;
        buf_of(&b, base + done * SECTOR, n * SECTOR);
        if (send_req(PYKVM_BLK_OP_WRITE, sector + done, n, &b, 1))
            fail("crash write", -1, 5);
    }
    volatile uint8_t *null = 0;
    __asm__("" : "+r"(null));
    (void)*null;
    printf("block: NULL did not fault\n");
    exit_code(8);
}

static RT_NORETURN void write_until_stopped(uint32_t seed, uint64_t sector, uint32_t count)
{
    uint8_t *image[2] = { cbuf[0] + 0x100, cbuf[1] + 0x100 };
    fill(image[0], seed, sector, 0, count * SECTOR);
    fill(image[1], seed + 1, sector, 0, count * SECTOR);
    printf("block: writing until stopped\n");
    for (uint32_t round = 0;; round++) {
        for (uint32_t done = 0; done < count; done += CRASH_PER_REQ) {
            uint32_t n = count - done < CRASH_PER_REQ ? count - done : CRASH_PER_REQ;
            struct rt_gpa_buf b;
            buf_of(&b, image[(round + done / CRASH_PER_REQ) & 1] + done * SECTOR, n * SECTOR);
            /* take completions as they come: the host stops reading while its replies have no room */
            int r;
            while ((r = bus_recv(ch, pkt, sizeof(pkt))) > 0)
                ;
            if (r < 0 || send_req(PYKVM_BLK_OP_WRITE, sector + done, n, &b, 1))
                fail("write", -1, 5);
        }
    }
}

static void print_versions(const uint32_t *v, uint32_t n)
{
    char vb[12];
    for (uint32_t i = 0; i < n; i++)
        printf("%s%s", i ? ", " : "", bus_version_text(v[i], vb));
}

/* Whether the host closed ch, after reading the management ring for a while. */
static int closed_by_host(uint64_t rounds)
{
    for (uint64_t i = 0; i < rounds && !ch->closed_by_host; i++)
        bus_poll();
    return ch->closed_by_host;
}

static RT_NORETURN void flood(void)
{
    uint32_t sent = 0, limited = 0;
    struct pykvm_blk_request rq = { .op = PYKVM_BLK_OP_INFO };
    while (sent < 100000 && !ch->closed_by_host) {
        int r = bus_send_packet(ch, PYKVM_VMPKT_DATA_INBAND, PYKVM_VMPKT_FLAG_COMPLETION_REQ, next_id++, 0, 0,
                                &rq, sizeof(rq));
        if (r == 0)
            sent++;
        while (bus_recv(ch, pkt, sizeof(pkt)) > 0) {
            uint32_t len;
            const struct pykvm_blk_response *rs = bus_payload(pkt, &len);
            limited += len >= sizeof(*rs) && rs->status == PYKVM_BUS_E_LIMIT;
        }
        if (r || (sent & 15) == 0)
            bus_poll();
    }
    if (!closed_by_host(1000)) {
        printf("block: flood: %u requests and the channel is still open\n", sent);
        exit_code(7);
    }
    printf("block: flood: channel closed by the host after %u requests (%u limited)\n", sent, limited);
    poweroff();
}

static RT_NORETURN void malformed(void)
{
    uint8_t junk[8] = { PYKVM_BLK_OP_READ };
    bus_send_packet(ch, PYKVM_VMPKT_DATA_INBAND, PYKVM_VMPKT_FLAG_COMPLETION_REQ, next_id++, 0, 0, junk, sizeof(junk));
    if (!closed_by_host(1000000)) {
        printf("block: malformed: the channel is still open\n");
        exit_code(7);
    }
    printf("block: malformed: channel closed by the host\n");
    poweroff();
}

static const char *probe_text(int64_t st)
{
    return st == GONE ? "rescinded" : st < 0 ? "no completion" : bus_status_text((uint32_t)st);
}

/* A hostile client of a direct channel: bad requests first (each must be refused), then a broken ring. */
static RT_NORETURN void hostile_direct(uint64_t flood)
{
    if (!direct) {
        printf("block: hostile=direct: the channel is not direct\n");
        exit_code(7);
    }
    struct {
        struct pykvm_blk_request rq;
        struct pykvm_blk_buffer b;
    } bad[4] = {
        { { .op = PYKVM_BLK_OP_READ, .sector = 0, .count = 8 }, { sizeof(dbuf) - 2048, 4096 } },   /* past the buffer */
        { { .op = PYKVM_BLK_OP_READ, .sector = 0, .count = 8 }, { 0, 4095 } },                    /* not count * 512 */
        { { .op = PYKVM_BLK_OP_READ, .sector = ~0ull - 3, .count = 8 }, { 0, 4096 } },            /* past the disk */
        { { .op = PYKVM_BLK_OP_READ, .sector = 0, .count = 300 }, { 0, 300 * 512 } },             /* too many */
    };
    uint32_t refused = 0;
    for (int i = 0; i < 4; i++) {
        int64_t st;
        for (;;) {                 /* the service may go away meanwhile: the same request on its successor */
            uint64_t id = next_id++;
            int r = bus_send_packet(ch, PYKVM_VMPKT_DATA_INBAND, PYKVM_VMPKT_FLAG_COMPLETION_REQ, id, 0, 0, &bad[i],
                                    sizeof(bad[i]));
            st = r == BUS_ERR_GONE && ch->rescinded ? GONE : r ? -1 : complete(id);
            if (st != GONE)
                break;
            if (reopen())
                fail("hostile request", -1, 5);
        }
        if (st == PYKVM_BUS_E_INVALID || st == PYKVM_BUS_E_LIMIT)
            refused++;
        else
            printf("block: hostile: bad request %d answered %s\n", i, probe_text(st));
    }
    printf("block: hostile: %u bad requests refused\n", refused);
    if (refused != 4)
        exit_code(7);
    ch->out.hdr->write_index = 3;          /* not 8-byte aligned: no reader may accept it */
    for (uint64_t i = 0; i < flood; i++)
        bus_doorbell(ch->relid);
    printf("block: hostile: scribbled the ring, rang %llu doorbells\n", (unsigned long long)flood);
    for (volatile uint64_t i = 0; i < 3000000ull; i++)
        ;
    poweroff();
}

static RT_NORETURN void probe(const uint32_t *want, int nwant)
{
    probing = 1;
    for (int k = 0; k < bus_nchannels; k++) {
        ch = &bus_channels[k];
        if (ch->if_lo != PYKVM_BUS_IF_BLOCK_LO || ch->if_hi != PYKVM_BUS_IF_BLOCK_HI)
            continue;
        if (ch->rescinded) {
            printf("block: offer %d: rescinded\n", k);
            continue;
        }
        if (open_block()) {
            printf("block: offer %d: open refused: %s\n", k, bus_status_text(bus_last_status));
            continue;
        }
        int64_t info = request(PYKVM_BLK_OP_INFO, 0, 0, 0, 0);
        struct rt_gpa_buf b;
        buf_of(&b, rbuf, SECTOR);
        int64_t rd = request(PYKVM_BLK_OP_READ, 0, 1, &b, 1);
        printf("block: offer %d: info %s, read %s\n", k, probe_text(info), probe_text(rd));
    }
    printf("block: probed\n");
    poweroff();
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t rsec = arg_u64(cmd, "rsec", 0), wsec = arg_u64(cmd, "wsec", 16);
    uint32_t rcount = (uint32_t)arg_u64(cmd, "rcount", 8), wcount = (uint32_t)arg_u64(cmd, "wcount", 24);
    uint32_t seed = (uint32_t)arg_u64(cmd, "seed", 1);
    uint32_t crash = (uint32_t)arg_u64(cmd, "crash", 0);
    uint64_t wait_ms = arg_u64(cmd, "reopen_ms", ~0ull);   /* given: a partition that outlives restarts */
    reopen_ms = wait_ms == ~0ull ? 60000 : (uint32_t)wait_ms;
    nwant = arg_versions(cmd, "versions", want, PYKVM_BUS_MAX_SERVICE_VERSIONS);
    char hostile[16] = "";
    arg_str(cmd, "hostile", hostile, sizeof(hostile));
    if (nwant < 0) {
        printf("block: bad versions= argument\n");
        exit_code(4);
    }
    if (nwant == 0)
        nwant = 1;
    if (rcount > MAX_RW)
        rcount = MAX_RW;
    if (wcount > (crash ? MAX_CRASH : MAX_RW))
        wcount = crash ? MAX_CRASH : MAX_RW;

    uint32_t busv[1] = { PYKVM_BUS_VERSION_1_0 };
    char vb[12];
    int offers = bus_connect(busv, 1);
    if (offers < 0) {
        printf("bus: connect refused (%d)\n", offers);
        exit_code(2);
    }
    printf("bus: connected, version %s, %d offers\n", bus_version_text(bus_version, vb), offers);
    if (arg_u64(cmd, "probe", 0))
        probe(want, nwant);
    ch = bus_find(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI);
    if (!ch && wait_ms != ~0ull) {
        printf("block: no block offer yet, waiting\n");
        ch = bus_wait_offer(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI, reopen_ms);
    }
    if (!ch) {
        printf("block: no block offer (run with --disk FILE)\n");
        exit_code(3);
    }
    if (open_block()) {
        printf("block: open refused: %s", bus_status_text(bus_last_status));
        if (bus_last_status == PYKVM_BUS_E_VERSION) {
            printf("; this guest speaks ");
            print_versions(want, (uint32_t)nwant);
            printf(", the service ");
            print_versions(ch->versions, ch->nversions);
        }
        printf("\n");
        exit_code(4);
    }
    printf("block: open, version %s\n", bus_version_text(ch->version, vb));
    if (direct)
        printf("block: direct channel, data buffer of %u pages\n", DATA_PAGES);
    if (!strcmp(hostile, "direct"))
        hostile_direct(arg_u64(cmd, "flood", 10000));
    if (!strcmp(hostile, "flood"))
        flood();
    if (!strcmp(hostile, "malformed"))
        malformed();
    if (crash == 1)
        crash_mid_write(seed, wsec, wcount);
    if (crash == 2)
        write_until_stopped(seed, wsec, wcount);

    int64_t st = request(PYKVM_BLK_OP_INFO, 0, 0, 0, 0);
    if (st != PYKVM_BUS_OK)
        fail("info", st, 5);
    uint64_t capacity = last.capacity;
    int ro = (last.flags & PYKVM_BLK_FLAG_READ_ONLY) != 0;
    printf("block: %llu sectors of %u bytes, read-only %d\n", (unsigned long long)capacity, last.sector_size, ro);

    if (rcount) {
        uint64_t h = 0xcbf29ce484222325ull;
        for (uint32_t done = 0; done < rcount; done += CHUNK) {
            uint32_t n = rcount - done < CHUNK ? rcount - done : CHUNK;
            h = fnv1a(h, read_sectors(rsec + done, n, "read"), n * SECTOR);
        }
        printf("block: read %u sectors at %llu: fnv1a 0x%016llx\n", rcount, (unsigned long long)rsec,
               (unsigned long long)h);
    }

    uint32_t rounds = (uint32_t)arg_u64(cmd, "rounds", 1);
    for (uint32_t k = 0; k < rounds; k++) {
        uint32_t sd = seed + k;
        if (wcount) {
            st = write_pattern(sd, wsec, wcount);
            if (ro) {
                if (st != PYKVM_BUS_E_READ_ONLY)
                    fail("write to a read-only disk", st, 7);
                printf("block: write refused: %s\n", bus_status_text((uint32_t)st));
            } else if (st != PYKVM_BUS_OK) {
                fail("write", st, 5);
            } else {
                printf("block: wrote %u sectors at %llu\n", wcount, (unsigned long long)wsec);
            }
        }
        st = request(PYKVM_BLK_OP_FLUSH, 0, 0, 0, 0);
        if (st != PYKVM_BUS_OK)
            fail("flush", st, 5);
        printf("block: flushed\n");
        if (wcount && !ro) {
            if (!verify(sd, wsec, wcount)) {
                printf("block: read back %u sectors at %llu: differs\n", wcount, (unsigned long long)wsec);
                exit_code(6);
            }
            printf("block: read back %u sectors at %llu: pattern ok\n", wcount, (unsigned long long)wsec);
        }
    }
    if (rounds > 1)
        printf("block: %u rounds done, %u reopens\n", rounds, reopens);

    struct rt_gpa_buf b;
    buf_of(&b, rbuf, SECTOR);
    st = request(PYKVM_BLK_OP_READ, capacity, 1, &b, 1);
    if (st != PYKVM_BUS_E_INVALID)
        fail("read past the end", st, 7);
    printf("block: read at sector %llu: %s\n", (unsigned long long)capacity, bus_status_text((uint32_t)st));
    if (arg_u64(cmd, "linger", 0)) {
        printf("block: lingering\n");
        bus_use_irq();
        while (!ch->rescinded) {
            bus_recv_wait(ch, pkt, sizeof(pkt), 1);
            bus_poll();
        }
        printf("block: rescinded\n");
        poweroff();
    }
    bus_close(ch);
    bus_unload();
    printf("block: done\n");
    poweroff();
}
