/*
 * pc-irq: interrupts from the PC platform devices (8254 PIT, 8259 PIC, I/O APIC, pc-testdev lines).
 *
 * Command line: the mode, one of
 *   pit-ioapic  PIT counter 0 in mode 2 at 100 Hz; IRQ 0 reaches I/O APIC pin 2 (the MADT's
 *               override), edge-triggered, vector 0x30 to APIC 0          (--device pit)
 *   pit-pic     the same through the 8259 master (IRQ 0, vector 0x20) and the BSP's LINT0 in
 *               ExtINT mode; the handler ends it with a non-specific EOI   (--device pic --device pit)
 *   retrigger   pc-testdev line 14, level-triggered, vector 0x9a, raised with IF = 0; the first
 *               handler EOIs its LAPIC but leaves the line high, so the I/O APIC must deliver it
 *               again; the second lowers it (kvm-unit-tests ioapic "retriggered level interrupts
 *               without masking")                                           (--device pc-testdev-irq)
 *   rtc         the CMOS RTC answers at 0x70/0x71: register D says its RAM is valid, and the
 *               seconds register holds a BCD or binary second                (--device rtc)
 *
 * Serial output, exact:
 *   "pit-ioapic: 5 ticks\n" | "pit-pic: 5 ticks\n" | "retrigger: 2 interrupts\n" | "rtc: present\n"
 * then power-off (status 0). An unknown mode prints "pc-irq: unknown mode\n" and exits with
 * debug-exit code 2; "retrigger" gives up after 10 wake-ups ("retrigger: N interrupts", code 3);
 * "rtc" without an RTC (ports reading all ones) prints "rtc: absent" (code 4).
 * Interrupts that stop coming leave the guest halted: the VMM's --timeout ends it.
 */
#include "rt.h"

#define IOAPIC_BASE 0xfec00000ul
#define IOAPIC_REDIR(pin) (0x10 + 2 * (pin))
#define IOAPIC_LEVEL (1u << 15)
#define IOAPIC_MASKED (1u << 16)

#define PIT_CH0 0x40
#define PIT_CONTROL 0x43
#define PIT_HZ 1193182u
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI 0x20
#define TESTDEV_IRQ_LINE(n) (0x2000 + (n))

#define PIT_IOAPIC_VECTOR 0x30
#define PIT_PIC_BASE 0x20
#define RETRIGGER_VECTOR 0x9a
#define RETRIGGER_LINE 14
#define TICKS 5
#define LAPIC_LVT_EXTINT (7u << 8)

static volatile uint32_t *const ioapic = (volatile uint32_t *)IOAPIC_BASE;

static void ioapic_write(uint32_t reg, uint32_t v)
{
    ioapic[0] = reg;          /* IOREGSEL */
    ioapic[4] = v;            /* IOWIN at +0x10 */
}

static void ioapic_route(unsigned pin, uint32_t low)
{
    ioapic_write(IOAPIC_REDIR(pin) + 1, 0);      /* destination: APIC 0, physical */
    ioapic_write(IOAPIC_REDIR(pin), low);
}

static volatile uint32_t count;

void lapic_tick_irq(void)
{
    count++;
    lapic_eoi();
}
RT_IRQ_HANDLER(lapic_tick_entry, lapic_tick_irq);

void pic_tick_irq(void)
{
    count++;
    outb(PIC1_CMD, PIC_EOI);
}
RT_IRQ_HANDLER(pic_tick_entry, pic_tick_irq);

void retrigger_irq(void)
{
    if (++count == 2)
        outb(TESTDEV_IRQ_LINE(RETRIGGER_LINE), 0);
    lapic_eoi();
}
RT_IRQ_HANDLER(retrigger_entry, retrigger_irq);

static void pit_start_100hz(void)
{
    uint16_t reload = PIT_HZ / 100;
    outb(PIT_CONTROL, 0x34);                      /* counter 0, low then high byte, mode 2, binary */
    outb(PIT_CH0, reload & 0xff);
    outb(PIT_CH0, reload >> 8);
}

static void wait_ticks(void)
{
    for (;;) {
        cli();
        if (count >= TICKS)
            break;
        sti_hlt();
    }
}

static void pit_ioapic(void)
{
    idt_set_handler(PIT_IOAPIC_VECTOR, lapic_tick_entry);
    ioapic_route(2, PIT_IOAPIC_VECTOR);
    pit_start_100hz();
    wait_ticks();
    ioapic_route(2, PIT_IOAPIC_VECTOR | IOAPIC_MASKED);
    printf("pit-ioapic: %u ticks\n", TICKS);
}

static void pit_pic(void)
{
    idt_set_handler(PIT_PIC_BASE, pic_tick_entry);
    outb(PIC1_CMD, 0x11);                         /* ICW1: edge, cascade, ICW4 follows */
    outb(PIC1_DATA, PIT_PIC_BASE);                /* ICW2: vectors 0x20-0x27 */
    outb(PIC1_DATA, 1 << 2);                      /* ICW3: the slave on IRQ 2 */
    outb(PIC1_DATA, 0x01);                        /* ICW4: 8086 mode */
    outb(PIC2_CMD, 0x11);
    outb(PIC2_DATA, PIT_PIC_BASE + 8);
    outb(PIC2_DATA, 2);
    outb(PIC2_DATA, 0x01);
    outb(PIC2_DATA, 0xff);
    outb(PIC1_DATA, 0xfe);                        /* only IRQ 0 */
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_EXTINT);
    pit_start_100hz();
    wait_ticks();
    outb(PIC1_DATA, 0xff);
    printf("pit-pic: %u ticks\n", TICKS);
}

static void retrigger(void)
{
    idt_set_handler(RETRIGGER_VECTOR, retrigger_entry);
    ioapic_route(RETRIGGER_LINE, RETRIGGER_VECTOR | IOAPIC_LEVEL);
    cli();
    outb(TESTDEV_IRQ_LINE(RETRIGGER_LINE), 1);
    for (int i = 0; i < 10 && count != 2; i++) {
        sti_hlt();
        cli();
    }
    printf("retrigger: %u interrupts\n", count);
    if (count != 2)
        exit_code(3);
}

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_SECONDS 0x00
#define CMOS_STATUS_B 0x0b
#define CMOS_STATUS_D 0x0d
#define CMOS_D_VRT 0x80
#define CMOS_B_BINARY 0x04

static uint8_t cmos_read(uint8_t reg)
{
    outb(CMOS_INDEX, reg);
    return inb(CMOS_DATA);
}

static void rtc(void)
{
    uint8_t d = cmos_read(CMOS_STATUS_D), b = cmos_read(CMOS_STATUS_B), sec = cmos_read(CMOS_SECONDS);
    if (!(b & CMOS_B_BINARY))
        sec = (uint8_t)((sec >> 4) * 10 + (sec & 0x0f));
    if (d != CMOS_D_VRT || sec > 59) {
        printf("rtc: absent\n");
        exit_code(4);
    }
    printf("rtc: present\n");
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    const char *mode = bootinfo_cmdline(bi);
    lapic_enable();
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);    /* an 8259 left at its reset state stays out */
    if (!strcmp(mode, "pit-ioapic"))
        pit_ioapic();
    else if (!strcmp(mode, "pit-pic"))
        pit_pic();
    else if (!strcmp(mode, "retrigger"))
        retrigger();
    else if (!strcmp(mode, "rtc"))
        rtc();
    else {
        printf("pc-irq: unknown mode\n");
        exit_code(2);
    }
    poweroff();
}
