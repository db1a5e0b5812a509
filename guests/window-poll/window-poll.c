/*
 * window-poll: drives the identity device (PYKVM_IDENT_BASE), whose register
 * pages are memory-backed windows: reads are served from memory with no exit,
 * writes trap to the device model, LOG writes are coalesced.
 *
 * --cmdline "poll" (the default): expected output, exact bytes:
 *     "window-poll: poll\n"
 *     "ident: vendor=0x7079 device=0x6b76 version=1.2 caps=0xf serial=PYKVM-IDENT-0001\n"
 *     "reads: 100000 ok\n"
 *     "config: 16 words landed, generation 16\n"
 *     "status: running, tick advances\n"
 *     "log: 1000 coalesced writes, count 1000 hash ok\n"
 *     "control: status trapped, reads counted\n"
 *     "control: status backed, reads not counted\n"
 *     "window-poll: ok\n"
 * then exit code 0x13 (status 39). CONFIG word i holds config_word(i) afterwards,
 * LOG received log_value(0..999) in order.
 *
 * --cmdline "reads": only the identity line and the 100 000 verified reads
 * ("window-poll: reads\n", the ident line, "reads: 100000 ok\n"), exit 0x13.
 * --cmdline "reads trapped": CONTROL switches the ident window to trapped mode
 * first (one MMIO write), then the same reads, each of which now exits; the
 * first line is "window-poll: reads trapped\n", the rest as for "reads".
 *
 * --cmdline "save": configure the device, fill RAM, print
 *     "window-poll: save\n"  the ident line
 *     "config: 16 words landed, generation 16\n"
 *     "log: count=100 hash=0x<h>\n"              (h = LOG hash of log_value(0..99))
 *     "save: configured, waiting\n"
 * with 50 more LOG writes still queued and the status window switched to
 * trapped mode, then wait ~4 s of the
 * device's TICK (the host saves and moves the VM meanwhile), checking on every
 * round that the ident page still holds the same 4096 bytes and that TICK never
 * goes backwards; then
 *     "after: ident page unchanged\n"
 *     "after: tick monotonic\n"
 *     "after: config generation=16 config[0]=0x<c0> config[15]=0x<c15>\n"
 *     "after: log count=150 hash=0x<h150>\n"
 *     "after: status trapped, reads counted\n"
 *     "after: status backed, reads not counted\n"
 *     "after: ram pattern ok\n"
 *     "window-poll: ok\n"
 * and exit code 0x13 (status 39).
 *
 * --cmdline "bench N": N reads backed, then N reads trapped, bracketed by
 * writes of 1, 2, 3, 4 to the POST-code port (0x80) for host-side timing; prints
 * "bench: n=N backed=<cycles> trapped=<cycles> ram=<cycles>\n" (rdtsc, not
 * deterministic; ram = N reads of a RAM word, the baseline), exit 0x13.
 *
 * A failed check prints "FAIL <what>" and exits with 0x30 (status 97).
 */
#include "rt.h"

#define ID(off) (PYKVM_IDENT_BASE + (off))
#define NREADS 100000
#define RAM_WORDS 16384

static uint32_t ram_pattern[RAM_WORDS];
static volatile uint64_t wait_rounds;
static uint8_t ident_copy[4096];

static uint32_t config_word(uint32_t i) { return 0xc0f10000u + i * 0x111u; }
static uint32_t log_value(uint32_t i) { return i * 0x9e3779b1u + 7; }

static void fail(const char *what, uint64_t got, uint64_t want)
{
    printf("FAIL %s: got 0x%llx want 0x%llx\n", what, (unsigned long long)got, (unsigned long long)want);
    exit_code(0x30);
}

static uint32_t rd32(uint32_t off) { return mmio_read32(ID(off)); }
static void wr32(uint32_t off, uint32_t v) { mmio_write32(ID(off), v); }
static uint64_t tick(void) { return mmio_read64(ID(PYKVM_IDENT_TICK)); }

