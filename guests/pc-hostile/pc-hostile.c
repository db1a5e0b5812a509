/*
 * pc-hostile: a guest that attacks pykvm's PC platform models: QEMU's edu over PCI, the Intel IOMMU,
 * the userspace I/O APIC, the 8254 PIT, the CMOS RTC, ACPI PM and pc-testdev's IRQ lines
 * (tests/test_pc_hostile_guest.py). Run it with
 *   --device edu --device intel-iommu --device pit --device rtc --device acpi-pm --device pc-testdev-irq
 * (the PCI host and the I/O APIC come with them). The first word of --cmdline is the mode:
 *
 *   msi-nonram  the edu's MSI aimed at 0xd0000000 (neither the APIC window nor RAM) and a DMA past
 *               the end of RAM: both are dropped (master abort), and the edu's PCI status says
 *               so (Received Master Abort, write 1 to clear)
 *               -> "pc-hostile: msi-nonram ok, master abort 1 1\n"
 *   msi-nobody  with the LAPIC software-disabled, interrupts no LAPIC accepts (lowest priority and
 *               redirection hint, logical destination 0xff): the edu's MSI, a pc-testdev line, the
 *               PIT and the RTC through the I/O APIC, the IOMMU's fault and completion events. Then
 *               the LAPIC is enabled, the PIT and the RTC routed to it, and both must still tick.
 *               Without an edu or an IOMMU, their parts are left out.
 *               -> "pc-hostile: msi-nobody ok, pit ticks, rtc ticks\n"
 *   bar-walk    moves the edu's BAR0 through every 1 MiB-aligned base below 4 GiB, then back
 *               -> "pc-hostile: bar-walk 4095 moves, edu ok\n"
 *   fuzz seed=N ops=N   N random operations on every register of those devices and on PCI
 *               configuration space, with guest tables full of random words (pointers aimed at a
 *               scratch area or beyond RAM, never at the guest itself). Interrupts stay off; MSIs
 *               and redirection entries only ever carry fixed or lowest-priority delivery, and
 *               ACPI PM never gets SLP_EN, so the guest cannot INIT, NMI or power itself off.
 *               -> "pc-hostile: fuzz seed=N ops=N\n" ... "pc-hostile: fuzz done\n"
 *
 * Every mode ends with exit_code(0x23) (status 71). A check that fails prints
 * "pc-hostile: <what> failed" and exits with code 3 (status 7); no edu: code 4; unknown mode: code 2.
 * RAM must stay below 192 MiB: the edu's 28-bit DMA needs bus addresses past RAM to aim at.
 */
#include "rt.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc
#define EDU_VENDOR_DEVICE 0x11e81234u
#define EDU_BUF 0x40000
#define VTD_BASE 0xfed90000ul
#define IOAPIC_BASE 0xfec00000ul
#define PM_BASE 0x600
#define PM_TMR (PM_BASE + 8)
#define PM_HZ 3579545u
#define TESTDEV_IRQ(n) (0x2000 + (n))
#define DONE 0x23

/* VT-d registers */
#define GCMD 0x18
#define GSTS 0x1c
#define FSTS 0x34
#define FECTL 0x38
#define FEDATA 0x3c
#define FEADDR 0x40
#define IQT 0x88
#define IQA 0x90
#define IECTL 0xa0
#define IEDATA 0xa4
#define IEADDR 0xa8
#define QIE (1u << 26)
#define IQE (1u << 4)

/* an interrupt no LAPIC takes while every LAPIC is software-disabled */
#define NOBODY_ADDR 0xfeeff00cu         /* logical destination 0xff, redirection hint */
#define NOBODY_DATA 0x0140u             /* lowest priority, vector 0x40 */
#define PIT_VECTOR 0x50
#define RTC_VECTOR 0x51
#define STATUS_MASTER_ABORT (1u << 29)   /* in the dword at 0x04: status bit 13 */

static uint64_t scratch[8192] __attribute__((aligned(4096)));     /* 64 KiB of tables for the IOMMU */
static uint64_t queue[512] __attribute__((aligned(4096)));
static volatile uint8_t *edu;
static unsigned edu_devfn;
static uint32_t edu_bar;
static uint64_t ram_size;
static uint64_t rng = 1;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint32_t cfg_read(unsigned devfn, unsigned reg)
{
    outl(PCI_ADDR, 0x80000000u | (devfn << 8) | (reg & 0xfc));
    return inl(PCI_DATA);
}

