/*
 * bus-blocksvc: a service partition's guest. It serves the block-storage
 * interface (PYKVM_BUS_IF_BLOCK_*) to other partitions through the root's
 * provider channel (pykvm_abi.h "provider v1.0"), over a RAM disk it owns.
 * Clients use it with the same driver they use against the host's block
 * service; they cannot tell which partition serves them.
 *
 * Command line (all optional):
 *   sectors=N        RAM disk size in sectors (default 2048, at most 4096)
 *   crash_after=N    dereference NULL after serving N requests, but only when
 *                    generation=0 (the root appends generation=K to a restarted
 *                    partition's command line, so a restart does not crash again)
 *   ro=1             a read-only disk (writes answered PYKVM_BUS_E_READ_ONLY)
 *   versions=1.1,1.0 the block versions to register, newest first (default 1.0);
 *                    a relayed request for another version is answered
 *                    PYKVM_BUS_E_VERSION
 *   hostile=tag      answer every request with a wrong transaction id
 *   hostile=length   answer every request with 1024 data bytes too many
 *   hostile=silent   never answer (the root's request_timeout must step in)
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
 *   on a rescind or unload of the provider channel: "blocksvc: provider channel gone\n"
 *     then power-off (status 0)
 * Failures: exit 2 connect refused, 3 no provider offer (the topology gives the
 * partition nothing to provide), 4 open or register refused, 5 the ring broke,
 * 6 a malformed versions= or hostile= argument.
 */
#include "rt.h"
#include "bus.h"

#define SECTOR PYKVM_BLK_SECTOR
#define MAX_SECTORS 4096
#define MAX_DATA (PYKVM_PROVIDER_MAX_SECTORS * SECTOR)

static uint8_t disk[MAX_SECTORS * SECTOR] __attribute__((aligned(4096)));
static uint8_t pkt[MAX_DATA + 256] __attribute__((aligned(8)));
static uint8_t reply[MAX_DATA + 1024 + sizeof(struct pykvm_blk_response)] __attribute__((aligned(8)));

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t sectors = arg_u64(cmd, "sectors", 2048);
    uint64_t crash_after = arg_u64(cmd, "crash_after", 0);
    uint64_t generation = arg_u64(cmd, "generation", 0);
    int ro = arg_u64(cmd, "ro", 0) != 0;
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
    uint32_t want[1] = { PYKVM_PROVIDER_V1_0 };
    if (bus_open(ch, want, 1)) {
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
    printf("blocksvc: serving %llu sectors, generation %llu, versions", (unsigned long long)sectors,
           (unsigned long long)generation);
    for (int i = 0; i < nversions; i++)
        printf(" %s", bus_version_text(versions[i], vb));
    printf("\n");
    if (hostile[0])
        printf("blocksvc: hostile: %s\n", hostile);

    uint64_t served = 0;
    for (;;) {
        /* one wait at a time, then the management ring: a rescind must not wait for 1024 wakeups */
        int n = bus_recv_wait(ch, pkt, sizeof(pkt), 1);
        if (n == 0)
            bus_poll();
        if (n == BUS_ERR_GONE || ch->rescinded || ch->closed_by_host) {
            printf("blocksvc: provider channel gone\n");
            poweroff();
        }
        if (n < 0) {
            printf("blocksvc: ring broke (%d)\n", n);
            exit_code(5);
        }
        if (n == 0)
            continue;
        const struct pykvm_vmpacket *d = (const void *)pkt;
        uint32_t len;
        const uint8_t *p = bus_payload(pkt, &len);
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
            } else if (rq.op == PYKVM_BLK_OP_INFO || rq.op == PYKVM_BLK_OP_FLUSH) {
                rs->status = PYKVM_BUS_OK;
            } else if (rq.op == PYKVM_BLK_OP_READ && in_range) {
                out = rq.count * SECTOR;
                memcpy(reply + sizeof(*rs), disk + rq.sector * SECTOR, out);
                rs->status = PYKVM_BUS_OK;
            } else if (rq.op == PYKVM_BLK_OP_WRITE && in_range && data >= rq.count * SECTOR) {
                if (ro) {
                    rs->status = PYKVM_BUS_E_READ_ONLY;
                } else {
                    memcpy(disk + rq.sector * SECTOR, p + sizeof(rq), rq.count * SECTOR);
                    rs->status = PYKVM_BUS_OK;
                }
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
        if (crash_after && generation == 0 && served == crash_after) {
            printf("blocksvc: served %llu requests, crashing\n", (unsigned long long)served);
            page_unmap(0);
            volatile uint8_t *null = 0;
            __asm__("" : "+r"(null));
            (void)*null;
        }
    }
}
