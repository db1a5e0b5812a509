/*
 * bus-echo: talks to the host's echo service over the partition bus.
 *
 * Command line (all optional):
 *   n=N          messages to send (default 100), each checked on return
 *   size=S       payload bytes per message (default 64, at most 4032)
 *   window=W     messages in flight before waiting for replies (default 1)
 *   versions=new speak echo 1.1 and 1.0 (default); old: 1.0 only; major2: 2.0 only
 *   bus=2        propose bus protocol 2.0 only (the host refuses it)
 *   hold=1       before connecting, print "echo: waiting for a key\n" and wait for
 *                a byte on the serial line (a test snapshots the VM there)
 *   irq=1        wait for replies with the bus interrupt instead of polling
 *   rescind=1    after the messages, wait until the host rescinds the channel
 *   hostile=scribble  after the messages, write a broken write index into the
 *                guest->host ring, ring its doorbell flood=N times (default
 *                10000), wait a little and power off (a hostile client of a
 *                direct channel: "echo: scribbled the ring, rang N doorbells\n")
 *   reopen=1     when the channel is rescinded mid-run (its service partition
 *                stopped), wait for the new offer, open it and send again every
 *                message not yet echoed: "echo: channel rescinded, waiting for a
 *                new offer\n", "echo: reopened, version V\n"; and when there
 *                is no echo offer at connect (the service is between a crash
 *                and its restart), wait for one: "echo: no echo offer yet,
 *                waiting\n"
 *
 * Serial output on success, e.g. for the defaults:
 *   "bus: connected, version 1.0, 4 offers\n"
 *   "echo: open, version 1.1\n"
 *   "echo: 100 messages of 64 bytes ok\n"
 *   "echo: host counted 100\n"           (version 1.1 only)
 * then power-off (status 0). Failures print "echo: ..." and exit with
 * debug-exit codes: 2 connect refused, 3 no echo offer, 4 open refused,
 * 5 a reply went missing or differs, 6 the channel was closed by the host,
 * 7 rescind never came.
 */
#include "rt.h"
#include "bus.h"

static uint8_t msg[sizeof(struct pykvm_echo_msg) + PYKVM_ECHO_MAX] __attribute__((aligned(8)));
static uint8_t pkt[sizeof(msg) + 64] __attribute__((aligned(8)));

static void print_versions(const uint32_t *v, uint32_t n)
{
    char buf[12];
    for (uint32_t i = 0; i < n; i++)
        printf("%s%s", i ? ", " : "", bus_version_text(v[i], buf));
}

static void fill(uint32_t seq, uint32_t size)
{
    struct pykvm_echo_msg *h = (struct pykvm_echo_msg *)msg;
    h->op = PYKVM_ECHO_OP_ECHO;
    h->len = size;
    for (uint32_t i = 0; i < size; i++)
        msg[sizeof(*h) + i] = (uint8_t)(seq * 31 + i);
}

