/*
 * pci-dma: QEMU's edu PCI device doing DMA and interrupts, directly or through the Intel IOMMU.
 *
 * Command line: the mode, one of
 *   plain   find the edu on bus 0 (config mechanism #1), turn on bus mastering, copy 8 bytes
 *           RAM -> device buffer -> RAM at physical addresses            (--device edu)
 *   iommu   the same through VT-d translation: IOVA 0 maps page A, IOVA 0x1000 page B (3-level
 *           second-level tables); a queued-invalidation wait descriptor writes its status; a
 *           copy to an unmapped IOVA faults (the fault record's reason is printed); then the
 *           edu's MSI in remappable format (IRTE 1, vector 0x41) and its INTx through an IOAPIC
 *           entry in remappable format (IRTE 2, vector 0x42)           (--device edu --device intel-iommu)
 *
 * Serial output, exact:
 *   "pci-dma: plain ok\n" | "pci-dma: iommu ok, qi 0x600d, fault 0x5, msi 0x41, intx 0x42\n"
 * then power-off (status 0). A step that fails prints "pci-dma: <what> failed" and exits with
 * debug-exit code 3; no edu device: "pci-dma: no edu\n", code 4; unknown mode: code 2.
 */
#include "rt.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc
#define EDU_VENDOR_DEVICE 0x11e81234u
#define EDU_BUF 0x40000
#define VTD_BASE 0xfed90000ul
#define IOAPIC_BASE 0xfec00000ul

/* VT-d registers and bits */
#define GCMD 0x18
#define GSTS 0x1c
#define RTADDR 0x20
#define FSTS 0x34
#define IQH 0x80
#define IQT 0x88
#define IQA 0x90
#define IRTA 0xb8
#define FRCD_HI 0x228
#define TE (1u << 31)
#define SRTP (1u << 30)
#define QIE (1u << 26)
#define IRE (1u << 25)
#define SIRTP (1u << 24)
#define PPF (1u << 1)

#define MSI_VECTOR 0x41
#define INTX_VECTOR 0x42

static uint64_t root[512] __attribute__((aligned(4096)));
static uint64_t ctx[512] __attribute__((aligned(4096)));
static uint64_t pt3[512] __attribute__((aligned(4096)));
static uint64_t pt2[512] __attribute__((aligned(4096)));
static uint64_t pt1[512] __attribute__((aligned(4096)));
static uint64_t irt[512] __attribute__((aligned(4096)));      /* 256 IRTEs of 16 bytes */
static uint64_t queue[512] __attribute__((aligned(4096)));    /* 256 descriptors */
static uint8_t page_a[4096] __attribute__((aligned(4096)));
static uint8_t page_b[4096] __attribute__((aligned(4096)));
static volatile uint32_t qi_status;

static volatile uint8_t *edu;
static unsigned edu_devfn;

static uint32_t cfg_read(unsigned devfn, unsigned reg)
{
    outl(PCI_ADDR, 0x80000000u | (devfn << 8) | reg);
    return inl(PCI_DATA);
}

static void cfg_write(unsigned devfn, unsigned reg, uint32_t v)
{
    outl(PCI_ADDR, 0x80000000u | (devfn << 8) | reg);
    outl(PCI_DATA, v);
}

static uint32_t edu_r(unsigned reg) { return *(volatile uint32_t *)(edu + reg); }
static void edu_w(unsigned reg, uint32_t v) { *(volatile uint32_t *)(edu + reg) = v; }
static void edu_wq(unsigned reg, uint64_t v) { *(volatile uint64_t *)(edu + reg) = v; }
static uint32_t vtd_r(unsigned reg) { return *(volatile uint32_t *)(VTD_BASE + reg); }
static uint64_t vtd_rq(unsigned reg) { return *(volatile uint64_t *)(VTD_BASE + reg); }
static void vtd_w(unsigned reg, uint32_t v) { *(volatile uint32_t *)(VTD_BASE + reg) = v; }
static void vtd_wq(unsigned reg, uint64_t v) { *(volatile uint64_t *)(VTD_BASE + reg) = v; }

RT_NORETURN static void fail(const char *what)
{
    printf("pci-dma: %s failed\n", what);
    exit_code(3);
}

static void find_edu(void)
{
    for (unsigned devfn = 0; devfn < 256; devfn += 8) {
        if (cfg_read(devfn, 0) == EDU_VENDOR_DEVICE) {
            edu_devfn = devfn;
            edu = (volatile uint8_t *)(uintptr_t)(cfg_read(devfn, 0x10) & ~0xfu);
            cfg_write(devfn, 0x04, cfg_read(devfn, 0x04) | 0x6);       /* memory decode, bus master */
            if (edu_r(0) != 0x010000ed)
                fail("edu identification");
            return;
        }
    }
    printf("pci-dma: no edu\n");
    exit_code(4);
}

static void edu_dma(uint64_t src, uint64_t dst, uint64_t count, int from_device)
{
    edu_wq(0x80, src);
    edu_wq(0x88, dst);
    edu_wq(0x90, count);
    edu_w(0x98, 1 | (from_device ? 2 : 0));
    while (edu_r(0x98) & 1)
        cpu_relax();
}

static uint64_t pa(const void *va)
{
    return va_to_pa(va);
}

static void plain(void)
{
    memcpy(page_a, "plainDMA", 8);
    edu_dma(pa(page_a), EDU_BUF, 8, 0);
    edu_dma(EDU_BUF, pa(page_b) + 8, 8, 1);
    if (memcmp(page_b + 8, "plainDMA", 8))
        fail("plain dma");
    printf("pci-dma: plain ok\n");
}

