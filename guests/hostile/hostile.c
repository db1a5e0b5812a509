/*
 * hostile: a seeded guest that does what a buggy or malicious kernel might, to
 * show that pykvm survives it (tests/test_hostile_guest.py, scripts/fuzz_guest.py).
 *
 * --cmdline "KEY=VALUE ..." (every key optional):
 *   seed=N       xorshift64 seed (default 1); the same seed repeats the same run
 *   ops=N        random operations (default 100000)
 *   avoid=P+N,.. port ranges never touched (default: the ports that end the run:
 *                debug exit 0xf4+4, pvpanic 0x505+1, firmware trap 0x5f0+4, power-off 0x604+2)
 *   mmio=ADDR    one more MMIO base to aim at (e.g. a device the test added)
 *   scribble=0   leave the boot info alone (default 1: scribble its crash_info and fields)
 *   end=exit     exit code 0x21 (status 67) after the operations (default)
 *   end=trap     report a fake exception with a random stack pointer (pykvm: crash, 16)
 *   split        only the split-access check below, then exit 0x22 (status 69)
 *
 * Operations: port reads/writes of 1, 2, 4 bytes to random ports; MMIO reads/writes of
 * 1, 2, 4, 8 bytes at random (often unaligned, page-crossing) offsets from a few bases,
 * including one that straddles the end of RAM; rep ins/outs of 1, 2, 4 bytes with random
 * counts; and writes of random values over the boot info (crash_info_addr/len and the rest),
 * which the VMM reads when it writes a core. The local APIC and IOAPIC pages are never
 * touched (a guest that INITs itself is not news). Output: "hostile: seed=.. ops=..\n" at
 * the start and "hostile: done\n" before the exit.
 */
#include "rt.h"

#define MAX_AVOID 16
#define STRBUF 4096

static uint64_t rng;
static struct { uint32_t lo, hi; } avoid[MAX_AVOID] = {
    {0xf4, 0xf8}, {0x505, 0x506}, {0x5f0, 0x5f4}, {0x604, 0x606},
};
static unsigned n_avoid = 4;
static uint8_t strbuf[STRBUF] __attribute__((aligned(4096)));
static uint64_t bases[8];
static unsigned n_bases;
static char cmd[256];

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint64_t parse_num(const char **p)
{
    const char *s = *p;
    uint64_t v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        v = v * base + d;
    }
    *p = s;
    return v;
}

static int port_ok(uint32_t port, unsigned size)
{
    for (unsigned i = 0; i < n_avoid; i++)
        if (port < avoid[i].hi && avoid[i].lo < port + size)
            return 0;
    return 1;
}

static uint16_t random_port(unsigned size)
{
    for (;;) {
        uint32_t r = next();
        /* half the time near the devices pykvm has, else anywhere */
        uint32_t port = (r & 1) ? (0x500 + (r >> 8) % 0x200) : ((r >> 8) & 0xffff);
        if (port + size <= 0x10000 && port_ok(port, size))
            return port;
    }
}

static void port_op(void)
{
    uint64_t r = next();
    unsigned size = 1u << (r % 3);
    uint16_t port = random_port(size);
    uint32_t v = r >> 32;
    int write = (r >> 4) & 1;
    if (size == 1) {
        if (write) outb(port, v); else (void)inb(port);
    } else if (size == 2) {
        if (write) outw(port, v); else (void)inw(port);
    } else {
        if (write) outl(port, v); else (void)inl(port);
    }
}

static void string_op(void)
{
    uint64_t r = next();
    unsigned size = 1u << (r % 3);
    uint16_t port = random_port(size);
    /* mostly short strings; one in 32 fills a page (KVM hands those over a page at a time) */
    unsigned long count = 1 + (r >> 8) % (((r >> 40) & 31) ? 16 : STRBUF / size);
    void *buf = strbuf;
    if ((r >> 4) & 1) {
        if (size == 1) __asm__ volatile("cld; rep outsb" : "+S"(buf), "+c"(count) : "d"(port) : "memory");
        else if (size == 2) __asm__ volatile("cld; rep outsw" : "+S"(buf), "+c"(count) : "d"(port) : "memory");
        else __asm__ volatile("cld; rep outsl" : "+S"(buf), "+c"(count) : "d"(port) : "memory");
    } else {
        if (size == 1) __asm__ volatile("cld; rep insb" : "+D"(buf), "+c"(count) : "d"(port) : "memory");
        else if (size == 2) __asm__ volatile("cld; rep insw" : "+D"(buf), "+c"(count) : "d"(port) : "memory");
        else __asm__ volatile("cld; rep insl" : "+D"(buf), "+c"(count) : "d"(port) : "memory");
    }
}

static void mmio_op(void)
{
    uint64_t r = next();
    unsigned size = 1u << (r % 4);
    uint64_t a = bases[(r >> 2) % n_bases] + ((r >> 8) % 0x3000);
    if ((r >> 5) & 1)             /* often right at a page end, to cross it */
        a = (a | 0xfff) - ((r >> 20) % 8);
    uint64_t v = next();
    int write = (r >> 6) & 1;
    switch (size) {
    case 1: if (write) mmio_write8(a, v); else (void)mmio_read8(a); break;
    case 2: if (write) mmio_write16(a, v); else (void)mmio_read16(a); break;
    case 4: if (write) mmio_write32(a, v); else (void)mmio_read32(a); break;
    default: if (write) mmio_write64(a, v); else (void)mmio_read64(a); break;
    }
}