static int check_reply(struct bus_channel *ch, uint32_t seq, uint32_t size, uint64_t spins)
{
    int n = bus_recv_wait(ch, pkt, sizeof(pkt), spins);
    if (n <= 0)
        return n == BUS_ERR_GONE || ch->closed_by_host ? -6 : -5;
    const struct pykvm_vmpacket *d = (const void *)pkt;
    uint32_t len;
    const struct pykvm_echo_msg *h = bus_payload(pkt, &len);
    if (d->trans_id != seq || len < sizeof(*h) + size || h->op != PYKVM_ECHO_OP_ECHO || h->len != size)
        return -5;
    const uint8_t *data = (const uint8_t *)(h + 1);
    for (uint32_t i = 0; i < size; i++)
        if (data[i] != (uint8_t)(seq * 31 + i))
            return -5;
    return 0;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint32_t n = (uint32_t)arg_u64(cmd, "n", 100);
    uint32_t size = (uint32_t)arg_u64(cmd, "size", 64);
    uint32_t window = (uint32_t)arg_u64(cmd, "window", 1);
    char vers[16] = "new";
    arg_str(cmd, "versions", vers, sizeof(vers));
    if (size > PYKVM_ECHO_MAX)
        size = PYKVM_ECHO_MAX;
    if (window < 1)
        window = 1;
    if (arg_u64(cmd, "irq", 0))
        bus_use_irq();
    if (arg_u64(cmd, "hold", 0)) {
        printf("echo: waiting for a key\n");
        serial_getc();
    }

    uint32_t busv[1] = { arg_u64(cmd, "bus", 1) == 2 ? 0x20000u : PYKVM_BUS_VERSION_1_0 };
    char vb[12];
    int offers = bus_connect(busv, 1);
    if (offers < 0) {
        printf("bus: connect refused (%d); the host speaks ", offers);
        print_versions(bus_host_versions, bus_host_nversions);
        printf("\n");
        exit_code(2);
    }
    printf("bus: connected, version %s, %d offers\n", bus_version_text(bus_version, vb), offers);

    int reopen = arg_u64(cmd, "reopen", 0) != 0;
    struct bus_channel *ch = bus_find(PYKVM_BUS_IF_ECHO_LO, PYKVM_BUS_IF_ECHO_HI);
    if (!ch && reopen) {
        printf("echo: no echo offer yet, waiting\n");
        ch = bus_wait_offer(PYKVM_BUS_IF_ECHO_LO, PYKVM_BUS_IF_ECHO_HI, 120000);
    }
    if (!ch) {
        printf("echo: no echo offer\n");
        exit_code(3);
    }
    uint32_t want_new[2] = { PYKVM_ECHO_V1_1, PYKVM_ECHO_V1_0 }, want_old[1] = { PYKVM_ECHO_V1_0 },
             want_2[1] = { 0x20000 };
    const uint32_t *want = want_new;
    int nwant = 2;
    if (!strcmp(vers, "old")) {
        want = want_old;
        nwant = 1;
    } else if (!strcmp(vers, "major2")) {
        want = want_2;
        nwant = 1;
    }
    int r = bus_open(ch, want, nwant);
    if (r) {
        printf("echo: open refused: %s; we speak ", bus_status_text(bus_last_status));
        print_versions((const uint32_t *)want, (uint32_t)nwant);
        printf(", the service speaks ");
        print_versions(ch->versions, ch->nversions);
        printf("\n");
        exit_code(4);
    }
    printf("echo: open, version %s\n", bus_version_text(ch->version, vb));

    uint32_t sent = 0, done = 0, reopens = 0;
    while (done < n) {
        int gone = 0;
        while (sent < n && sent - done < window) {
            fill(sent + 1, size);
            if (bus_send(ch, msg, sizeof(struct pykvm_echo_msg) + size, sent + 1)) {
                gone = ch->rescinded;
                if (gone && reopen)
                    break;
                printf("echo: send %u failed\n", sent + 1);
                exit_code(ch->closed_by_host ? 6 : 5);
            }
            sent++;
        }
        r = gone ? -6 : check_reply(ch, done + 1, size, 2000000000ull);
        if (r == -6 && reopen && ch->rescinded && reopens < 8) {
            printf("echo: channel rescinded, waiting for a new offer\n");
            ch = bus_wait_offer(PYKVM_BUS_IF_ECHO_LO, PYKVM_BUS_IF_ECHO_HI, 120000);
            if (!ch || bus_open(ch, want, nwant)) {
                printf("echo: no new offer to reopen\n");
                exit_code(6);
            }
            printf("echo: reopened, version %s\n", bus_version_text(ch->version, vb));
            reopens++;
            sent = done;            /* what was not echoed is sent again */
            continue;
        }
        if (r) {
            printf("echo: reply %u %s\n", done + 1, r == -6 ? "lost: the host closed the channel" : "missing or wrong");
            exit_code((uint32_t)-r);
        }
        done++;
    }
    printf("echo: %u messages of %u bytes ok\n", n, size);

    char hostile[16] = "";
    arg_str(cmd, "hostile", hostile, sizeof(hostile));
    if (!strcmp(hostile, "scribble")) {
        uint64_t flood = arg_u64(cmd, "flood", 10000);
        ch->out.hdr->write_index = 3;          /* not 8-byte aligned: no reader may accept it */
        for (uint64_t i = 0; i < flood; i++)
            bus_doorbell(ch->relid);
        printf("echo: scribbled the ring, rang %llu doorbells\n", (unsigned long long)flood);
        for (volatile uint64_t i = 0; i < 3000000ull; i++)
            ;
        poweroff();
    }
    if (ch->version >= PYKVM_ECHO_V1_1) {
        struct pykvm_echo_msg q = { PYKVM_ECHO_OP_COUNT, 0 };
        if (bus_send(ch, &q, sizeof(q), 0xc0) == 0 && bus_recv_wait(ch, pkt, sizeof(pkt), 2000000000ull) > 0) {
            uint32_t len;
            const uint8_t *p = bus_payload(pkt, &len);
            uint64_t count;
            memcpy(&count, p + sizeof(struct pykvm_echo_msg), sizeof(count));
            printf("echo: host counted %llu\n", (unsigned long long)count);
        }
    }
    if (arg_u64(cmd, "rescind", 0)) {
        printf("echo: waiting for a rescind\n");
        for (uint64_t i = 0; i < 4000000000ull && !ch->rescinded; i++) {
            if ((i & 1023) == 0)
                bus_poll();
            __asm__ volatile("pause");
        }
        if (!ch->rescinded)
            exit_code(7);
        printf("echo: channel %u rescinded; send now fails: %s\n", ch->relid,
               bus_send(ch, msg, 16, 1) == BUS_ERR_GONE ? "yes" : "no");
        poweroff();
    }
    bus_close(ch);
    bus_unload();
    poweroff();
}