static void gcmd_or(uint32_t bit)
{
    vtd_w(GCMD, vtd_r(GSTS) | bit);
    while (!(vtd_r(GSTS) & bit))
        cpu_relax();
}

static volatile uint32_t last_vector, interrupts;

static void take(uint32_t vector)
{
    last_vector = vector;
    interrupts++;
    edu_w(0x64, edu_r(0x24));         /* acknowledge: INTx falls */
    lapic_eoi();
}

void msi_irq(void) { take(MSI_VECTOR); }
void intx_irq(void) { take(INTX_VECTOR); }
RT_IRQ_HANDLER(msi_entry, msi_irq);
RT_IRQ_HANDLER(intx_entry, intx_irq);

static void wait_interrupt(uint32_t seen, const char *what)
{
    for (int i = 0; i < 100 && interrupts == seen; i++) {
        sti_hlt();
        cli();
    }
    if (interrupts == seen)
        fail(what);
}

static void set_irte(unsigned index, uint8_t vector, uint16_t sid, unsigned svt)
{
    irt[2 * index + 1] = sid | ((uint64_t)svt << 18);
    irt[2 * index] = 1 | ((uint64_t)vector << 16);        /* present, fixed, edge, APIC 0, physical */
}

static void iommu(void)
{
    /* tables: bus 0 -> context of the edu -> IOVA 0 = page A, IOVA 0x1000 = page B */
    root[0] = pa(ctx) | 1;
    ctx[2 * edu_devfn] = pa(pt3) | 1;                     /* present, translation type 0 */
    ctx[2 * edu_devfn + 1] = 1 | ((uint64_t)edu_devfn << 8);  /* 39-bit, domain = requester ID */
    pt3[0] = pa(pt2) | 3;
    pt2[0] = pa(pt1) | 3;
    pt1[0] = pa(page_a) | 3;
    pt1[1] = pa(page_b) | 3;
    vtd_wq(IQA, pa(queue));
    gcmd_or(QIE);
    vtd_wq(RTADDR, pa(root));
    gcmd_or(SRTP);
    vtd_wq(IRTA, pa(irt) | 7);                             /* 2^(7+1) = 256 entries */
    gcmd_or(SIRTP);
    gcmd_or(TE);
    gcmd_or(IRE);

    /* queued invalidation: a global IOTLB invalidation, then a wait that writes its status */
    queue[0] = 2 | (1 << 4);
    queue[1] = 0;
    queue[2] = 5 | (1 << 5) | ((uint64_t)0x600d << 32);
    queue[3] = pa((const void *)&qi_status);
    vtd_wq(IQT, 2 << 4);
    if (qi_status != 0x600d || vtd_rq(IQH) != 2 << 4)
        fail("queued invalidation");

    memcpy(page_a, "iommuDMA", 8);
    edu_dma(0, EDU_BUF, 8, 0);
    edu_dma(EDU_BUF, 0x1000 + 16, 8, 1);
    if (memcmp(page_b + 16, "iommuDMA", 8))
        fail("translated dma");
    edu_dma(EDU_BUF, 0x7000, 8, 1);                        /* not mapped: a write fault */
    if (!(vtd_r(FSTS) & PPF))
        fail("fault record");
    uint32_t reason = (vtd_rq(FRCD_HI) >> 32) & 0xff;

    idt_set_handler(MSI_VECTOR, msi_entry);
    idt_set_handler(INTX_VECTOR, intx_entry);
    set_irte(1, MSI_VECTOR, edu_devfn, 1);                 /* verify the full requester ID */
    set_irte(2, INTX_VECTOR, 0, 0);
    unsigned msi = cfg_read(edu_devfn, 0x34);              /* the edu's only capability: MSI */
    cfg_write(edu_devfn, msi + 4, 0xfee00000u | (1u << 5) | (1u << 4));   /* handle 1, remappable */
    cfg_write(edu_devfn, msi + 8, 0);
    cfg_write(edu_devfn, msi + 12, 0);
    cfg_write(edu_devfn, msi, cfg_read(edu_devfn, msi) | (1u << 16));     /* MSI enable */
    uint32_t seen = interrupts;
    edu_w(0x60, 1);
    wait_interrupt(seen, "remapped msi");
    uint32_t msi_vector = last_vector;

    cfg_write(edu_devfn, msi, cfg_read(edu_devfn, msi) & ~(1u << 16));
    unsigned line = cfg_read(edu_devfn, 0x3c) & 0xff;
    volatile uint32_t *ioapic = (volatile uint32_t *)IOAPIC_BASE;
    ioapic[0] = 0x10 + 2 * line + 1;
    ioapic[4] = (1u << 16) | (2u << 17);                    /* remappable format, index 2 */
    ioapic[0] = 0x10 + 2 * line;
    ioapic[4] = INTX_VECTOR;                                /* edge, unmasked */
    seen = interrupts;
    edu_w(0x60, 1);
    wait_interrupt(seen, "remapped intx");
    printf("pci-dma: iommu ok, qi %#x, fault %#x, msi %#x, intx %#x\n", qi_status, reason, msi_vector,
           last_vector);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    const char *mode = bootinfo_cmdline(bi);
    lapic_enable();
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
    cli();
    if (!strcmp(mode, "plain")) {
        find_edu();
        plain();
    } else if (!strcmp(mode, "iommu")) {
        find_edu();
        iommu();
    } else {
        printf("pci-dma: unknown mode\n");
        exit_code(2);
    }
    poweroff();
}
