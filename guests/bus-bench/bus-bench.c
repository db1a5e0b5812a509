/*
 * bus-bench: the guest half of scripts/bench_bus.py.
 *
 * mode=bus   n=N size=S window=W: N echo messages of S bytes over the bus, up
 *            to W in flight; each reply's transaction id and first/last
 *            bytes are checked (a benchmark, not a test of every byte).
 * mode=port  n=N size=S: the same through the trapped echo device
 *            (--device echo-port): rep outsb of the message, rep insb back.
 *            Both take spin=M: markers around the timed part as mode=disk's.
 * mode=block n=N: N sequential 4 KiB reads through the block service
 *            (GPA-direct buffer), up to W in flight.
 * mode=disk  n=N sectors=S write=0|1 off=O base=B spin=M verify=0|1 irq=0|1:
 *            N sequential block requests of S sectors (1..256) at B, B+S, ...
 *            (wrapping inside the disk), one buffer starting at byte O of
 *            its page; a block service of the host or of another partition
 *            (scripts/bench_partitions.py). Prints "bench: ready", spins
 *            M thousand loop iterations (time for the host to read
 *            counters), "bench: start", runs, "bench: done", spins again,
 *            sends one FLUSH (a guest loop iteration costs microseconds
 *            under nested KVM). verify=1 instead writes the N requests with a
 *            pattern (as bus-block's, seed = request + 1) and reads each back
 *            into a cleared buffer: "bench: disk verified N requests of S sectors".
 *            When the block offer is served over a direct channel (offer flag
 *            DATA_BUFFER), the request buffer is the channel's data buffer:
 *            requests name their bytes in it and nothing is copied on either
 *            side ("bench: direct channel\n" after the open). irq=1: wait for each
 *            completion halted until the bus interrupt, instead of polling.
 * Prints "bench: <mode> <n> done, <doorbells> doorbells\n" and powers off;
 * exit code 3 on any mismatch or error.
 */
#include "rt.h"
#include "bus.h"

static uint8_t msg[sizeof(struct pykvm_echo_msg) + PYKVM_ECHO_MAX] __attribute__((aligned(8)));
static uint8_t back[PYKVM_ECHO_MAX];
static uint8_t pkt[PYKVM_ECHO_MAX + 128] __attribute__((aligned(8)));
static uint8_t blockbuf[16][4096] __attribute__((aligned(4096)));
static uint8_t diskbuf[PYKVM_BLK_MAX_SECTORS * PYKVM_BLK_SECTOR + 4096] __attribute__((aligned(4096)));

static int direct;                  /* the block channel has diskbuf as its data buffer */
static int polling = 1;             /* mode=disk without irq=1: completions are polled for */

static void fail(const char *what)
{
    printf("bench: %s\n", what);
    exit_code(3);
}

static struct bus_channel *open_service(uint64_t lo, uint64_t hi, uint32_t version)
{
    uint32_t v1[1] = { PYKVM_BUS_VERSION_1_0 }, sv[1] = { version };
    if (bus_connect(v1, 1) < 0)
        fail("connect failed");
    struct bus_channel *ch = bus_find(lo, hi);
    if (ch && lo == PYKVM_BUS_IF_BLOCK_LO && (ch->offer_flags & PYKVM_BUS_OFFER_FLAG_DATA_BUFFER)) {
        if (bus_open_data(ch, sv, 1, diskbuf, sizeof(diskbuf) / 4096))
            fail("open failed");
        direct = 1;
        if (polling)
            ring_mask(&ch->in);     /* this driver polls: the service guest need not ring for replies */
        printf("bench: direct channel\n");
        return ch;
    }
    if (!ch || bus_open(ch, sv, 1))
        fail("open failed");
    return ch;
}

static void spin(uint64_t thousands);

/* With spin=M (M > 0) the timed part is marked as in mode=disk: "bench: ready", a
 * spin, "bench: start", the run, "bench: done", a spin (scripts/bench_partitions.py). */
static void mark_start(uint64_t spins)
{
    if (spins) {
        printf("bench: ready\n");
        spin(spins);
        printf("bench: start\n");
    }
}

static void mark_done(uint64_t spins)
{
    if (spins) {
        printf("bench: done\n");
        spin(spins);
    }
}

