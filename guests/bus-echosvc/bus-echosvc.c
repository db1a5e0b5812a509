/*
 * bus-echosvc: a service partition's guest serving echo (PYKVM_BUS_IF_ECHO_*,
 * versions 1.1 and 1.0) to other partitions over direct channels
 * (pykvm_abi.h "provider v1.2"): the client's rings are mapped here and every
 * message goes guest to guest, with no host code per message.
 *
 * It opens the provider channel at v1.2, registers echo, then serves: the
 * root's PYKVM_DIRECT_OPEN / PYKVM_DIRECT_CLOSE messages on the provider
 * channel and the packets of every open direct channel. Each packet is copied
 * out of the shared ring and checked there (direct_recv); a channel whose ring
 * breaks or that sends something echo does not define is closed alone, the
 * others go on. It waits for work halted (bus interrupt).
 *
 * Command line (all optional):
 *   crash_after=N   read NULL (#PF, page 0 unmapped) after echoing N messages, generation 0 only
 *
 * Serial output:
 *   "echosvc: connected, N offers\n", "echosvc: serving echo 1.1 1.0, generation G\n"
 *   "echosvc: channel K open, version V, rules R, max M\n"
 *   "echosvc: channel K closed by the root, E echoed\n", then
 *   "echosvc: channel K window after close: unmapped\n" (a read of its window)
 *   "echosvc: channel K broken (reason), closed\n"
 *   on the provider channel's rescind: "echosvc: provider channel gone, E echoed\n", power-off
 * Failures: exit 2 connect refused, 3 no provider offer, 4 open or register
 * refused (the root speaks no provider 1.2), 5 the provider ring broke.
 */
#include "rt.h"
#include "bus.h"
#include "direct.h"

#define MAXPKT (sizeof(struct pykvm_vmpacket) + 8 + PYKVM_ECHO_MAX + 64)

static uint8_t pkt[4096 + 512] __attribute__((aligned(8)));
static uint8_t dpkt[MAXPKT] __attribute__((aligned(8)));
static struct direct_channel chans[PYKVM_DIRECT_MAX];
static uint64_t echoed[PYKVM_DIRECT_MAX];
static uint64_t total;

static RT_NORETURN void crash(uint64_t n)
{
    printf("echosvc: echoed %llu messages, crashing\n", (unsigned long long)n);
    page_unmap(0);
    volatile uint8_t *null = 0;
    __asm__("" : "+r"(null));      /* a page fault at 0, not the #UD gcc makes of a known NULL access */
    (void)*null;
    exit_code(5);
}

static void provider_msg(const uint8_t *p, uint32_t len)
{
    struct pykvm_direct_msg m;
    int r = direct_msg_read(p, len, &m);
    if (r) {
        printf("echosvc: a malformed direct message from the root (%d), ignored\n", r);
        return;
    }
    struct direct_channel *c = &chans[m.id];
    if (m.op == PYKVM_DIRECT_CLOSE) {
        if (c->open)
            printf("echosvc: channel %u closed by the root, %llu echoed\n", m.id, (unsigned long long)echoed[m.id]);
        direct_close(c);
        /* the root removed the pages before telling us: reads there are unclaimed MMIO now */
        uint64_t v = *(volatile const uint64_t *)(uintptr_t)(PYKVM_DIRECT_GPA + (uint64_t)m.id * PYKVM_DIRECT_STRIDE);
        if (v == ~0ull)
            printf("echosvc: channel %u window after close: unmapped\n", m.id);
        else
            printf("echosvc: channel %u window after close: still mapped: 0x%llx\n", m.id, (unsigned long long)v);
        return;
    }
    char vb[12];
    if (direct_attach(c, &m)) {
        printf("echosvc: channel %u: its rings are broken, not served\n", m.id);
        return;
    }
    echoed[m.id] = 0;
    printf("echosvc: channel %u open, version %s, rules %u, max %u\n", m.id, bus_version_text(m.version, vb),
           m.rules, m.max_message);
}