static uint32_t hash_of(uint32_t n)
{
    uint32_t h = PYKVM_IDENT_HASH_INIT;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ log_value(i)) * PYKVM_IDENT_HASH_PRIME;
    return h;
}

static void print_ident(const char *prefix)
{
    char serial[PYKVM_IDENT_SERIAL_LEN + 1];
    for (int i = 0; i < PYKVM_IDENT_SERIAL_LEN; i++)
        serial[i] = (char)mmio_read8(ID(PYKVM_IDENT_SERIAL + i));
    serial[PYKVM_IDENT_SERIAL_LEN] = 0;
    uint32_t ver = rd32(PYKVM_IDENT_VERSION);
    printf("%svendor=0x%x device=0x%x version=%u.%u caps=0x%x serial=%s\n", prefix,
           rd32(PYKVM_IDENT_VENDOR_ID), rd32(PYKVM_IDENT_DEVICE_ID), ver >> 16, ver & 0xffff,
           rd32(PYKVM_IDENT_CAPS), serial);
}

static void check_ident(void)
{
    if (rd32(PYKVM_IDENT_VENDOR_ID) != PYKVM_IDENT_VENDOR)
        fail("vendor id", rd32(PYKVM_IDENT_VENDOR_ID), PYKVM_IDENT_VENDOR);
    if (rd32(PYKVM_IDENT_DEVICE_ID) != PYKVM_IDENT_DEVICE)
        fail("device id", rd32(PYKVM_IDENT_DEVICE_ID), PYKVM_IDENT_DEVICE);
    print_ident("ident: ");
}

/* NREADS verified reads of the ident window, cycling over eight registers. */
static uint64_t poll_reads(uint32_t n)
{
    static const uint32_t offs[8] = {
        PYKVM_IDENT_VENDOR_ID, PYKVM_IDENT_DEVICE_ID, PYKVM_IDENT_VERSION, PYKVM_IDENT_CAPS,
        PYKVM_IDENT_SERIAL, PYKVM_IDENT_SERIAL + 4, PYKVM_IDENT_SERIAL + 8, PYKVM_IDENT_SERIAL + 12,
    };
    uint32_t want[8];
    for (int i = 0; i < 8; i++)
        want[i] = rd32(offs[i]);
    if (want[0] != PYKVM_IDENT_VENDOR || want[2] != PYKVM_IDENT_VERSION_VALUE)
        fail("ident before polling", want[0], PYKVM_IDENT_VENDOR);
    /* "PYKVM-IDENT-0001" */
    if (want[4] != 0x564b5950u || want[5] != 0x44492d4du)
        fail("serial words", want[4], 0x564b5950u);
    uint32_t bad = 0;
    uint64_t t0 = rdtsc();
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = i & 7;
        if (mmio_read32(ID(offs[k])) != want[k])
            bad++;
    }
    uint64_t cycles = rdtsc() - t0;
    if (bad)
        fail("reads with wrong values", bad, 0);
    return cycles;
}

static void configure(void)
{
    for (uint32_t i = 0; i < PYKVM_IDENT_CONFIG_WORDS; i++)
        wr32(PYKVM_IDENT_CONFIG + 4 * i, config_word(i));
    for (uint32_t i = 0; i < PYKVM_IDENT_CONFIG_WORDS; i++)
        if (rd32(PYKVM_IDENT_CONFIG + 4 * i) != config_word(i))
            fail("config word did not land", rd32(PYKVM_IDENT_CONFIG + 4 * i), config_word(i));
    uint32_t gen = rd32(PYKVM_IDENT_CONFIG_GEN);
    if (gen != PYKVM_IDENT_CONFIG_WORDS)
        fail("config generation", gen, PYKVM_IDENT_CONFIG_WORDS);
    printf("config: %u words landed, generation %u\n", PYKVM_IDENT_CONFIG_WORDS, gen);
}

static void log_values(uint32_t from, uint32_t to)
{
    for (uint32_t i = from; i < to; i++)
        wr32(PYKVM_IDENT_LOG, log_value(i));
}

