/*
 * exits: exercises every kind of exit the pykvm VMM handles, one line per
 * check (64-bit pykvm ELF entry).
 *
 * Expected serial output, exact bytes (any --cpus/--mem/--cmdline):
 *
 *     exits: start
 *     pio-out8 ok          outb/inb round trip through the 16550 scratch register
 *     pio-in8 ok           inb of PYKVM_PORT_UNCLAIMED reads 0xff
 *     pio-out16 ok         outw fw_cfg selector 0, then inb x4 reads "QEMU"
 *     pio-in16 ok          inw of the unclaimed port reads 0xffff
 *     pio-out32 ok         outl to the unclaimed port is dropped
 *     pio-in32 ok          inl of the unclaimed port reads 0xffffffff
 *     rep-outsb ok         this line is written by one `rep outsb` to COM1
 *     rep-insb ok          `rep insb` x16 from the unclaimed port reads all 0xff
 *     mmio-read ok         1/2/4/8-byte reads of PYKVM_MMIO_UNCLAIMED are all ones
 *     mmio-write ok        1/2/4/8-byte writes there are dropped
 *     fwcfg-signature ok   fw_cfg signature "QEMU"
 *     fwcfg-cpus ok        fw_cfg NB_CPUS == boot info nr_cpus
 *     fwcfg-ram ok         fw_cfg RAM_SIZE == bootinfo_ram_size()
 *     pvpanic ok           pvpanic port reads 3
 *     cpuid ok             leaf 0: max leaf >= 1, 12 printable vendor bytes
 *     msr-apicbase ok      IA32_APIC_BASE: 0xfee00000, enabled, BSP
 *     lapic-mmio ok        LAPIC ID 0, version 0x10..0x15
 *     lapic-timer ok       LAPIC one-shot timer (vector 0x40) woke `sti; hlt`
 *     exits: all ok
 *
 * (the text after each "ok" above is commentary, not output: every line is
 * exactly "<name> ok\n").  Then exit_code(0x21): exit status 67.
 *
 * A failed check prints "FAIL <name>: <detail>\n" instead of "<name> ok\n",
 * the remaining checks still run, the last line is "exits: <n> failed\n" and
 * the exit code is 0x30: exit status 97.
 */
#include "rt.h"

#define EXITS_OK_CODE 0x21
#define EXITS_FAIL_CODE 0x30
#define TIMER_VECTOR 0x40
#define COM1_SCR (PYKVM_PORT_COM1 + 7)

static int failures;

static void check(const char *name, int ok, const char *fmt, ...) RT_PRINTF(3, 4);

