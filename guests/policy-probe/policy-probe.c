/*
 * policy-probe: tries every register of the DMA engine (PYKVM_PORT_DMA, layout
 * in pykvm_abi.h, policy in pykvm/devices/dma.toml) and a few offsets no
 * register covers, and prints one line per probe with what it read back. The
 * same binary runs under `--trust trusted` and `--trust untrusted`; its output
 * differs exactly where the policy says (tests/test_policy_guest.py holds the
 * table). Addresses are printed symbolically: SRC and DST are the guest-
 * physical addresses of its two 8 KiB buffers.
 *
 * Expected output, exact bytes; "T | U" marks a value that differs between
 * trusted and untrusted:
 *
 *     policy-probe: start
 *     src_lo: w32 SRC -> SRC
 *     src_hi: w32 0x0 -> 0x0
 *     dst_lo: w32 DST -> DST
 *     dst_hi: w32 0x0 -> 0x0
 *     len: w32 0x1800 -> 0x1800 | 0x1000            (untrusted: clamped to one page)
 *     ctrl: w32 0x506 -> 0x506 | 0x0                (untrusted: ENABLE, IRQ_EN, line masked off)
 *     status: r32 -> 0x0
 *     scratch: w32 0x5a5a1234 -> 0x5a5a1234
 *     scratch+2: r16 -> 0x5a5a                      (a narrower access inside a register)
 *     unlisted+0x24: w32 0x1234 -> 0xffffffff       (no register: denied)
 *     unlisted+0x2f: w8 0x77 -> 0xff
 *     straddle+0x22: r32 -> 0xffffffff              (crosses scratch's end: denied)
 *     reset: r32 -> 0xffffffff                      (write-only register)
 *     status: w32 0x3 -> 0x0                        (read-only register)
 *     ctrl: w32 0x507 (start)
 *     status: r32 -> 0x1 | 0x102                    (done | error: engine disabled)
 *     copy: 6144 | 0 bytes copied
 *     ctrl: r32 -> 0x506 | 0x0
 *     src_lo: w32 0xd0000000 -> 0xd0000000
 *     ctrl: w32 0x503 (start)
 *     status: r32 -> 0x202 | 0x102                  (error: source not RAM | engine disabled)
 *     copy: 0 bytes copied
 *     src_hi+1: w8 0xab -> 0xab00
 *     reset: w32 0x1
 *     src_lo: r32 -> 0x0 | 0xd0000000              (untrusted: reset refused; SRC reads the shadow)
 *     len: r32 -> 0x0 | 0x1000
 *     ctrl: r32 -> 0x0
 *     scratch: r32 -> 0x0 | 0x5a5a1234
 *     len: w16 0x20 -> 0x20 | 0x1000               (untrusted: partial write to a clamped register)
 *     policy-probe: done
 *
 * then power-off (status 0).
 */
#include "rt.h"

#define DMA PYKVM_PORT_DMA
#define BUF 8192

static uint8_t src_buf[BUF] __attribute__((aligned(4096)));
static uint8_t dst_buf[BUF] __attribute__((aligned(4096)));
static uint32_t pa_src, pa_dst;

static const char *sym(uint32_t v, char *buf, size_t n)
{
    if (v == pa_src && v)
        return "SRC";
    if (v == pa_dst && v)
        return "DST";
    snprintf(buf, n, "0x%x", v);
    return buf;
}

static uint32_t in_n(unsigned off, int bits)
{
    if (bits == 8)
        return inb(DMA + off);
    if (bits == 16)
        return inw(DMA + off);
    return inl(DMA + off);
}

static void out_n(unsigned off, int bits, uint32_t v)
{
    if (bits == 8)
        outb(DMA + off, v);
    else if (bits == 16)
        outw(DMA + off, v);
    else
        outl(DMA + off, v);
}

/* write at woff, then read back the register at roff (the line shows the written width only) */
static void probe_wr_at(const char *name, unsigned woff, int wbits, uint32_t v, unsigned roff, int rbits)
{
    char a[16], b[16];
    out_n(woff, wbits, v);
    uint32_t r = in_n(roff, rbits);
    printf("%s: w%d %s -> %s\n", name, wbits, sym(v, a, sizeof a), sym(r, b, sizeof b));
}