static void scribble(struct pykvm_boot_info *bi)
{
    uint64_t r = next();
    switch (r % 4) {
    case 0: bi->crash_info_addr = next(); break;
    case 1: bi->crash_info_len = next(); break;
    case 2: bi->crash_info_addr = (uint64_t)(uintptr_t)strbuf + (next() % STRBUF); break;
    default: ((volatile uint32_t *)bi)[(r >> 8) % (sizeof(*bi) / 4)] = next(); break;
    }
}

/* Accesses KVM hands over in fragments of 3, 5, 6 or 7 bytes. */
static RT_NORETURN void split(uint64_t ram_end)
{
    volatile uint8_t *tail = (volatile uint8_t *)(uintptr_t)(ram_end - 5);
    for (int i = 0; i < 5; i++)
        tail[i] = 0xa0 + i;
    uint64_t got = *(volatile uint64_t *)(uintptr_t)(ram_end - 5);   /* 5 bytes RAM, 3 unclaimed */
    printf("straddle read %#lx\n", (unsigned long)got);
    *(volatile uint64_t *)(uintptr_t)(ram_end - 1) = 0x1122334455667788ull;   /* 1 RAM, 7 MMIO */
    printf("straddle write ram byte %#x\n", tail[4]);
    uint64_t cross = *(volatile uint64_t *)(uintptr_t)0xd0000ffdull;  /* 3 + 5 bytes, both pages MMIO */
    printf("page-crossing read %#lx\n", (unsigned long)cross);
    *(volatile uint64_t *)(uintptr_t)0xd0001ffaull = 0;               /* 6 + 2 */
    uint32_t c32 = *(volatile uint32_t *)(uintptr_t)0xd0002ffeull;    /* 2 + 2 */
    printf("page-crossing read32 %#x\n", c32);
    printf("hostile: split ok\n");
    exit_code(0x22);
}

static RT_NORETURN void fake_trap(void)
{
    uint64_t rsp = next();
    __asm__ volatile("mov %0, %%rsp; outb %%al, %1; hlt" : : "r"(rsp), "Nd"((uint16_t)PYKVM_PORT_FW_TRAP), "a"(0));
    for (;;)
        ;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    const char *c = bootinfo_cmdline(bi);
    size_t n = strnlen(c, sizeof(cmd) - 1);
    memcpy(cmd, c, n);
    uint64_t ram_end = bootinfo_ram_size(bi);
    if (ram_end > PYKVM_MMIO_HOLE)
        ram_end = PYKVM_MMIO_HOLE;

    uint64_t seed = 1, ops = 100000;
    int do_scribble = 1, end_trap = 0, only_split = 0;
    bases[n_bases++] = 0xd0000000ull;
    bases[n_bases++] = PYKVM_IDENT_BASE;
    bases[n_bases++] = ram_end - 0x2000;          /* straddles the end of RAM */
    bases[n_bases++] = PYKVM_MMIO_HOLE;
    for (const char *p = cmd; *p;) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, "seed=", 5)) { p += 5; seed = parse_num(&p); }
        else if (!strncmp(p, "ops=", 4)) { p += 4; ops = parse_num(&p); }
        else if (!strncmp(p, "mmio=", 5)) { p += 5; if (n_bases < 8) bases[n_bases++] = parse_num(&p); }
        else if (!strncmp(p, "scribble=", 9)) { p += 9; do_scribble = parse_num(&p) != 0; }
        else if (!strncmp(p, "end=trap", 8)) { p += 8; end_trap = 1; }
        else if (!strncmp(p, "end=exit", 8)) { p += 8; }
        else if (!strncmp(p, "split", 5)) { p += 5; only_split = 1; }
        else if (!strncmp(p, "avoid=", 6)) {
            p += 6;
            n_avoid = 0;
            while (*p && *p != ' ' && n_avoid < MAX_AVOID) {
                uint32_t lo = parse_num(&p), len = 1;
                if (*p == '+') { p++; len = parse_num(&p); }
                avoid[n_avoid].lo = lo;
                avoid[n_avoid++].hi = lo + len;
                if (*p == ',') p++; else break;
            }
        } else if (*p) {
            while (*p && *p != ' ')
                p++;
        }
    }
    rng = seed ? seed : 1;
    if (only_split)
        split(ram_end);
    printf("hostile: seed=%lu ops=%lu\n", (unsigned long)seed, (unsigned long)ops);
    for (uint64_t i = 0; i < ops; i++) {
        uint64_t r = next() % 16;
        if (r < 7)
            port_op();
        else if (r < 13)
            mmio_op();
        else if (r < 15)
            string_op();
        else if (do_scribble)
            scribble(bi);
    }
    /* the random writes may have left the UART in loopback or DLAB mode: make it a UART again */
    outb(PYKVM_PORT_COM1 + 3, 0x03);
    outb(PYKVM_PORT_COM1 + 1, 0x00);
    outb(PYKVM_PORT_COM1 + 4, 0x03);
    if (end_trap)
        fake_trap();
    printf("hostile: done\n");
    exit_code(0x21);
}