static void cfg_write(unsigned devfn, unsigned reg, uint32_t v)
{
    outl(PCI_ADDR, 0x80000000u | (devfn << 8) | (reg & 0xfc));
    outl(PCI_DATA, v);
}

static uint32_t edu_r(unsigned reg) { return *(volatile uint32_t *)(edu + reg); }
static void edu_w(unsigned reg, uint32_t v) { *(volatile uint32_t *)(edu + reg) = v; }
static void edu_wq(unsigned reg, uint64_t v) { *(volatile uint64_t *)(edu + reg) = v; }
static uint32_t vtd_r(unsigned reg) { return *(volatile uint32_t *)(VTD_BASE + reg); }
static void vtd_w(unsigned reg, uint32_t v) { *(volatile uint32_t *)(VTD_BASE + reg) = v; }
static void vtd_wq(unsigned reg, uint64_t v) { *(volatile uint64_t *)(VTD_BASE + reg) = v; }

static void ioapic_write(uint32_t reg, uint32_t v)
{
    volatile uint32_t *io = (volatile uint32_t *)IOAPIC_BASE;
    io[0] = reg;
    io[4] = v;
}

static void ioapic_route(unsigned pin, uint32_t low, uint32_t high)
{
    ioapic_write(0x10 + 2 * pin + 1, high);
    ioapic_write(0x10 + 2 * pin, low);
}

RT_NORETURN static void fail(const char *what)
{
    printf("pc-hostile: %s failed\n", what);
    exit_code(3);
}

static void find_edu(int required)
{
    for (unsigned devfn = 0; devfn < 256; devfn += 8) {
        if (cfg_read(devfn, 0) == EDU_VENDOR_DEVICE) {
            edu_devfn = devfn;
            edu_bar = cfg_read(devfn, 0x10) & ~0xfu;
            edu = (volatile uint8_t *)(uintptr_t)edu_bar;
            cfg_write(devfn, 0x04, 0x6);                    /* memory decode, bus master */
            if (edu_r(0) != 0x010000ed)
                fail("edu identification");
            return;
        }
    }
    if (!required)
        return;
    printf("pc-hostile: no edu\n");
    exit_code(4);
}

static void edu_msi(uint32_t address, uint16_t data)
{
    unsigned cap = cfg_read(edu_devfn, 0x34) & 0xff;
    cfg_write(edu_devfn, cap + 4, address);
    cfg_write(edu_devfn, cap + 8, 0);
    cfg_write(edu_devfn, cap + 12, data);
    cfg_write(edu_devfn, cap, cfg_read(edu_devfn, cap) | (1u << 16));
}

static void edu_dma(uint64_t src, uint64_t dst, uint64_t count, uint32_t cmd)
{
    edu_wq(0x80, src);
    edu_wq(0x88, dst);
    edu_wq(0x90, count);
    edu_w(0x98, cmd);
}

static void lapic_software(int on)
{
    uint32_t svr = lapic_read(LAPIC_SVR);
    lapic_write(LAPIC_SVR, on ? (svr | 0x100 | LAPIC_SPURIOUS_VECTOR) : (svr & ~0x100u));
}

static uint32_t master_abort(void)
{
    uint32_t seen = !!(cfg_read(edu_devfn, 0x04) & STATUS_MASTER_ABORT);
    cfg_write(edu_devfn, 0x04, STATUS_MASTER_ABORT | 0x6);     /* write 1 to clear, keep the command */
    if (cfg_read(edu_devfn, 0x04) & STATUS_MASTER_ABORT)
        fail("clearing master abort");
    return seen;
}

/* ------------------------------------------------------------------ msi-nonram */
static void msi_nonram(void)
{
    edu_msi(0xd0000000u, 0x1234);
    edu_w(0x60, 1);                                   /* the MSI: a memory write nothing decodes */
    uint32_t msi = master_abort();
    edu_w(0x64, 1);
    edu_dma(EDU_BUF, ram_size + 0x100000, 16, 1 | 2);   /* buffer -> past the end of RAM */
    uint32_t dma = master_abort();
    if (edu_r(0) != 0x010000ed)
        fail("edu after the aborts");
    printf("pc-hostile: msi-nonram ok, master abort %u %u\n", msi, dma);
}

/* ------------------------------------------------------------------ msi-nobody */
static volatile uint32_t pit_ticks, rtc_ticks;