/* Serve what channel c has; how many packets were taken. */
static int serve(struct direct_channel *c)
{
    int work = 0;
    while (c->open) {
        int n = direct_recv(c, dpkt, sizeof(dpkt));
        if (n == 0)
            break;
        if (n < 0) {
            printf("echosvc: channel %u broken (%s), closed\n", c->id, n == DIRECT_ERR_BIG ? "over its size" : "ring");
            break;
        }
        work++;
        const struct pykvm_vmpacket *d = (const void *)dpkt;
        uint32_t len;
        const uint8_t *p = bus_payload(dpkt, &len);
        struct pykvm_echo_msg h;
        if (d->type != PYKVM_VMPKT_DATA_INBAND || len < sizeof(h)) {
            printf("echosvc: channel %u: packet type %u of %u bytes, closed\n", c->id, d->type, len);
            direct_close(c);
            break;
        }
        memcpy(&h, p, sizeof(h));
        if (h.op == PYKVM_ECHO_OP_ECHO && h.len <= PYKVM_ECHO_MAX && sizeof(h) + h.len <= len) {
            int r;
            while ((r = direct_send(c, PYKVM_VMPKT_DATA_INBAND, d->trans_id, p, (uint32_t)sizeof(h) + h.len)) == RING_FULL)
                __asm__ volatile("pause");
            if (r)
                break;
            echoed[c->id]++;
            total++;
        } else if (h.op == PYKVM_ECHO_OP_COUNT && c->version >= PYKVM_ECHO_V1_1) {
            struct { uint32_t op, len; uint64_t count; } a = { PYKVM_ECHO_OP_COUNT, 8, echoed[c->id] };
            while (direct_send(c, PYKVM_VMPKT_DATA_INBAND, d->trans_id, &a, sizeof(a)) == RING_FULL)
                __asm__ volatile("pause");
        } else {
            printf("echosvc: channel %u: echo op %u of %u bytes, closed\n", c->id, h.op, h.len);
            direct_close(c);
        }
    }
    return work;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t crash_after = arg_u64(cmd, "crash_after", 0);
    uint64_t generation = arg_u64(cmd, "generation", 0);
    bus_use_irq();
    uint32_t busv[1] = { PYKVM_BUS_VERSION_1_0 };
    int offers = bus_connect(busv, 1);
    if (offers < 0) {
        printf("echosvc: connect refused (%d)\n", offers);
        exit_code(2);
    }
    printf("echosvc: connected, %d offers\n", offers);
    struct bus_channel *ch = bus_find(PYKVM_BUS_IF_PROVIDER_LO, PYKVM_BUS_IF_PROVIDER_HI);
    if (!ch) {
        printf("echosvc: no provider offer\n");
        exit_code(3);
    }
    uint32_t want[1] = { PYKVM_PROVIDER_V1_2 };
    if (bus_open(ch, want, 1)) {
        printf("echosvc: open refused: %s\n", bus_status_text(bus_last_status));
        exit_code(4);
    }
    struct pykvm_provider_register reg = { .if_lo = PYKVM_BUS_IF_ECHO_LO, .if_hi = PYKVM_BUS_IF_ECHO_HI,
                                           .nversions = 2, .versions = { PYKVM_ECHO_V1_1, PYKVM_ECHO_V1_0 } };
    if (bus_send(ch, &reg, sizeof(reg), 0)) {
        printf("echosvc: register failed\n");
        exit_code(4);
    }
    printf("echosvc: serving echo 1.1 1.0, generation %llu\n", (unsigned long long)generation);
    for (;;) {
        uint32_t seen = bus_irq_count;
        int work = 0;
        int n;
        while ((n = bus_recv(ch, pkt, sizeof(pkt))) > 0) {
            work++;
            const struct pykvm_vmpacket *d = (const void *)pkt;
            uint32_t len;
            const uint8_t *p = bus_payload(pkt, &len);
            if (d->type == PYKVM_VMPKT_DATA_INBAND)
                provider_msg(p, len);
        }
        if (n == 0 && !work)
            bus_poll();
        if (n == BUS_ERR_GONE || ch->rescinded || ch->closed_by_host) {
            printf("echosvc: provider channel gone, %llu echoed\n", (unsigned long long)total);
            poweroff();
        }
        if (n < 0) {
            printf("echosvc: provider ring broke (%d)\n", n);
            exit_code(5);
        }
        for (int i = 0; i < PYKVM_DIRECT_MAX; i++)
            if (chans[i].open)
                work += serve(&chans[i]);
        if (crash_after && generation == 0 && total >= crash_after)
            crash(total);
        if (!work)
            bus_irq_wait(seen);   /* a client's doorbell or the root's message wakes it */
    }
}
