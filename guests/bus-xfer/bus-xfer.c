/*
 * bus-xfer: reads disk sectors through the block channel's transfer pages.
 *
 * Command line: rounds=R (default 20) in-band READs of count=C sectors
 * (default 8) from sector 0, each answered by a transfer-page packet; the
 * guest copies the data out and completes the transaction. Prints
 *   "xfer: pages at 0x<gpa>, <n> pages\n"
 *   "xfer: <R> reads of <C> sectors, fnv1a <hash of one read>\n"
 *   "xfer: write to the transfer pages ignored: yes\n"
 * then powers off. Exit codes: 2 no block offer or open failed, 3 no transfer
 * pages, 4 a read failed, 5 reads differ.
 */
#include "rt.h"
#include "bus.h"

static uint8_t pkt[512] __attribute__((aligned(8)));
static uint8_t data[PYKVM_BLK_MAX_SECTORS * PYKVM_BLK_SECTOR];

static uint32_t fnv1a(const uint8_t *p, uint32_t n)
{
    uint32_t h = 0x811c9dc5;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x01000193;
    return h;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint32_t rounds = (uint32_t)arg_u64(cmd, "rounds", 20), count = (uint32_t)arg_u64(cmd, "count", 8);
    uint32_t v1[1] = { PYKVM_BUS_VERSION_1_0 }, b1[1] = { PYKVM_BLOCK_V1_0 };
    if (count < 1 || count > PYKVM_BLK_MAX_SECTORS)
        count = 8;
    if (bus_connect(v1, 1) < 0)
        exit_code(2);
    struct bus_channel *ch = bus_find(PYKVM_BUS_IF_BLOCK_LO, PYKVM_BUS_IF_BLOCK_HI);
    if (!ch || bus_open(ch, b1, 1))
        exit_code(2);
    if (!ch->xfer_gpa)
        exit_code(3);
    printf("xfer: pages at %#llx, %u pages\n", (unsigned long long)ch->xfer_gpa, ch->xfer_pages);
    uint32_t first = 0;
    for (uint32_t i = 0; i < rounds; i++) {
        struct pykvm_blk_request rq = { .op = PYKVM_BLK_OP_READ, .sector = 0, .count = count };
        if (bus_send(ch, &rq, sizeof(rq), 100 + i))
            exit_code(4);
        int n = bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull);
        const struct pykvm_vmpacket *d = (const void *)pkt;
        uint32_t len;
        const struct pykvm_blk_response *resp = bus_payload(pkt, &len);
        if (n <= 0 || d->trans_id != 100 + i || len < sizeof(*resp) || resp->status != PYKVM_BUS_OK)
            exit_code(4);
        int got = bus_take_xfer(ch, pkt, data, sizeof(data));
        if (got != (int)(count * PYKVM_BLK_SECTOR))
            exit_code(4);
        uint32_t h = fnv1a(data, (uint32_t)got);
        if (i == 0)
            first = h;
        else if (h != first)
            exit_code(5);
    }
    printf("xfer: %u reads of %u sectors, fnv1a %08x\n", rounds, count, first);
    volatile uint8_t *x = (volatile uint8_t *)(uintptr_t)ch->xfer_gpa;
    uint8_t before = x[0];
    x[0] = (uint8_t)(before ^ 0xff);
    printf("xfer: write to the transfer pages ignored: %s\n", x[0] == before ? "yes" : "no");
    bus_close(ch);
    poweroff();
}