void pit_irq(void)
{
    pit_ticks++;
    lapic_eoi();
}

void rtc_irq(void)
{
    outb(0x70, 0x0c);
    (void)inb(0x71);                                  /* reading register C lowers IRQ 8 */
    rtc_ticks++;
    lapic_eoi();
}
RT_IRQ_HANDLER(pit_entry, pit_irq);
RT_IRQ_HANDLER(rtc_entry, rtc_irq);

static void pm_wait(uint32_t ms)
{
    uint32_t start = inl(PM_TMR);
    while (inl(PM_TMR) - start < PM_HZ / 1000 * ms)
        cpu_relax();
}

static void pit_start(void)
{
    outb(0x43, 0x34);                                 /* counter 0, low then high byte, mode 2 */
    outb(0x40, 11932 & 0xff);                         /* 100 Hz */
    outb(0x40, 11932 >> 8);
}

static void rtc_start(void)
{
    outb(0x70, 0x0a);
    outb(0x71, 0x2b);                                 /* 32.768 kHz divider, rate 11: 32 Hz */
    outb(0x70, 0x0b);
    outb(0x71, 0x42);                                 /* periodic interrupt on, 24-hour */
    outb(0x70, 0x0c);
    (void)inb(0x71);
}

/* the IOMMU's fault event (a queue tail past the queue) and its completion event (a wait descriptor) */
static void iommu_events(void)
{
    vtd_w(FEDATA, NOBODY_DATA);
    vtd_w(FEADDR, NOBODY_ADDR);
    vtd_w(FECTL, 0);
    vtd_wq(IQA, va_to_pa(queue));
    vtd_w(GCMD, QIE);
    while (!(vtd_r(GSTS) & QIE))
        cpu_relax();
    vtd_wq(IQT, 0x7fff0);
    if (!(vtd_r(FSTS) & IQE))
        fail("queue error");
    vtd_w(FSTS, IQE);
    vtd_w(IEDATA, NOBODY_DATA);
    vtd_w(IEADDR, NOBODY_ADDR);
    vtd_w(IECTL, 0);
    queue[0] = 5 | (1u << 4);                         /* invalidation wait, interrupt on completion */
    queue[1] = 0;
    vtd_wq(IQT, 1 << 4);
}

/* Without an edu or an IOMMU their parts are left out: the timers alone show a thread outliving them. */
static void msi_nobody(void)
{
    uint32_t nobody_lo = 0x40 | (1u << 8) | (1u << 11);    /* lowest priority, logical */
    lapic_software(0);
    if (edu) {                                        /* the edu's MSI */
        edu_msi(NOBODY_ADDR, NOBODY_DATA);
        edu_w(0x60, 1);
        edu_w(0x64, 1);
    }
    /* a pc-testdev line, edge then level */
    ioapic_route(14, nobody_lo, 0xffu << 24);
    outb(TESTDEV_IRQ(14), 1);
    outb(TESTDEV_IRQ(14), 0);
    ioapic_route(14, nobody_lo | (1u << 15), 0xffu << 24);
    outb(TESTDEV_IRQ(14), 1);
    outb(TESTDEV_IRQ(14), 0);
    ioapic_route(14, 1u << 16, 0);
    if (vtd_r(0) == 0x10)
        iommu_events();
    /* the PIT and the RTC through the I/O APIC, from their own threads */
    ioapic_route(2, nobody_lo, 0xffu << 24);
    ioapic_route(8, nobody_lo, 0xffu << 24);
    pit_start();
    rtc_start();
    pm_wait(200);
    /* now a LAPIC that takes them: both timers must still be running */
    idt_set_handler(PIT_VECTOR, pit_entry);
    idt_set_handler(RTC_VECTOR, rtc_entry);
    /* routes first: a tick the old route sends once the LAPIC is enabled would be taken at vector 0x40 */
    ioapic_route(2, PIT_VECTOR, 0);
    ioapic_route(8, RTC_VECTOR, 0);
    lapic_software(1);
    outb(0x70, 0x0c);
    (void)inb(0x71);
    sti();
    for (int i = 0; i < 300 && (pit_ticks < 5 || rtc_ticks < 3); i++)
        pm_wait(10);
    cli();
    if (pit_ticks < 5)
        fail("pit after undeliverable interrupts");
    if (rtc_ticks < 3)
        fail("rtc after undeliverable interrupts");
    printf("pc-hostile: msi-nobody ok, pit ticks, rtc ticks\n");
}

