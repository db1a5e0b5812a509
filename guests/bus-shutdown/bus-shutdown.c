/*
 * bus-shutdown: the guest half of the shutdown and heartbeat services.
 *
 * Opens the shutdown and heartbeat channels, then idles (halted between
 * interrupts): a LAPIC timer tick sends a heartbeat with sequence numbers 1,
 * 2, 3, ... and the bus interrupt brings the host's shutdown request
 * (`pykvm ctl SOCK shutdown`). The request is answered with a completion
 * carrying its transaction id; the guest waits (bounded) until the host has
 * taken it from the ring, then powers off.
 *
 * Command line (optional): every=MS   milliseconds between heartbeats
 * (default 20; KVM's LAPIC timer counts 1 GHz bus cycles).
 *
 * Serial output, exact:
 *   "bus: connected, version 1.0, 3 offers\n"     (4 with a --disk)
 *   "shutdown: open, version 1.0\n"
 *   "heartbeat: open, version 1.0\n"
 *   "shutdown: waiting for the host\n"
 *   "shutdown: requested by the host\n"
 * then power-off (status 0). Failures print a line and exit with debug-exit
 * codes: 2 connect refused, 3 a service is not offered, 4 open refused,
 * 5 a send failed or the channel broke, 6 an unexpected packet arrived.
 */
#include "rt.h"
#include "bus.h"

#define TIMER_VECTOR 0x60
#define DRAIN_SPINS 10000000ull

static volatile uint32_t timer_ticks;
static uint8_t pkt[256] __attribute__((aligned(8)));

void beat_timer_irq(void)
{
    timer_ticks++;
    lapic_eoi();
}
RT_IRQ_HANDLER(beat_timer_entry, beat_timer_irq);

static struct bus_channel *open_service(const char *name, uint64_t lo, uint64_t hi, uint32_t version)
{
    char vb[12];
    struct bus_channel *ch = bus_find(lo, hi);
    if (!ch) {
        printf("%s: not offered\n", name);
        exit_code(3);
    }
    if (bus_open(ch, &version, 1)) {
        printf("%s: open refused: %s\n", name, bus_status_text(bus_last_status));
        exit_code(4);
    }
    printf("%s: open, version %s\n", name, bus_version_text(ch->version, vb));
    return ch;
}

/* Halt until an interrupt moves either counter (checked with IF = 0: no lost wake-up). */
static void idle(uint32_t bus_seen, uint32_t ticks_seen)
{
    cli();
    if (bus_irq_count == bus_seen && timer_ticks == ticks_seen)
        sti_hlt();
    sti();
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t every_ms = arg_u64(cmd, "every", 20);
    if (every_ms < 1 || every_ms > 4000)
        every_ms = 20;
    uint32_t period = (uint32_t)(every_ms * 1000000);

    bus_use_irq();
    idt_set_handler(TIMER_VECTOR, beat_timer_entry);
    uint32_t busv[1] = { PYKVM_BUS_VERSION_1_0 };
    char vb[12];
    int offers = bus_connect(busv, 1);
    if (offers < 0) {
        printf("bus: connect refused (%d)\n", offers);
        exit_code(2);
    }
    printf("bus: connected, version %s, %d offers\n", bus_version_text(bus_version, vb), offers);
    struct bus_channel *sd = open_service("shutdown", PYKVM_BUS_IF_SHUTDOWN_LO, PYKVM_BUS_IF_SHUTDOWN_HI,
                                          PYKVM_SHUTDOWN_V1_0);
    struct bus_channel *hb = open_service("heartbeat", PYKVM_BUS_IF_HEARTBEAT_LO, PYKVM_BUS_IF_HEARTBEAT_HI,
                                          PYKVM_HEARTBEAT_V1_0);
    printf("shutdown: waiting for the host\n");

    uint64_t seq = 0;
    uint32_t ticks_done = timer_ticks;
    lapic_timer_oneshot(TIMER_VECTOR, period);
    for (;;) {
        uint32_t bus_seen = bus_irq_count, ticks_seen = timer_ticks;
        if (bus_poll() < 0) {
            printf("shutdown: management ring broken\n");
            exit_code(5);
        }
        int n = bus_recv(sd, pkt, sizeof(pkt));
        if (n < 0) {
            printf("shutdown: channel %s\n", n == BUS_ERR_GONE ? "gone" : "broken");
            exit_code(5);
        }
        if (n > 0) {
            const struct pykvm_vmpacket *d = (const void *)pkt;
            uint32_t len;
            const struct pykvm_ic_msg *m = bus_payload(pkt, &len);
            if (d->type != PYKVM_VMPKT_DATA_INBAND || len < sizeof(*m) || m->op != PYKVM_SHUTDOWN_OP_REQUEST) {
                printf("shutdown: unexpected packet type %u\n", d->type);
                exit_code(6);
            }
            lapic_timer_stop();
            printf("shutdown: requested by the host\n");
            struct pykvm_ic_msg ack = { PYKVM_SHUTDOWN_OP_REQUEST, 0, m->seq };
            if (bus_send_packet(sd, PYKVM_VMPKT_COMP, 0, d->trans_id, 0, 0, &ack, sizeof(ack))) {
                printf("shutdown: completion not sent\n");
                exit_code(5);
            }
            /* the host acknowledges by consuming it: power off once it has (or after a bound) */
            for (uint64_t i = 0; i < DRAIN_SPINS && sd->out.hdr->read_index != sd->out.hdr->write_index; i++)
                cpu_relax();
            poweroff();
        }
        if (ticks_seen != ticks_done) {
            ticks_done = ticks_seen;
            struct pykvm_ic_msg beat = { PYKVM_HEARTBEAT_OP_BEAT, 0, ++seq };
            if (bus_send(hb, &beat, sizeof(beat), seq)) {
                printf("heartbeat: send %llu failed\n", (unsigned long long)seq);
                exit_code(5);
            }
            lapic_timer_oneshot(TIMER_VECTOR, period);
        }
        idle(bus_seen, ticks_seen);
    }
}
