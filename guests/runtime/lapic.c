/* Local APIC helpers: xAPIC MMIO at PYKVM_LAPIC_BASE (identity-mapped), or the
 * x2APIC MSRs once the APIC is in x2APIC mode. */
#include "rt.h"

#define APIC_BASE_EXTD (1u << 10)
#define APIC_BASE_ENABLE (1u << 11)
#define CPUID1_ECX_X2APIC (1u << 21)
#define X2APIC_MSR(reg) (0x800u + ((reg) >> 4))
#define X2APIC_ICR 0x830u

/* Cached so an EOI costs one access, not an extra rdmsr of IA32_APIC_BASE; every
 * mode switch goes through lapic_x2apic_enable, lapic_enable re-reads it. */
static int x2apic_mode;

#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_LEVEL_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define TIMER_DIV_1 0xb

uint32_t lapic_read(uint32_t reg)
{
    if (x2apic_mode)
        return (uint32_t)rdmsr(X2APIC_MSR(reg));
    return mmio_read32(PYKVM_LAPIC_BASE + reg);
}

void lapic_write(uint32_t reg, uint32_t v)
{
    if (x2apic_mode)
        wrmsr(X2APIC_MSR(reg), v);
    else
        mmio_write32(PYKVM_LAPIC_BASE + reg, v);
}

uint32_t lapic_id(void)
{
    /* x2APIC: the whole register is the id; xAPIC: its top byte */
    return x2apic_mode ? lapic_read(LAPIC_ID) : lapic_read(LAPIC_ID) >> 24;
}

int lapic_is_x2apic(void)
{
    return x2apic_mode;
}

int lapic_x2apic_enable(void)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & CPUID1_ECX_X2APIC))
        return -1;
    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_EXTD);
    x2apic_mode = 1;
    return 0;
}

void lapic_enable(void)
{
    x2apic_mode = (rdmsr(MSR_IA32_APIC_BASE) & APIC_BASE_EXTD) != 0;
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | LAPIC_SPURIOUS_VECTOR);
}

void lapic_eoi(void)
{
    lapic_write(LAPIC_EOI, 0);
}

int lapic_send_ipi(uint32_t apic_id, uint32_t icr_lo)
{
    if (x2apic_mode) {  /* one 64-bit ICR, no delivery-status bit to wait for */
        wrmsr(X2APIC_ICR, ((uint64_t)apic_id << 32) | icr_lo);
        return 0;
    }
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    for (unsigned i = 0; i < 1000000; i++)
        if (!(lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_PENDING))
            return 0;
    return -1;
}

int lapic_send_init(uint32_t apic_id)
{
    return lapic_send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
}

int lapic_send_sipi(uint32_t apic_id, uint8_t vector)
{
    return lapic_send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | vector);
}

void lapic_timer_oneshot(uint8_t vector, uint32_t count)
{
    lapic_write(LAPIC_TIMER_DIV, TIMER_DIV_1);
    lapic_write(LAPIC_LVT_TIMER, vector);      /* one-shot, unmasked */
    lapic_write(LAPIC_TIMER_INIT, count);
}

void lapic_timer_stop(void)
{
    lapic_write(LAPIC_TIMER_INIT, 0);
    lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | LAPIC_SPURIOUS_VECTOR);
}