/* ------------------------------------------------------------------ bar-walk */
static void bar_walk(void)
{
    unsigned moves = 0;
    for (uint32_t base = 0x100000; base; base += 0x100000) {
        cfg_write(edu_devfn, 0x10, base);
        moves++;
    }
    cfg_write(edu_devfn, 0x10, edu_bar);
    if (edu_r(0) != 0x010000ed)
        fail("edu after the walk");
    printf("pc-hostile: bar-walk %u moves, edu ok\n", moves);
}

/* ------------------------------------------------------------------ fuzz */
/* A word for the IOMMU's tables and pointers: into the scratch area, far beyond RAM, or random
 * with bit 38 set (so it never names guest RAM, whatever width the model reads). */
static uint64_t word(void)
{
    uint64_t r = next();
    uint64_t base = va_to_pa(scratch);
    switch (r & 3) {
    case 0: return (base + (((r >> 8) % sizeof(scratch)) & ~7ull)) | ((r >> 4) & 7);
    case 1: return (base + (((r >> 8) % sizeof(scratch)) & ~0xfffull)) | (r >> 52);
    case 2: return (1ull << 38) | next();
    default: return (ram_size + ((r >> 8) & 0xfffffff)) | (r >> 60);
    }
}

static void fill_scratch(unsigned from, unsigned n)
{
    for (unsigned i = from; i < from + n && i < 8192; i++) {
        uint64_t w = word();
        if (!(i & 1))
            w &= ~0xc0ull;      /* an IRTE's delivery mode stays fixed or lowest priority */
        scratch[i] = w;
    }
}

/* a value safe for a write of `size` bytes at `off` that may cover a 16-bit MSI data field at `guard` */
static uint64_t safe_data(uint64_t v, unsigned off, unsigned size, unsigned guard)
{
    unsigned hi = guard + 1;                          /* the byte holding delivery mode bits 8-10 */
    if (off <= hi && hi < off + size)
        v &= ~(7ull << (8 * (hi - off)));
    return v;
}

static uint32_t msi_address(void)
{
    uint64_t r = next();
    switch (r & 3) {
    case 0: return 0xfee00000u | (uint32_t)((r >> 8) & 0xff00c);  /* any destination, RH, DM */
    case 1: return 0xd0000000u;
    case 2: return (uint32_t)va_to_pa(scratch) + ((r >> 8) & 0xffc);
    default: return ((uint32_t)(r >> 32) | 0x80000000u) & ~3u;   /* above RAM, maybe a device */
    }
}

/* a bus address that is never the guest's own RAM: the scratch area, or past RAM within the edu's 28 bits */
static uint64_t edu_bus_address(void)
{
    uint64_t r = next();
    if (r & 1)                                        /* room for the longest transfer (8 KiB) before its end */
        return va_to_pa(scratch) + ((r >> 8) % (sizeof(scratch) - 0x2000));
    return ram_size + ((r >> 8) % (0x10000000 - ram_size));
}

/* One DMA: source, destination, count and command always together, so that an address meant for
 * the buffer side never becomes the bus side of a later command. */
static void edu_random_dma(void)
{
    uint64_t r = next();
    uint64_t local = EDU_BUF + ((r >> 8) & 0x1fff) - 0x800;         /* around the 4 KiB buffer */
    uint64_t count = (r >> 4) & 1 ? (r >> 24) & 0x1fff : next();
    if ((r >> 5) & 1)
        local = next();
    int from_device = (r >> 6) & 1;
    uint64_t bus = edu_bus_address();
    edu_dma(from_device ? local : bus, from_device ? bus : local, count, 1 | (from_device ? 2 : 0) | ((r >> 7) & 4));
}

static void fuzz_edu(void)
{
    uint64_t r = next();
    unsigned off;
    if (!edu)
        return;
    switch (r % 9) {
    case 0: case 1: case 2: edu_random_dma(); return;
    case 3: edu_w(0x60, (uint32_t)(r >> 8)); return;
    case 4: edu_w(0x64, (uint32_t)(r >> 8)); return;
    case 5: edu_w(0x08, (r >> 8) & 63); return;
    case 6: edu_w(0x20, (uint32_t)(r >> 8)); return;
    default:
        off = (r >> 8) & 0x1ff;                        /* any offset, any width; DMA registers read only */
        int write = (r >> 22) & 1 && (off < 0x80 || off >= 0xa0);
        uintptr_t a = (uintptr_t)edu + off;
        switch ((r >> 20) & 3) {
        case 0: if (write) mmio_write8(a, next()); else (void)mmio_read8(a); return;
        case 1: if (write) mmio_write16(a, next()); else (void)mmio_read16(a); return;
        case 2: if (write) mmio_write32(a, next()); else (void)mmio_read32(a); return;
        default: if (write) mmio_write64(a, next()); else (void)mmio_read64(a); return;
        }
    }
}