/* Reading FLUSH exits, so the VMM applies queued LOG writes before answering. */
static uint32_t log_flush(void) { return rd32(PYKVM_IDENT_FLUSH); }

static void wait_tick_advance(void)
{
    uint64_t t = tick(), start = rdtsc();
    while (tick() == t) {
        if (rdtsc() - start > (1ull << 36))
            fail("tick never advanced", t, t + 1);
        __asm__ volatile("pause");
    }
}

/* With the status window trapped, each read of it is counted by the device. */
static void check_trapped(const char *prefix)
{
    wr32(PYKVM_IDENT_CONTROL, PYKVM_IDENT_CTL_TRAP_STATUS);
    if (!(rd32(PYKVM_IDENT_STATUS) & PYKVM_IDENT_ST_STATUS_TRAPPED))
        fail("status trapped bit", rd32(PYKVM_IDENT_STATUS), PYKVM_IDENT_ST_STATUS_TRAPPED);
    uint32_t a = rd32(PYKVM_IDENT_TRAPPED_READS), b = rd32(PYKVM_IDENT_TRAPPED_READS);
    if (b != a + 1)
        fail("trapped reads not counted", b, a + 1);
    printf("%sstatus trapped, reads counted\n", prefix);
    wr32(PYKVM_IDENT_CONTROL, 0);
    if (rd32(PYKVM_IDENT_STATUS) & PYKVM_IDENT_ST_STATUS_TRAPPED)
        fail("status trapped bit after switching back", rd32(PYKVM_IDENT_STATUS), 0);
    a = rd32(PYKVM_IDENT_TRAPPED_READS);
    b = rd32(PYKVM_IDENT_TRAPPED_READS);
    if (b != a)
        fail("backed reads counted", b, a);
    printf("%sstatus backed, reads not counted\n", prefix);
}

static void poll(void)
{
    check_ident();
    poll_reads(NREADS);
    printf("reads: %u ok\n", NREADS);
    configure();
    if (!(rd32(PYKVM_IDENT_STATUS) & PYKVM_IDENT_ST_RUNNING))
        fail("status running bit", rd32(PYKVM_IDENT_STATUS), PYKVM_IDENT_ST_RUNNING);
    wait_tick_advance();
    printf("status: running, tick advances\n");
    uint32_t before = log_flush();
    log_values(0, 1000);
    uint32_t count = log_flush() - before;
    if (count != 1000)
        fail("log count", count, 1000);
    if (before == 0 && rd32(PYKVM_IDENT_LOG_HASH) != hash_of(1000))
        fail("log hash (order)", rd32(PYKVM_IDENT_LOG_HASH), hash_of(1000));
    printf("log: 1000 coalesced writes, count %u hash ok\n", count);
    check_trapped("control: ");
    printf("window-poll: ok\n");
}

