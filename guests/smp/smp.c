/*
 * smp: brings up every AP with INIT, SIPI, SIPI, one at a time (64-bit
 * pykvm ELF entry; 1..SMP_MAX_CPUS vCPUs).
 *
 * The runtime starts each AP (rt_ap_start, runtime/ap.c): its trampoline
 * (runtime/ap_trampoline.S) is its own PT_LOAD at 0x8000 (SIPI vector 0x08);
 * each AP gets its own stack, GDT and TSS (IST stacks for the firmware's
 * #DF/NMI/#MC gates) and loads the BSP's IDT, so a fault on an AP still
 * reaches the firmware stubs.  APIC ids are assumed to equal the vCPU index
 * (KVM's default, and what pykvm creates).
 *
 * Expected serial output, exact bytes, for --cpus N (any --mem/--cmdline):
 *
 *     "smp: nr_cpus=N\n"
 *     "cpu 0 online (apic id 0)\n"              printed by the BSP
 *     "cpu 1 online (apic id 1)\n"              printed by AP 1 itself
 *     ...
 *     "cpu N-1 online (apic id N-1)\n"
 *     "smp: N cpus online\n"
 *
 * Then exit_code(0x12): exit status 37.  Failures print "FAIL <what>\n" and
 * exit_code(0x30) (status 97); an AP that has not checked in within ~10 s
 * of TSC time is a failure ("FAIL cpu K did not come up").
 */
#include "rt.h"

#define SMP_MAX_CPUS RT_MAX_CPUS
#define SMP_OK_CODE 0x12
#define SMP_FAIL_CODE 0x30
#define CHECKIN_TIMEOUT_TSC 20000000000ull   /* ~10 s at 2 GHz */

static volatile uint32_t online[SMP_MAX_CPUS];
static spinlock_t print_lock = SPINLOCK_INIT;

static void fail(const char *fmt, ...) RT_PRINTF(1, 2);

static void fail(const char *fmt, ...)
{
    char msg[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    spin_lock(&print_lock);
    printf("FAIL %s\n", msg);
    spin_unlock(&print_lock);
    exit_code(SMP_FAIL_CODE);
}

/* Runs on each AP, called by the runtime once the AP has its own GDT, TSS
 * and the BSP's IDT. */
static void ap_main(unsigned cpu)
{
    uint32_t apic = lapic_id();
    spin_lock(&print_lock);
    printf("cpu %u online (apic id %u)\n", cpu, apic);
    spin_unlock(&print_lock);
    __atomic_store_n(&online[cpu], 1, __ATOMIC_RELEASE);
    halt_forever();
}

static void start_ap(unsigned cpu)
{
    if (rt_ap_start(cpu, ap_main))
        fail("IPI to apic id %u not delivered", cpu);

    uint64_t start = rdtsc();
    while (!__atomic_load_n(&online[cpu], __ATOMIC_ACQUIRE)) {
        if (rdtsc() - start > CHECKIN_TIMEOUT_TSC)
            fail("cpu %u did not come up", cpu);
        cpu_relax();
    }
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    unsigned n = bi->nr_cpus;
    printf("smp: nr_cpus=%u\n", n);
    if (n > SMP_MAX_CPUS)
        fail("more than %u cpus", SMP_MAX_CPUS);
    if ((uintptr_t)rt_ap_trampoline & 0xfff || (uintptr_t)rt_ap_trampoline >= 0x100000)
        fail("trampoline at %p cannot be a SIPI target", rt_ap_trampoline);

    lapic_enable();
    spin_lock(&print_lock);
    printf("cpu 0 online (apic id %u)\n", lapic_id());
    spin_unlock(&print_lock);
    online[0] = 1;

    uint64_t cr3 = read_cr3();
    if (cr3 >> 32)
        fail("page tables above 4 GiB (cr3 %#llx)", (unsigned long long)cr3);

    for (unsigned cpu = 1; cpu < n; cpu++)
        start_ap(cpu);

    spin_lock(&print_lock);
    printf("smp: %u cpus online\n", n);
    spin_unlock(&print_lock);
    exit_code(SMP_OK_CODE);
}
