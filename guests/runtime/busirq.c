/* The bus interrupt (PYKVM_BUS_VECTOR): count it, call the guest's hook, EOI. */
#include "rt.h"

volatile uint32_t bus_irq_count;
static void (*bus_irq_hook)(void);

void bus_irq_handler(void)
{
    bus_irq_count++;
    if (bus_irq_hook)
        bus_irq_hook();
    lapic_eoi();
}

RT_IRQ_HANDLER(bus_irq_entry, bus_irq_handler);

void bus_irq_init(void (*hook)(void))
{
    bus_irq_hook = hook;
    lapic_enable();
    idt_set_handler(PYKVM_BUS_VECTOR, bus_irq_entry);
    sti();
}

uint32_t bus_irq_wait(uint32_t seen)
{
    uint32_t now;
    cli();
    while ((now = bus_irq_count) == seen) {
        sti_hlt();   /* a pending interrupt wakes the hlt: sti's shadow covers the gap */
        cli();
    }
    sti();
    return now;
}
