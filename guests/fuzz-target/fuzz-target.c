/*
 * fuzz-target: the bundled target for `pykvm fuzz` (and AFL++ through it).
 *
 * Each input is a sequence of records; two planted bugs:
 *  - a command record 'C' whose text starts "PYKVM!" (a multi-byte comparison
 *    chain, one branch per byte, so coverage leads the fuzzer on) writes
 *    through a NULL pointer: a page fault (page 0 is unmapped);
 *  - a data record 'R' t n bytes... is copied into slot t & 3 of a table of
 *    32-byte slots without checking n against the slot (nor against the
 *    input's end): a malformed length (more than the slots left after slot
 *    t & 3 hold) overwrites the handler table that follows, and the call
 *    through it faults (#PF at 0 when the bytes were zeros, #GP otherwise).
 * The command word is declared as a dictionary token (FUZZ_TOKEN), as a
 * parser's author would list it: AFL++ gets it through the forkserver.
 * Other inputs run to completion ("done").
 *
 * With the command line "hostile" more records let an input attack the
 * machine itself, for the tests that reset after it (tests/test_fuzz.py):
 * 'W' addr(8) value(8) stores anywhere (page tables, IDT, GDT, the stack),
 * 'O' port(2) value(1) writes any I/O port (devices, the fuzz port itself),
 * 'I' limit(2) base(8) loads an IDT, 'M' msr(4) value(8) writes an MSR,
 * 'T' n sets the task priority (CR8, the LAPIC's TPR) to n & 15, and 'L'
 * spins forever (a hang).
 *
 * Serial output: "fuzz-target: ready (driven)\n" or "(standalone)\n" before the
 * snapshot. Without a driver it runs one empty input and powers off.
 */
#include "rt.h"

#define INPUT_SIZE 65536

static struct {
    struct pykvm_fuzz_input hdr;
    uint8_t data[INPUT_SIZE];
} input __attribute__((aligned(4096)));

typedef uint32_t (*handler_t)(const uint8_t *rec, uint32_t n);

static uint32_t sum_handler(const uint8_t *rec, uint32_t n)
{
    uint32_t s = 0;
    for (uint32_t i = 0; i < n && i < 32; i++)
        s += rec[i];
    return s;
}

static uint32_t xor_handler(const uint8_t *rec, uint32_t n)
{
    uint32_t s = 0;
    for (uint32_t i = 0; i < n && i < 32; i++)
        s ^= (uint32_t)rec[i] << (i & 7);
    return s;
}

static struct {
    uint8_t slot[4][32];
    handler_t handlers[4];
} table = { .handlers = { sum_handler, xor_handler, sum_handler, xor_handler } };

/* The command word, as the parser's author would list it for the fuzzer: AFL++
 * receives it as a dictionary token (pykvm fuzz sends it at the handshake). */
FUZZ_TOKEN(command_word, "PYKVM!");

static volatile uint32_t sink;
static int hostile;

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void command(const uint8_t *p, uint32_t n)
{
    if (n >= 6 && p[0] == 'P')
        if (p[1] == 'Y')
            if (p[2] == 'K')
                if (p[3] == 'V')
                    if (p[4] == 'M')
                        if (p[5] == '!')
                            *(volatile uint32_t *)(uintptr_t)0 = 0xdead;   /* planted bug 1 */
    sink += n;
}

static void record(uint8_t t, const uint8_t *p, uint32_t n)
{
    uint8_t *slot = table.slot[t & 3];
    for (uint32_t i = 0; i < n; i++)          /* planted bug 2: n is never checked against 32 */
        slot[i] = p[i];
    sink += table.handlers[t & 3](slot, n);
}

static void run(const uint8_t *p, uint32_t len)
{
    uint32_t at = 0;
    while (at < len) {
        uint8_t kind = p[at++];
        if (kind == 'C') {
            if (at >= len)
                return;
            uint32_t n = p[at++];
            if (n > len - at)
                n = len - at;
            command(p + at, n);
            at += n;
        } else if (kind == 'R') {
            if (len - at < 2)
                return;
            uint8_t t = p[at], n = p[at + 1];
            at += 2;
            record(t, p + at, n);       /* n may run past the input: the buffer's rest reads as zeros */
            if (n > len - at)
                return;
            at += n;
        } else if (kind == 'N') {
            sink++;
        } else if (hostile && kind == 'W' && len - at >= 16) {
            *(volatile uint64_t *)(uintptr_t)rd64(p + at) = rd64(p + at + 8);
            at += 16;
        } else if (hostile && kind == 'O' && len - at >= 3) {
            outb((uint16_t)(p[at] | p[at + 1] << 8), p[at + 2]);
            at += 3;
        } else if (hostile && kind == 'I' && len - at >= 10) {
            struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr;
            idtr.limit = (uint16_t)(p[at] | p[at + 1] << 8);
            idtr.base = rd64(p + at + 2);
            __asm__ volatile("lidt %0" : : "m"(idtr));
            at += 10;
        } else if (hostile && kind == 'M' && len - at >= 12) {
            uint32_t msr = (uint32_t)rd64(p + at);
            uint64_t v = rd64(p + at + 4);
            __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
            at += 12;
        } else if (hostile && kind == 'T' && len - at >= 1) {
            uint64_t tpr = p[at] & 15;
            __asm__ volatile("mov %0, %%cr8" : : "r"(tpr));
            at += 1;
        } else if (hostile && kind == 'L') {
            for (;;)
                sink++;
        } else {
            return;
        }
    }
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    if (page_unmap((void *)0))
        panic("cannot unmap page 0");
    hostile = strcmp(bootinfo_cmdline(bi), "hostile") == 0;
    int driven = fuzz_setup(&input.hdr, INPUT_SIZE);
    if (driven < 0)
        panic("input buffer not mapped");
    printf("fuzz-target: ready (%s)\n", driven ? "driven" : "standalone");
    fuzz_snapshot();
    uint32_t len = input.hdr.len < INPUT_SIZE ? input.hdr.len : INPUT_SIZE;
    run(input.data, len);
    fuzz_done();
    poweroff();
}