static void save(void)
{
    check_ident();
    configure();
    log_values(0, 50);
    log_flush();
    log_values(50, 100);            /* left queued: the save drains them */
    uint32_t h = hash_of(100);
    if (log_flush() != 100 || rd32(PYKVM_IDENT_LOG_HASH) != h)
        fail("log before save", rd32(PYKVM_IDENT_LOG_COUNT), 100);
    printf("log: count=%u hash=0x%08x\n", 100, h);
    log_values(100, 150);           /* queued again, not flushed before the save */
    for (uint32_t i = 0; i < RAM_WORDS; i++)
        ram_pattern[i] = i * 2654435761u ^ 0xa5a5a5a5u;
    wr32(PYKVM_IDENT_CONTROL, PYKVM_IDENT_CTL_TRAP_STATUS);
    for (int i = 0; i < 4096; i++)
        ident_copy[i] = mmio_read8(ID(i));
    printf("save: configured, waiting\n");

    uint64_t t0 = tick(), last = t0, start = rdtsc();
    uint32_t changed = 0, backwards = 0;
    while (last - t0 < 4000000) {  /* 4 s of device time, which moves with the VM: room for a slow ctl save */
        for (int i = 0; i < 4096; i += 8) {
            uint64_t want;
            memcpy(&want, &ident_copy[i], 8);
            if (mmio_read64(ID(i)) != want)
                changed++;
        }
        uint64_t t = tick();
        if (t < last)
            backwards++;
        last = t;
        wait_rounds++;
        if (rdtsc() - start > (1ull << 38))
            fail("tick stalled while waiting", last - t0, 2000000);
    }
    if (changed)
        fail("ident page changed", changed, 0);
    printf("after: ident page unchanged\n");
    if (backwards)
        fail("tick went backwards", backwards, 0);
    printf("after: tick monotonic\n");
    printf("after: config generation=%u config[0]=0x%08x config[15]=0x%08x\n", rd32(PYKVM_IDENT_CONFIG_GEN),
           rd32(PYKVM_IDENT_CONFIG), rd32(PYKVM_IDENT_CONFIG + 60));
    uint32_t n = log_flush();
    if (n != 150 || rd32(PYKVM_IDENT_LOG_HASH) != hash_of(150))
        fail("log after the move", n, 150);
    printf("after: log count=%u hash=0x%08x\n", n, rd32(PYKVM_IDENT_LOG_HASH));
    if (!(rd32(PYKVM_IDENT_STATUS) & PYKVM_IDENT_ST_STATUS_TRAPPED))
        fail("status window lost trapped mode", rd32(PYKVM_IDENT_STATUS), PYKVM_IDENT_ST_STATUS_TRAPPED);
    check_trapped("after: ");
    for (uint32_t i = 0; i < RAM_WORDS; i++)
        if (ram_pattern[i] != (i * 2654435761u ^ 0xa5a5a5a5u))
            fail("ram pattern", ram_pattern[i], i * 2654435761u ^ 0xa5a5a5a5u);
    if (wait_rounds == 0)
        fail("wait counter", 0, 1);
    printf("after: ram pattern ok\n");
    printf("window-poll: ok\n");
}

static uint32_t parse_uint(const char *s)
{
    uint32_t v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (uint32_t)(*s++ - '0');
    return v;
}

static volatile uint32_t ram_word = 0x1234;

static void bench(uint32_t n)
{
    uint64_t t0 = rdtsc();
    uint32_t sum = 0;
    for (uint32_t i = 0; i < n; i++)
        sum += ram_word;
    uint64_t ram = rdtsc() - t0;
    if (sum != n * 0x1234u)
        fail("ram reads", sum, n * 0x1234u);
    outb(0x80, 1);
    uint64_t backed = poll_reads(n);
    outb(0x80, 2);
    wr32(PYKVM_IDENT_CONTROL, PYKVM_IDENT_CTL_TRAP_IDENT);
    outb(0x80, 3);
    uint64_t trapped = poll_reads(n);
    outb(0x80, 4);
    wr32(PYKVM_IDENT_CONTROL, 0);
    printf("bench: n=%u backed=%llu trapped=%llu ram=%llu\n", n, (unsigned long long)backed,
           (unsigned long long)trapped, (unsigned long long)ram);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    const char *cmd = bootinfo_cmdline(bi);
    if (!*cmd)
        cmd = "poll";
    printf("window-poll: %s\n", cmd);
    if (strcmp(cmd, "poll") == 0) {
        poll();
    } else if (strncmp(cmd, "reads", 5) == 0) {
        if (strcmp(cmd, "reads trapped") == 0)
            wr32(PYKVM_IDENT_CONTROL, PYKVM_IDENT_CTL_TRAP_IDENT);
        check_ident();
        poll_reads(NREADS);
        printf("reads: %u ok\n", NREADS);
    } else if (strcmp(cmd, "save") == 0) {
        save();
    } else if (strncmp(cmd, "bench ", 6) == 0) {
        bench(parse_uint(cmd + 6));
    } else {
        printf("FAIL unknown command line %s\n", cmd);
        exit_code(0x30);
    }
    exit_code(0x13);
}
