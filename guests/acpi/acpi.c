/*
 * acpi: finds the ACPI tables the way a kernel does and prints what they say.
 *
 * Scans 0xe0000-0xfffff in 16-byte steps for "RSD PTR " (checksum over 20
 * bytes, then the v2 extended checksum over 36), checks it against the boot
 * info's acpi_rsdp_addr, checks every table's length and checksum, walks the
 * XSDT (and checks the RSDT lists the same tables), decodes MADT, FADT (with
 * its FACS and DSDT), SRAT and SLIT, and finally powers off the ACPI way:
 * SLP_TYP from the DSDT's \_S5 package and SLP_EN written to the FADT's
 * PM1a control port. Exit status 0 therefore means the FADT and DSDT worked.
 *
 * Expected serial output for `pykvm run acpi --cpus 2` (exact bytes):
 *
 *     acpi: rsdp at 0xe0000 rev 2 oem "PYKVM "
 *     acpi: boot info rsdp matches
 *     acpi: rsdt matches xsdt
 *     acpi: xsdt: FACP APIC
 *     madt: lapic 0xfee00000 pcat 0
 *     madt: cpu 0 apic 0
 *     madt: cpu 1 apic 1
 *     madt: 2 cpus, 0 ioapics
 *     fadt: sci 9 pm1a_evt 0x600 pm1a_cnt 0x604 pm_tmr 0x0 hw_reduced 0
 *     facs: ok
 *     dsdt: _S5 slp_typ 0
 *     srat: none
 *     slit: none
 *     acpi: ok, powering off through PM1a_CNT
 *
 * (one "madt: cpu U apic A" line per LAPIC/x2APIC entry, UID then APIC id).
 * With `--irqchip full` the MADT also has "madt: ioapic id 0 at 0xfec00000
 * gsi 0" and "madt: override irq S gsi G flags 0xF" lines and pcat 1.
 * With a NUMA topology the XSDT line ends "SRAT SLIT" and the SRAT/SLIT lines
 * are, per vCPU then per range, and per SLIT row:
 *
 *     srat: cpu apic A node N
 *     srat: mem 0xBASE+0xLEN node N enabled [hotplug]
 *     slit: N localities
 *     slit: 10 21 ...
 *
 * Anything malformed prints "FAIL <what>" and exits with exit_code(0x30)
 * (status 97); a power-off that does not happen also ends in status 97.
 */
#include "rt.h"

#define SCAN_START 0xe0000ul
#define SCAN_END 0x100000ul
#define MAX_TABLE 0x20000u        /* no pykvm table comes close; a bigger length is corrupt */
#define MAX_ADDR 0x100000000ull   /* the boot page tables identity-map the low 4 GiB */
#define SLP_EN (1u << 13)