static void fuzz_config(void)
{
    uint64_t r = next();
    unsigned devfn = (r & 3) ? edu_devfn : ((r & 4) ? 0 : (r >> 8) & 0xf8);
    unsigned reg = (r >> 16) & 0xff, size = 1u << ((r >> 24) % 3);
    unsigned cap = 0x40;
    reg &= ~(size - 1);
    if ((r >> 28) & 1) {
        /* a read, sometimes through any CONFIG_ADDRESS (another bus, the enable bit clear) */
        outl(PCI_ADDR, (r >> 30) & 1 ? (uint32_t)next() : 0x80000000u | (devfn << 8) | (reg & 0xfc));
        if (size == 1) (void)inb(PCI_DATA + (reg & 3));
        else if (size == 2) (void)inw(PCI_DATA + (reg & 2));
        else (void)inl(PCI_DATA);
        return;
    }
    uint64_t v = next();
    if (devfn == edu_devfn && reg < cap + 12 && cap + 4 < reg + size) {
        reg = cap + 4;                                /* the MSI address: never the guest's own RAM */
        size = 4;
        v = msi_address();
    }
    if (devfn == edu_devfn)
        v = safe_data(v, reg, size, cap + 12);
    outl(PCI_ADDR, 0x80000000u | (devfn << 8) | (reg & 0xfc));
    if (size == 1) outb(PCI_DATA + (reg & 3), v);
    else if (size == 2) outw(PCI_DATA + (reg & 2), v);
    else outl(PCI_DATA, v);
}

static const uint16_t vtd_regs[] = {
    0x18, 0x20, 0x24, 0x28, 0x2c, 0x34, 0x38, 0x3c, 0x40, 0x44, 0x80, 0x88, 0x90, 0x9c,
    0xa0, 0xa4, 0xa8, 0xac, 0xb8, 0xf0, 0xf8, 0xfc, 0x220, 0x228, 0x22c,
};

static int overlaps(unsigned off, unsigned size, unsigned reg, unsigned len)
{
    return off < reg + len && reg < off + size;
}

static void fuzz_iommu(void)
{
    uint64_t r = next();
    unsigned off = (r & 7) ? vtd_regs[(r >> 8) % (sizeof(vtd_regs) / sizeof(vtd_regs[0]))] : ((r >> 8) & 0xffc);
    unsigned size = (off & 7) ? 4 : ((r >> 20) & 1 ? 8 : 4);
    uint64_t v;
    if ((r >> 23) & 1) {
        if (size == 8) (void)*(volatile uint64_t *)(VTD_BASE + off);
        else (void)vtd_r(off);
        return;
    }
    /* table pointers (root, queue, interrupt remapping) only ever name the scratch area or beyond RAM */
    static const uint16_t pointers[] = { 0x20, 0x90, 0xb8 };
    for (unsigned i = 0; i < 3; i++) {
        if (overlaps(off, size, pointers[i], 8)) {
            vtd_wq(pointers[i], word() & ~0x8ull);
            return;
        }
    }
    if ((r >> 21) & 3) {
        switch (off) {
        case 0x18: v = (uint32_t)next() & 0xff800000u; break;          /* GCMD: the command bits */
        case 0x88: v = (next() & 0x3ff) << 4; break;                    /* IQT: near the head */
        case 0x40: case 0xa8: v = msi_address(); break;                 /* event addresses */
        case 0x3c: case 0xa4: v = next() & 0xffff; break;
        default: v = next(); break;
        }
    } else {
        v = next();
    }
    v = safe_data(v, off, size, FEDATA);
    v = safe_data(v, off, size, IEDATA);
    if (size == 8)
        vtd_wq(off, v);
    else
        vtd_w(off, (uint32_t)v);
}

