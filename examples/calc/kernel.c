/*
 * calc: a tiny freestanding x86-64 kernel, booted by pykvm (its own 64-bit ELF
 * protocol: long mode, paging on, RDI = boot info). It talks over COM1:
 *
 *     calc: ready, cpus=<N> ram=<MiB>M
 *     calc> add 2 40          ->  = 42
 *     calc> mul 6 7           ->  = 42
 *     calc> exit 3            ->  pykvm exits with status (3 << 1) | 1 = 7
 *     calc> off               ->  power-off, status 0
 *     calc> crash             ->  writes through a bad pointer: a page fault pykvm catches
 */
#include <stdint.h>

#define COM1        0x3f8
#define LSR         5           /* line status: bit 0 data ready, bit 5 transmitter empty */
#define DEBUG_EXIT  0xf4        /* isa-debug-exit: the run ends with status (v << 1) | 1 */
#define POWEROFF    0x604       /* a 16-bit write of 0x2000 powers off (status 0) */

struct boot_info {              /* the first fields of pykvm's struct pykvm_boot_info */
    uint32_t magic, version, size, nr_cpus;
    uint64_t cmdline_addr;
    uint32_t cmdline_len, nr_mmap;
    uint64_t ram_top;
};

volatile uint64_t commands_run; /* tests read it from guest memory */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc(char c)
{
    while (!(inb(COM1 + LSR) & 0x20))
        ;
    outb(COM1, (uint8_t)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void putu(uint64_t v)
{
    char buf[21];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

static int getc(void)
{
    /* Each status read is a VM exit: poll gently while no input is waiting. */
    while (!(inb(COM1 + LSR) & 0x01))
        for (volatile int i = 0; i < 20000; i++)
            __asm__ volatile("pause");
    return inb(COM1);
}

static int read_line(char *buf, int size)
{
    int n = 0;
    for (;;) {
        int c = getc();
        if (c == '\n' || c == '\r')
            break;
        if (n < size - 1)
            buf[n++] = (char)c;
    }
    buf[n] = 0;
    return n;
}

static const char *word(const char *s, const char *w)
{
    while (*w && *s == *w)
        s++, w++;
    return *w || (*s && *s != ' ') ? 0 : s;
}

static const char *number(const char *s, uint64_t *out)
{
    while (*s == ' ')
        s++;
    if (*s < '0' || *s > '9')
        return 0;
    uint64_t v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (uint64_t)(*s++ - '0');
    *out = v;
    return s;
}

__attribute__((noinline)) static void do_crash(void)
{
    puts("crashing on purpose\n");
    *(volatile uint64_t *)0xdead0000000ull = commands_run;  /* above 4 GiB: not mapped */
}

static void run(const char *line)
{
    const char *rest;
    uint64_t a, b;
    commands_run++;
    if ((rest = word(line, "add")) && (rest = number(rest, &a)) && number(rest, &b)) {
        puts("= "), putu(a + b), putc('\n');
    } else if ((rest = word(line, "mul")) && (rest = number(rest, &a)) && number(rest, &b)) {
        puts("= "), putu(a * b), putc('\n');
    } else if ((rest = word(line, "exit")) && number(rest, &a)) {
        outb(DEBUG_EXIT, (uint8_t)a);
    } else if (word(line, "off")) {
        outw(POWEROFF, 0x2000);
    } else if (word(line, "crash")) {
        do_crash();
    } else {
        puts("error: unknown command: "), puts(line), putc('\n');
    }
}

void kmain(struct boot_info *bi)
{
    char line[80];
    puts("calc: ready, cpus="), putu(bi->nr_cpus);
    puts(" ram="), putu(bi->ram_top >> 20), puts("M\n");
    for (;;) {
        puts("calc> ");
        read_line(line, sizeof(line));
        run(line);
    }
}