/* write, then read back at the same offset and width */
static void probe_wr(const char *name, unsigned off, int bits, uint32_t v)
{
    probe_wr_at(name, off, bits, v, off, bits);
}

static uint32_t probe_r(const char *name, unsigned off, int bits)
{
    char b[16];
    uint32_t r = in_n(off, bits);
    printf("%s: r%d -> %s\n", name, bits, sym(r, b, sizeof b));
    return r;
}

static void start(uint32_t ctrl)
{
    memset(dst_buf, 0, BUF);
    outl(DMA + PYKVM_DMA_CTRL, ctrl);
    printf("ctrl: w32 0x%x (start)\n", ctrl);
    probe_r("status", PYKVM_DMA_STATUS, 32);
    unsigned same = 0;
    for (unsigned i = 0; i < BUF; i++)
        same += ((volatile uint8_t *)dst_buf)[i] == src_buf[i];
    printf("copy: %u bytes copied\n", same);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    for (unsigned i = 0; i < BUF; i++)
        src_buf[i] = (uint8_t)(i % 255 + 1);    /* never 0: a zeroed byte is an uncopied one */
    uint64_t s = va_to_pa(src_buf), d = va_to_pa(dst_buf);
    if (s >> 32 || d >> 32)
        panic("buffers above 4 GiB");
    pa_src = (uint32_t)s;
    pa_dst = (uint32_t)d;

    printf("policy-probe: start\n");
    probe_wr("src_lo", PYKVM_DMA_SRC_LO, 32, pa_src);
    probe_wr("src_hi", PYKVM_DMA_SRC_HI, 32, 0);
    probe_wr("dst_lo", PYKVM_DMA_DST_LO, 32, pa_dst);
    probe_wr("dst_hi", PYKVM_DMA_DST_HI, 32, 0);
    probe_wr("len", PYKVM_DMA_LEN, 32, 0x1800);
    probe_wr("ctrl", PYKVM_DMA_CTRL, 32, (5 << PYKVM_DMA_CTRL_IRQ_SHIFT) | PYKVM_DMA_CTRL_IRQ_EN | PYKVM_DMA_CTRL_ENABLE);
    probe_r("status", PYKVM_DMA_STATUS, 32);
    probe_wr("scratch", PYKVM_DMA_SCRATCH, 32, 0x5a5a1234);
    probe_r("scratch+2", PYKVM_DMA_SCRATCH + 2, 16);
    probe_wr("unlisted+0x24", 0x24, 32, 0x1234);
    probe_wr("unlisted+0x2f", 0x2f, 8, 0x77);
    probe_r("straddle+0x22", 0x22, 32);
    probe_r("reset", PYKVM_DMA_RESET, 32);
    probe_wr("status", PYKVM_DMA_STATUS, 32, 0x3);

    start((5 << PYKVM_DMA_CTRL_IRQ_SHIFT) | PYKVM_DMA_CTRL_IRQ_EN | PYKVM_DMA_CTRL_ENABLE | PYKVM_DMA_CTRL_START);
    probe_r("ctrl", PYKVM_DMA_CTRL, 32);
    probe_wr("src_lo", PYKVM_DMA_SRC_LO, 32, 0xd0000000);   /* the MMIO hole: not RAM */
    start((5 << PYKVM_DMA_CTRL_IRQ_SHIFT) | PYKVM_DMA_CTRL_ENABLE | PYKVM_DMA_CTRL_START);
    probe_wr_at("src_hi+1", PYKVM_DMA_SRC_HI + 1, 8, 0xab, PYKVM_DMA_SRC_HI, 32);

    outl(DMA + PYKVM_DMA_RESET, 1);
    printf("reset: w32 0x1\n");
    probe_r("src_lo", PYKVM_DMA_SRC_LO, 32);
    probe_r("len", PYKVM_DMA_LEN, 32);
    probe_r("ctrl", PYKVM_DMA_CTRL, 32);
    probe_r("scratch", PYKVM_DMA_SCRATCH, 32);
    probe_wr_at("len", PYKVM_DMA_LEN, 16, 0x20, PYKVM_DMA_LEN, 32);
    printf("policy-probe: done\n");
    poweroff();
}