static void bench_bus(uint32_t n, uint32_t size, uint32_t window, uint64_t spins)
{
    struct bus_channel *ch = open_service(PYKVM_BUS_IF_ECHO_LO, PYKVM_BUS_IF_ECHO_HI, PYKVM_ECHO_V1_0);
    mark_start(spins);
    struct pykvm_echo_msg *h = (struct pykvm_echo_msg *)msg;
    h->op = PYKVM_ECHO_OP_ECHO;
    h->len = size;
    for (uint32_t i = 0; i < size; i++)
        msg[sizeof(*h) + i] = (uint8_t)i;
    if (spins) {      /* one echo before the markers: a service in another partition has set up by then */
        if (bus_send(ch, msg, sizeof(*h) + size, 0xffffffffull) || bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull) <= 0)
            fail("warm-up echo failed");
    }
    uint32_t sent = 0, done = 0;
    while (done < n) {
        while (sent < n && sent - done < window) {
            if (bus_send(ch, msg, sizeof(*h) + size, ++sent))
                fail("send failed");
        }
        int got = bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull);
        const struct pykvm_vmpacket *d = (const void *)pkt;
        uint32_t len;
        const uint8_t *p = bus_payload(pkt, &len);
        if (got <= 0 || d->trans_id != ++done || len < sizeof(*h) + size || p[sizeof(*h)] != 0 ||
            p[sizeof(*h) + size - 1] != (uint8_t)(size - 1))
            fail("bad reply");
    }
    mark_done(spins);
}

static void bench_port(uint32_t n, uint32_t size, uint64_t spins)
{
    for (uint32_t i = 0; i < size; i++)
        msg[i] = (uint8_t)i;
    mark_start(spins);
    for (uint32_t k = 0; k < n; k++) {
        const void *s = msg;
        void *d = back;
        uint64_t c = size;
        __asm__ volatile("cld; rep outsb" : "+S"(s), "+c"(c) : "d"((uint16_t)PYKVM_PORT_ECHO) : "memory");
        c = size;
        __asm__ volatile("cld; rep insb" : "+D"(d), "+c"(c) : "d"((uint16_t)PYKVM_PORT_ECHO) : "memory");
        if (back[0] != 0 || back[size - 1] != (uint8_t)(size - 1))
            fail("bad echo");
    }
    mark_done(spins);
}

static void bench_block(uint32_t n, uint32_t window)
{
    struct bus_channel *ch = open_service(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI, PYKVM_BLOCK_V1_0);
    if (window > 16)
        window = 16;
    uint32_t sent = 0, done = 0;
    while (done < n) {
        while (sent < n && sent - done < window) {
            struct pykvm_blk_request rq = { .op = PYKVM_BLK_OP_READ, .sector = (uint64_t)sent * 8, .count = 8 };
            struct rt_gpa_buf b = { va_to_pa(blockbuf[sent % 16]), 4096 };
            sent++;
            if (bus_send_packet(ch, PYKVM_VMPKT_DATA_GPA_DIRECT, PYKVM_VMPKT_FLAG_COMPLETION_REQ, sent, &b, 1,
                                &rq, sizeof(rq)))
                fail("send failed");
        }
        int got = bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull);
        const struct pykvm_vmpacket *d = (const void *)pkt;
        uint32_t len;
        const struct pykvm_blk_response *r = bus_payload(pkt, &len);
        if (got <= 0 || d->trans_id != ++done || len < sizeof(*r) || r->status != PYKVM_BUS_OK)
            fail("bad block reply");
    }
}

static int64_t disk_request(struct bus_channel *ch, uint32_t op, uint64_t sector, uint32_t count, uint8_t *buf,
                            uint64_t id, uint64_t *capacity)
{
    struct pykvm_blk_request rq = { .op = op, .sector = sector, .count = count };
    struct rt_gpa_buf b = { va_to_pa(buf), count * PYKVM_BLK_SECTOR };
    int data = op == PYKVM_BLK_OP_READ || op == PYKVM_BLK_OP_WRITE;
    if (direct) {                      /* buf lies in diskbuf, the data buffer: name its bytes there */
        struct {
            struct pykvm_blk_request rq;
            struct pykvm_blk_buffer b;
        } m = { rq, { (uint32_t)(buf - diskbuf), count * PYKVM_BLK_SECTOR } };
        if (bus_send_packet(ch, PYKVM_VMPKT_DATA_INBAND, PYKVM_VMPKT_FLAG_COMPLETION_REQ, id, 0, 0, &m,
                            data ? sizeof(m) : sizeof(m.rq)))
            fail("send failed");
    } else if (bus_send_packet(ch, data ? PYKVM_VMPKT_DATA_GPA_DIRECT : PYKVM_VMPKT_DATA_INBAND,
                               PYKVM_VMPKT_FLAG_COMPLETION_REQ, id, &b, data ? 1 : 0, &rq, sizeof(rq)))
        fail("send failed");
    int got = bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull);
    const struct pykvm_vmpacket *d = (const void *)pkt;
    uint32_t len;
    const struct pykvm_blk_response *r = bus_payload(pkt, &len);
    if (got <= 0 || d->trans_id != id || len < sizeof(*r))
        fail("no block completion");
    if (capacity)
        *capacity = r->capacity;
    return r->status;
}