struct sdt {
    char sig[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem[6];
    char oem_table[8];
    uint32_t oem_revision;
    uint32_t creator;
    uint32_t creator_revision;
} __attribute__((packed));

struct rsdp {
    char sig[8];
    uint8_t checksum;
    char oem[6];
    uint8_t revision;
    uint32_t rsdt;
    uint32_t length;
    uint64_t xsdt;
    uint8_t xchecksum;
    uint8_t reserved[3];
} __attribute__((packed));

static RT_NORETURN void fail(const char *what, unsigned long long v)
{
    printf("FAIL %s (0x%llx)\n", what, v);
    exit_code(0x30);
}

static uint8_t sum(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint8_t s = 0;
    while (n--)
        s += *b++;
    return s;
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* A table at a physical address, with its length and checksum checked. */
static const uint8_t *table(uint64_t addr, const char *want)
{
    if (addr < 0x1000 || addr + sizeof(struct sdt) > MAX_ADDR)
        fail("table address out of range", addr);
    const struct sdt *h = (const struct sdt *)(uintptr_t)addr;
    if (h->length < sizeof(*h) || h->length > MAX_TABLE || addr + h->length > MAX_ADDR)
        fail("table length", h->length);
    if (want && memcmp(h->sig, want, 4))
        fail("table signature", rd32((const uint8_t *)h->sig));
    if (sum(h, h->length))
        fail("table checksum", addr);
    return (const uint8_t *)h;
}

static const struct rsdp *find_rsdp(void)
{
    for (uintptr_t a = SCAN_START; a < SCAN_END; a += 16) {
        const struct rsdp *r = (const struct rsdp *)a;
        if (!memcmp(r->sig, "RSD PTR ", 8) && sum(r, 20) == 0)
            return r;
    }
    return 0;
}

static void madt(const uint8_t *t)
{
    uint32_t len = rd32(t + 4), cpus = 0, ioapics = 0;
    printf("madt: lapic 0x%x pcat %u\n", rd32(t + 36), rd32(t + 40) & 1);
    for (uint32_t off = 44; off < len;) {
        uint8_t type = t[off], l = t[off + 1];
        if (l < 2 || off + l > len)
            fail("madt subtable length", off);
        const uint8_t *s = t + off;
        if (type == 0 && l == 8) {
            printf("madt: cpu %u apic %u\n", s[2], s[3]);
            cpus++;
        } else if (type == 9 && l == 16) {
            printf("madt: cpu %u apic %u\n", rd32(s + 12), rd32(s + 4));
            cpus++;
        } else if (type == 1 && l == 12) {
            printf("madt: ioapic id %u at 0x%x gsi %u\n", s[2], rd32(s + 4), rd32(s + 8));
            ioapics++;
        } else if (type == 2 && l == 10) {
            printf("madt: override irq %u gsi %u flags 0x%x\n", s[3], rd32(s + 4), rd16(s + 8));
        } else if (!((type == 4 && l == 6) || (type == 10 && l == 12))) {
            fail("madt subtable type", type);
        }
        off += l;
    }
    printf("madt: %u cpus, %u ioapics\n", cpus, ioapics);
}

/* SLP_TYPa of Name(_S5_, Package(){...}) in the DSDT's AML. */
static unsigned s5_slp_typ(const uint8_t *dsdt)
{
    uint32_t len = rd32(dsdt + 4);
    for (uint32_t i = 36; i + 9 < len; i++) {
        if (dsdt[i] != 0x08 || memcmp(dsdt + i + 1, "_S5_", 4) || dsdt[i + 5] != 0x12)
            continue;
        uint32_t p = i + 6;
        p += 1 + (dsdt[p] >> 6);       /* PkgLength */
        p += 1;                        /* NumElements */
        if (p >= len)
            break;
        if (dsdt[p] <= 1)
            return dsdt[p];            /* ZeroOp / OneOp */
        if (dsdt[p] == 0x0a && p + 1 < len)
            return dsdt[p + 1];        /* BytePrefix */
        fail("_S5 package element", dsdt[p]);
    }
    fail("no _S5 in the DSDT", 0);
}

static uint16_t fadt(const uint8_t *t, unsigned *slp_typ)
{
    if (rd32(t + 4) < 244)
        fail("fadt too short for X_ fields", rd32(t + 4));
    uint32_t facs = rd32(t + 36), dsdt = rd32(t + 40);
    uint64_t x_dsdt = rd64(t + 140);
    uint32_t pm1a_evt = rd32(t + 56), pm1a_cnt = rd32(t + 64), pm_tmr = rd32(t + 76);
    uint32_t flags = rd32(t + 112);
    printf("fadt: sci %u pm1a_evt 0x%x pm1a_cnt 0x%x pm_tmr 0x%x hw_reduced %u\n",
           rd16(t + 46), pm1a_evt, pm1a_cnt, pm_tmr, (flags >> 20) & 1);
    if (x_dsdt && x_dsdt != dsdt)
        fail("X_DSDT differs from DSDT", x_dsdt);
    if (rd64(t + 172 + 4) != pm1a_cnt || t[172] != 1)
        fail("X_PM1a_CNT_BLK differs from PM1a_CNT_BLK", rd64(t + 176));
    if (!facs || facs % 64 || facs + 64 > MAX_ADDR)
        fail("facs address", facs);
    const uint8_t *f = (const uint8_t *)(uintptr_t)facs;
    if (memcmp(f, "FACS", 4) || rd32(f + 4) < 64)
        fail("facs signature or length", rd32(f + 4));
    printf("facs: ok\n");
    *slp_typ = s5_slp_typ(table(dsdt, "DSDT"));
    printf("dsdt: _S5 slp_typ %u\n", *slp_typ);
    if (!pm1a_cnt || pm1a_cnt > 0xffff)
        fail("pm1a_cnt port", pm1a_cnt);
    return (uint16_t)pm1a_cnt;
}

static void srat(const uint8_t *t)
{
    uint32_t len = rd32(t + 4);
    for (uint32_t off = 48; off < len;) {
        uint8_t type = t[off], l = t[off + 1];
        if (l < 2 || off + l > len)
            fail("srat subtable length", off);
        const uint8_t *s = t + off;
        if (type == 0 && l == 16) {
            uint32_t dom = s[2] | (uint32_t)s[9] << 8 | (uint32_t)s[10] << 16 | (uint32_t)s[11] << 24;
            printf("srat: cpu apic %u node %u\n", s[3], dom);
        } else if (type == 2 && l == 24) {
            printf("srat: cpu apic %u node %u\n", rd32(s + 8), rd32(s + 4));
        } else if (type == 1 && l == 40) {
            uint32_t fl = rd32(s + 28);
            printf("srat: mem 0x%llx+0x%llx node %u%s%s\n", (unsigned long long)rd64(s + 8),
                   (unsigned long long)rd64(s + 16), rd32(s + 2), fl & 1 ? " enabled" : "",
                   fl & 2 ? " hotplug" : "");
        } else {
            fail("srat subtable type", type);
        }
        off += l;
    }
}

static void slit(const uint8_t *t)
{
    uint32_t len = rd32(t + 4);
    uint64_t n = rd64(t + 36);
    if (n > 64 || 44 + n * n != len)
        fail("slit size", n);
    printf("slit: %u localities\n", (unsigned)n);
    for (uint64_t i = 0; i < n; i++) {
        printf("slit:");
        for (uint64_t j = 0; j < n; j++)
            printf(" %u", t[44 + i * n + j]);
        printf("\n");
    }
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    const struct rsdp *r = find_rsdp();
    if (!r)
        fail("no RSDP in 0xe0000-0xfffff", 0);
    if (r->revision < 2 || r->length < sizeof(*r) || r->length > 0x1000 || sum(r, r->length))
        fail("rsdp v2 length or extended checksum", r->length);
    printf("acpi: rsdp at %p rev %u oem \"%.6s\"\n", (const void *)r, r->revision, r->oem);
    if (bi->acpi_rsdp_addr != (uintptr_t)r)
        fail("boot info acpi_rsdp_addr differs", bi->acpi_rsdp_addr);
    printf("acpi: boot info rsdp matches\n");

    const uint8_t *x = table(r->xsdt, "XSDT"), *rs = table(r->rsdt, "RSDT");
    uint32_t n = (rd32(x + 4) - 36) / 8;
    if (rd32(x + 4) != 36 + 8 * n || rd32(rs + 4) != 36 + 4 * n)
        fail("xsdt/rsdt entry counts", n);
    for (uint32_t i = 0; i < n; i++)
        if (rd64(x + 36 + 8 * i) != rd32(rs + 36 + 4 * i))
            fail("rsdt entry differs from xsdt", i);
    printf("acpi: rsdt matches xsdt\n");

    printf("acpi: xsdt:");
    for (uint32_t i = 0; i < n; i++)
        printf(" %.4s", (const char *)table(rd64(x + 36 + 8 * i), 0));
    printf("\n");

    const uint8_t *found[4] = {0};     /* APIC, FACP, SRAT, SLIT */
    static const char *const sigs[4] = {"APIC", "FACP", "SRAT", "SLIT"};
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *t = table(rd64(x + 36 + 8 * i), 0);
        for (int k = 0; k < 4; k++)
            if (!memcmp(t, sigs[k], 4)) {
                if (found[k])
                    fail("table listed twice", k);
                found[k] = t;
            }
    }
    if (!found[0] || !found[1])
        fail("MADT or FADT missing", 0);
    madt(found[0]);
    unsigned slp_typ;
    uint16_t pm1a_cnt = fadt(found[1], &slp_typ);
    if (found[2])
        srat(found[2]);
    else
        printf("srat: none\n");
    if (found[3])
        slit(found[3]);
    else
        printf("slit: none\n");

    printf("acpi: ok, powering off through PM1a_CNT\n");
    outw(pm1a_cnt, (uint16_t)((slp_typ & 7) << 10 | SLP_EN));
    fail("still running after the ACPI power-off", pm1a_cnt);
}
