/*
 * doorbell: the bus's exit-free signals, guest side (tests/test_bus_doorbell.py).
 *
 * --cmdline "n=<N> m=<M> [x2apic]" (defaults n=1000 m=10).  The host registers
 * doorbell channels DATA_CHANNEL and IRQ_CHANNEL (ioeventfd) and, for every
 * IRQ_CHANNEL ring, signals one MSI on PYKVM_BUS_VECTOR to APIC id 0.
 *
 *   doorbell: start n=<N> m=<M> apic=<xapic|x2apic>
 *   doorbell: rang <N>                  N rings of DATA_CHANNEL (no exit each)
 *   doorbell: unregistered rang         one write of UNREGISTERED (exits, dropped)
 *   irq: <M> of <M> hook=<M>            M request/interrupt round trips, then the count
 *   doorbell: ok
 *
 * Status 41 (exit_code(0x14)); "FAIL <what>" and status 97 otherwise.
 */
#include "rt.h"

#define DATA_CHANNEL 1
#define IRQ_CHANNEL 2
#define UNREGISTERED 0xdead0001u

static volatile uint32_t hook_count;

static void count_hook(void)
{
    hook_count++;
}

static uint32_t parse_uint(const char *s, const char **end)
{
    uint32_t v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (uint32_t)(*s++ - '0');
    *end = s;
    return v;
}

static void fail(const char *what)
{
    printf("FAIL %s\n", what);
    exit_code(0x30);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *why = bootinfo_validate(bi);
    if (why)
        panic("bad boot info: %s", why);
    uint32_t n = 1000, m = 10;
    int want_x2apic = 0;
    for (const char *p = bootinfo_cmdline(bi); *p;) {
        if (*p == ' ') {
            p++;
        } else if (!strncmp(p, "n=", 2)) {
            n = parse_uint(p + 2, &p);
        } else if (!strncmp(p, "m=", 2)) {
            m = parse_uint(p + 2, &p);
        } else if (!strncmp(p, "x2apic", 6)) {
            want_x2apic = 1;
            p += 6;
        } else {
            fail("cmdline");
        }
    }
    if (want_x2apic && lapic_x2apic_enable())
        fail("x2apic not offered by CPUID");
    printf("doorbell: start n=%u m=%u apic=%s\n", n, m, want_x2apic ? "x2apic" : "xapic");

    for (uint32_t i = 0; i < n; i++)
        bus_doorbell(DATA_CHANNEL);
    printf("doorbell: rang %u\n", n);
    bus_doorbell(UNREGISTERED);
    printf("doorbell: unregistered rang\n");

    bus_irq_init(count_hook);
    if (lapic_is_x2apic() != want_x2apic)
        fail("apic mode");
    for (uint32_t i = 0; i < m; i++) {
        uint32_t seen = bus_irq_count;
        bus_doorbell(IRQ_CHANNEL);
        bus_irq_wait(seen);
    }
    cli();
    printf("irq: %u of %u hook=%u\n", bus_irq_count, m, hook_count);
    if (bus_irq_count != m || hook_count != m)
        fail("interrupt count");
    printf("doorbell: ok\n");
    exit_code(0x14);
}
