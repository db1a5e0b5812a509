/*
 * smp: brings up every AP with INIT, SIPI, SIPI, one at a time (64-bit
 * pykvm ELF entry; 1..SMP_MAX_CPUS vCPUs).
 *
 * The AP trampoline (trampoline.S) is its own PT_LOAD at 0x8000 (SIPI vector
 * 0x08).  Each AP gets its own stack, GDT and TSS (IST stacks for the
 * firmware's #DF/NMI/#MC gates) and loads the BSP's IDT, so a fault on an AP
 * still reaches the firmware stubs.  APIC ids are assumed to equal the vCPU
 * index (KVM's default, and what pykvm creates).
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

#define SMP_MAX_CPUS 64
#define SMP_OK_CODE 0x12
#define SMP_FAIL_CODE 0x30
#define AP_STACK_SIZE 16384
#define AP_IST_SIZE 4096
#define CHECKIN_TIMEOUT_TSC 20000000000ull   /* ~10 s at 2 GHz */

#define CR4_PCIDE (1ull << 17)
#define EFER_LMA (1ull << 10)

struct smp_tramp_params {
    uint64_t cr0, cr3, cr4, efer;
    uint64_t stack;         /* initial RSP (16-byte aligned) */
    uint64_t entry;         /* void (*)(uint64_t cpu) */
    uint64_t cpu;
};
extern volatile struct smp_tramp_params smp_tramp_params;
extern char smp_trampoline[];

struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

struct percpu {
    uint64_t gdt[6];        /* null, code64, data, code32, TSS (16 bytes) */
    struct tss64 tss;
    uint8_t ist_stack[AP_IST_SIZE] __attribute__((aligned(16)));
    uint8_t stack[AP_STACK_SIZE] __attribute__((aligned(16)));
} __attribute__((aligned(16)));

static struct percpu percpu[SMP_MAX_CPUS];
static volatile uint32_t online[SMP_MAX_CPUS];
static spinlock_t print_lock = SPINLOCK_INIT;
static struct dtr bsp_idtr;

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

/* Own GDT + TSS for this CPU; reload every segment register and TR. */
static void load_percpu_gdt(struct percpu *pc)
{
    uint64_t base = (uintptr_t)&pc->tss, limit = sizeof(pc->tss) - 1;

    pc->gdt[0] = 0;
    pc->gdt[PYKVM_SEL_CODE64 / 8] = 0x00af9a000000ffffull;
    pc->gdt[PYKVM_SEL_DATA / 8] = 0x00cf92000000ffffull;
    pc->gdt[PYKVM_SEL_CODE32 / 8] = 0x00cf9a000000ffffull;
    pc->gdt[PYKVM_SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
        (0x89ull << 40) | (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    pc->gdt[PYKVM_SEL_TSS / 8 + 1] = base >> 32;

    memset(&pc->tss, 0, sizeof(pc->tss));
    for (int i = 0; i < 7; i++)
        pc->tss.ist[i] = (uintptr_t)(pc->ist_stack + AP_IST_SIZE);
    pc->tss.rsp[0] = (uintptr_t)(pc->stack + AP_STACK_SIZE);
    pc->tss.iomap_base = sizeof(pc->tss);

    struct dtr gdtr = { sizeof(pc->gdt) - 1, (uintptr_t)pc->gdt };
    __asm__ volatile(
        "lgdt %0\n\t"
        "mov %1, %%ds\n\t"
        "mov %1, %%es\n\t"
        "mov %1, %%ss\n\t"
        "pushq %2\n\t"
        "lea 1f(%%rip), %%rax\n\t"
        "pushq %%rax\n\t"
        "lretq\n"
        "1:\n\t"
        "ltr %w3"
        : : "m"(gdtr), "r"((uint64_t)PYKVM_SEL_DATA), "i"(PYKVM_SEL_CODE64),
            "r"((uint16_t)PYKVM_SEL_TSS)
        : "rax", "memory");
}

void ap_main(uint64_t cpu)
{
    load_percpu_gdt(&percpu[cpu]);
    __asm__ volatile("lidt %0" : : "m"(bsp_idtr));

    uint32_t apic = lapic_id();
    spin_lock(&print_lock);
    printf("cpu %u online (apic id %u)\n", (unsigned)cpu, apic);
    spin_unlock(&print_lock);
    __atomic_store_n(&online[cpu], 1, __ATOMIC_RELEASE);
    halt_forever();
}

static void start_ap(unsigned cpu)
{
    uint8_t vector = (uint8_t)((uintptr_t)smp_trampoline >> 12);

    smp_tramp_params.stack = (uintptr_t)(percpu[cpu].stack + AP_STACK_SIZE);
    smp_tramp_params.cpu = cpu;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    if (lapic_send_init(cpu) || lapic_send_sipi(cpu, vector) || lapic_send_sipi(cpu, vector))
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
    if ((uintptr_t)smp_trampoline & 0xfff || (uintptr_t)smp_trampoline >= 0x100000)
        fail("trampoline at %p cannot be a SIPI target", smp_trampoline);

    lapic_enable();
    spin_lock(&print_lock);
    printf("cpu 0 online (apic id %u)\n", lapic_id());
    spin_unlock(&print_lock);
    online[0] = 1;

    uint64_t cr3 = read_cr3();
    if (cr3 >> 32)
        fail("page tables above 4 GiB (cr3 %#llx)", (unsigned long long)cr3);
    __asm__ volatile("sidt %0" : "=m"(bsp_idtr));
    smp_tramp_params.cr0 = read_cr0();
    smp_tramp_params.cr3 = cr3;
    smp_tramp_params.cr4 = read_cr4() & ~CR4_PCIDE;
    smp_tramp_params.efer = rdmsr(MSR_EFER) & ~EFER_LMA;
    smp_tramp_params.entry = (uintptr_t)ap_main;

    for (unsigned cpu = 1; cpu < n; cpu++)
        start_ap(cpu);

    spin_lock(&print_lock);
    printf("smp: %u cpus online\n", n);
    spin_unlock(&print_lock);
    exit_code(SMP_OK_CODE);
}