static void fuzz_ioapic(void)
{
    uint64_t r = next();
    volatile uint32_t *io = (volatile uint32_t *)IOAPIC_BASE;
    uint32_t reg = (r & 1) ? 0x10 + ((r >> 8) % 48) : (uint32_t)(r >> 8) & 0xff;
    uint32_t v = (uint32_t)next();
    switch ((r >> 4) & 3) {
    case 0: io[0x40 / 4] = (uint32_t)(r >> 16); return;               /* EOI */
    case 1: io[0] = reg; (void)io[4]; return;
    default:
        if (reg >= 0x10 && reg < 0x40 && !(reg & 1))
            v &= ~0x600u;                             /* fixed or lowest priority only */
        io[0] = reg;
        io[4] = v;
    }
}

static void fuzz_ports(void)
{
    uint64_t r = next();
    uint32_t v = (uint32_t)(r >> 32);
    unsigned port;
    switch ((r >> 2) % 6) {
    case 0: port = 0x40 + ((r >> 8) & 3); break;                      /* PIT */
    case 1: port = 0x70 + ((r >> 8) & 1); break;                      /* RTC */
    case 2:                                                           /* ACPI PM, never SLP_EN */
        port = PM_BASE + ((r >> 8) % 12);
        if (port <= PM_BASE + 5 && PM_BASE + 5 <= port + 3)
            v &= ~(0x20u << (8 * (PM_BASE + 5 - port)));
        break;
    case 3: port = TESTDEV_IRQ((r >> 8) % 24); break;
    case 4: port = 0x61; break;
    default:                                                          /* the PIT's control word, read-back too */
        port = 0x43;
        break;
    }
    unsigned size = 1u << ((r >> 12) % 3);
    if (port >= PM_BASE && port < PM_BASE + 12 && (port & (size - 1)))
        size = 1;
    if (port >= PM_BASE && port < PM_BASE + 12 && port + size > PM_BASE + 12)
        size = 1;
    if ((r >> 16) & 1) {
        if (size == 1) (void)inb(port); else if (size == 2) (void)inw(port); else (void)inl(port);
    } else {
        if (size == 1) outb(port, v); else if (size == 2) outw(port, v); else outl(port, v);
    }
}

static void fuzz(const char *cmdline)
{
    uint64_t seed = arg_u64(cmdline, "seed", 1), ops = arg_u64(cmdline, "ops", 1000);
    rng = seed ? seed : 1;
    printf("pc-hostile: fuzz seed=%llu ops=%llu\n", (unsigned long long)seed, (unsigned long long)ops);
    if (!edu)                                         /* configuration space denied: where the firmware put it */
        edu = (volatile uint8_t *)0xfe800000ul;
    fill_scratch(0, 8192);
    for (unsigned i = 0; i < 512; i++)
        queue[i] = word() & ~0xc0ull;
    for (uint64_t n = 0; n < ops; n++) {
        uint64_t r = next();
        switch (r % 16) {
        case 0: case 1: case 2: case 3: fuzz_edu(); break;
        case 4: case 5: fuzz_config(); break;
        case 6: case 7: case 8: fuzz_iommu(); break;
        case 9: case 10: fuzz_ioapic(); break;
        case 11: case 12: case 13: fuzz_ports(); break;
        case 14: fill_scratch((r >> 8) % 8192, 16); break;
        default:
            if ((r >> 8) & 1)
                lapic_software((r >> 9) & 1);
            else if (edu_bar) {                       /* back to a working edu now and then */
                cfg_write(edu_devfn, 0x10, edu_bar);
                cfg_write(edu_devfn, 0x04, 0x6);
            }
        }
    }
    printf("pc-hostile: fuzz done\n");
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    const char *cmdline = bootinfo_cmdline(bi);
    ram_size = bootinfo_ram_size(bi);
    if (ram_size > 0xc000000)
        fail("--mem above 192M (the edu's 28-bit DMA needs room past RAM)");
    cli();
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
    /* msi-nobody and fuzz do without (fuzz under --trust untrusted, which denies configuration space) */
    find_edu(strncmp(cmdline, "msi-nobody", 10) && strncmp(cmdline, "fuzz", 4));
    if (!strncmp(cmdline, "msi-nonram", 10))
        msi_nonram();
    else if (!strncmp(cmdline, "msi-nobody", 10))
        msi_nobody();
    else if (!strncmp(cmdline, "bar-walk", 8))
        bar_walk();
    else if (!strncmp(cmdline, "fuzz", 4))
        fuzz(cmdline);
    else {
        printf("pc-hostile: unknown mode\n");
        exit_code(2);
    }
    exit_code(DONE);
}