static uint8_t pattern(uint32_t seed, uint64_t s, uint32_t i)
{
    return (uint8_t)(seed * 73 + s * 151 + i * 7 + (i >> 8));
}

static void spin(uint64_t thousands)
{
    for (volatile uint64_t k = 0; k < thousands * 1000ull; k++)
        ;
}

static void bench_disk(const char *cmd, uint32_t n)
{
    int irq = arg_u64(cmd, "irq", 0) != 0;
    if (irq)
        bus_use_irq();            /* wait for each completion halted, woken by the bus interrupt */
    polling = !irq;
    struct bus_channel *ch = open_service(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI, PYKVM_BLOCK_V1_0);
    uint32_t count = (uint32_t)arg_u64(cmd, "sectors", 1);
    uint32_t off = (uint32_t)arg_u64(cmd, "off", 0) & ~7u;
    uint64_t base = arg_u64(cmd, "base", 0), spins = arg_u64(cmd, "spin", 100), cap = 0;
    int write = arg_u64(cmd, "write", 0) != 0, verify = arg_u64(cmd, "verify", 0) != 0;
    if (count < 1 || count > PYKVM_BLK_MAX_SECTORS || off >= 4096)
        fail("bad sectors or off");
    uint8_t *buf = diskbuf + off;
    uint64_t id = 1;
    if (disk_request(ch, PYKVM_BLK_OP_INFO, 0, 0, buf, id++, &cap) != PYKVM_BUS_OK || cap < base + count)
        fail("disk too small");
    uint64_t slots = (cap - base) / count;
    if (verify) {
        if (n > slots)
            fail("verify: the requests do not fit the disk");
        for (uint32_t k = 0; k < n; k++) {
            uint64_t s0 = base + (uint64_t)k * count;
            for (uint32_t i = 0; i < count * PYKVM_BLK_SECTOR; i++)
                buf[i] = pattern(k + 1, s0 + i / PYKVM_BLK_SECTOR, i % PYKVM_BLK_SECTOR);
            if (disk_request(ch, PYKVM_BLK_OP_WRITE, s0, count, buf, id++, 0) != PYKVM_BUS_OK)
                fail("verify: write failed");
        }
        for (uint32_t k = 0; k < n; k++) {
            uint64_t s0 = base + (uint64_t)k * count;
            memset(buf, 0, count * PYKVM_BLK_SECTOR);
            if (disk_request(ch, PYKVM_BLK_OP_READ, s0, count, buf, id++, 0) != PYKVM_BUS_OK)
                fail("verify: read failed");
            for (uint32_t i = 0; i < count * PYKVM_BLK_SECTOR; i++)
                if (buf[i] != pattern(k + 1, s0 + i / PYKVM_BLK_SECTOR, i % PYKVM_BLK_SECTOR)) {
                    printf("bench: verify: request %u byte %u differs\n", k, i);
                    exit_code(3);
                }
        }
        printf("bench: disk verified %u requests of %u sectors\n", n, count);
    } else {
        for (uint32_t i = 0; i < count * PYKVM_BLK_SECTOR; i++)
            buf[i] = (uint8_t)i;
        printf("bench: ready\n");
        spin(spins);
        printf("bench: start\n");
        uint32_t op = write ? PYKVM_BLK_OP_WRITE : PYKVM_BLK_OP_READ;
        for (uint32_t k = 0; k < n; k++)
            if (disk_request(ch, op, base + (k % slots) * count, count, buf, id++, 0) != PYKVM_BUS_OK)
                fail("bad block reply");
        printf("bench: done\n");
        spin(spins);
    }
    if (disk_request(ch, PYKVM_BLK_OP_FLUSH, 0, 0, buf, id++, 0) != PYKVM_BUS_OK)
        fail("flush failed");
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    char mode[8] = "bus";
    arg_str(cmd, "mode", mode, sizeof(mode));
    uint32_t n = (uint32_t)arg_u64(cmd, "n", 1000), size = (uint32_t)arg_u64(cmd, "size", 64);
    uint32_t window = (uint32_t)arg_u64(cmd, "window", 32);
    if (size < 1 || size > PYKVM_ECHO_MAX)
        size = 64;
    if (window < 1)
        window = 1;
    if (!strcmp(mode, "bus"))
        bench_bus(n, size, window, arg_u64(cmd, "spin", 0));
    else if (!strcmp(mode, "port"))
        bench_port(n, size, arg_u64(cmd, "spin", 0));
    else if (!strcmp(mode, "block"))
        bench_block(n, window);
    else if (!strcmp(mode, "disk"))
        bench_disk(cmd, n);
    else
        fail("unknown mode");
    printf("bench: %s %u done, %llu doorbells\n", mode, n, (unsigned long long)bus_doorbells);
    poweroff();
}