static void check(const char *name, int ok, const char *fmt, ...)
{
    if (ok) {
        printf("%s ok\n", name);
        return;
    }
    char detail[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    printf("FAIL %s: %s\n", name, detail);
    failures++;
}

static void check_pio(void)
{
    outb(COM1_SCR, 0xa5);
    uint8_t a = inb(COM1_SCR);
    outb(COM1_SCR, 0x5a);
    uint8_t b = inb(COM1_SCR);
    check("pio-out8", a == 0xa5 && b == 0x5a, "scratch register read %#x/%#x", a, b);

    uint8_t v8 = inb(PYKVM_PORT_UNCLAIMED);
    check("pio-in8", v8 == 0xff, "read 0x%x", v8);

    char sig[5] = { 0 };
    outw(PYKVM_PORT_FWCFG_CTL, PYKVM_FWCFG_SIGNATURE);
    for (int i = 0; i < 4; i++)
        sig[i] = (char)inb(PYKVM_PORT_FWCFG_DATA);
    check("pio-out16", memcmp(sig, "QEMU", 4) == 0, "fw_cfg signature %02x%02x%02x%02x",
          (uint8_t)sig[0], (uint8_t)sig[1], (uint8_t)sig[2], (uint8_t)sig[3]);

    uint16_t v16 = inw(PYKVM_PORT_UNCLAIMED);
    check("pio-in16", v16 == 0xffff, "read 0x%x", v16);

    outl(PYKVM_PORT_UNCLAIMED, 0xdeadbeef);
    uint32_t v32 = inl(PYKVM_PORT_UNCLAIMED);
    check("pio-out32", v32 == 0xffffffff, "read back 0x%x", v32);
    check("pio-in32", v32 == 0xffffffff, "read 0x%x", v32);

    static const char line[] = "rep-outsb ok\n";
    outsb(PYKVM_PORT_COM1, line, sizeof(line) - 1);

    uint8_t buf[16];
    memset(buf, 0, sizeof(buf));
    insb(PYKVM_PORT_UNCLAIMED, buf, sizeof(buf));
    int all = 1;
    for (unsigned i = 0; i < sizeof(buf); i++)
        all &= buf[i] == 0xff;
    check("rep-insb", all, "read %02x %02x ... %02x", buf[0], buf[1], buf[15]);
}

static void check_mmio(void)
{
    const uintptr_t a = PYKVM_MMIO_UNCLAIMED;
    uint8_t r8 = mmio_read8(a);
    uint16_t r16 = mmio_read16(a);
    uint32_t r32 = mmio_read32(a);
    uint64_t r64 = mmio_read64(a);
    check("mmio-read", r8 == 0xff && r16 == 0xffff && r32 == 0xffffffff && r64 == ~0ull,
          "read %x/%x/%x/%llx", r8, r16, r32, (unsigned long long)r64);

    mmio_write8(a, 0);
    mmio_write16(a + 2, 0);
    mmio_write32(a + 4, 0);
    mmio_write64(a + 8, 0);
    uint64_t lo = mmio_read64(a), hi = mmio_read64(a + 8);
    check("mmio-write", lo == ~0ull && hi == ~0ull, "read back %llx %llx",
          (unsigned long long)lo, (unsigned long long)hi);
}

static void check_fwcfg(const struct pykvm_boot_info *bi)
{
    check("fwcfg-signature", fwcfg_present(), "no \"QEMU\" signature");
    uint16_t cpus = fwcfg_read16(PYKVM_FWCFG_NB_CPUS);
    check("fwcfg-cpus", cpus == bi->nr_cpus, "fw_cfg %u, boot info %u", cpus, bi->nr_cpus);
    uint64_t ram = fwcfg_read64(PYKVM_FWCFG_RAM_SIZE);
    check("fwcfg-ram", ram == bootinfo_ram_size(bi), "fw_cfg 0x%llx, boot info 0x%llx",
          (unsigned long long)ram, (unsigned long long)bootinfo_ram_size(bi));
}

static void check_cpu(void)
{
    uint8_t ev = inb(PYKVM_PORT_PVPANIC);
    check("pvpanic", ev == 3, "read 0x%x", ev);

    uint32_t max, v[3];
    cpuid(0, 0, &max, &v[0], &v[2], &v[1]);     /* vendor is ebx, edx, ecx */
    const char *vendor = (const char *)v;
    int printable = 1;
    for (int i = 0; i < 12; i++)
        printable &= vendor[i] >= 0x20 && vendor[i] < 0x7f;
    check("cpuid", max >= 1 && printable, "max leaf %u", max);

    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    check("msr-apicbase",
          (base & 0xfffff000ull) == PYKVM_LAPIC_BASE && (base & (1u << 11)) && (base & (1u << 8)),
          "IA32_APIC_BASE 0x%llx", (unsigned long long)base);

    uint32_t id = lapic_id(), ver = lapic_read(LAPIC_VERSION) & 0xff;
    check("lapic-mmio", id == 0 && ver >= 0x10 && ver <= 0x15, "id %u version 0x%x", id, ver);
}

/* ---- LAPIC timer ---- */
static volatile unsigned timer_ticks;

void exits_timer_irq(void)
{
    timer_ticks++;
    lapic_eoi();
}
RT_IRQ_HANDLER(exits_timer_entry, exits_timer_irq);

void exits_spurious_irq(void)
{
}
RT_IRQ_HANDLER(exits_spurious_entry, exits_spurious_irq);

static void check_timer(void)
{
    idt_set_handler(TIMER_VECTOR, exits_timer_entry);
    idt_set_handler(LAPIC_SPURIOUS_VECTOR, exits_spurious_entry);
    lapic_enable();
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);    /* no legacy PIC interrupts */
    lapic_timer_oneshot(TIMER_VECTOR, 1000000);        /* ~1 ms at KVM's 1 GHz bus */
    while (!timer_ticks)
        sti_hlt();
    cli();
    lapic_timer_stop();
    check("lapic-timer", timer_ticks == 1, "%u interrupts", timer_ticks);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("exits: start\n");
    check_pio();
    check_mmio();
    check_fwcfg(bi);
    check_cpu();
    check_timer();
    if (failures) {
        printf("exits: %d failed\n", failures);
        exit_code(EXITS_FAIL_CODE);
    }
    printf("exits: all ok\n");
    exit_code(EXITS_OK_CODE);
}
