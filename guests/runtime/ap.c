/* Starting application processors [64]: INIT/SIPI/SIPI into the trampoline
 * (runtime/ap_trampoline.S), then a per-CPU GDT, TSS and the BSP's IDT. */
#include "rt.h"

#define AP_STACK_SIZE 16384
#define AP_IST_SIZE 4096

#define CR4_PCIDE (1ull << 17)
#define EFER_LMA (1ull << 10)

struct rt_ap_tramp_params {
    uint64_t cr0, cr3, cr4, efer;
    uint64_t stack;         /* initial RSP (16-byte aligned) */
    uint64_t entry;         /* void (*)(uint64_t cpu) */
    uint64_t cpu;
};
extern volatile struct rt_ap_tramp_params rt_ap_tramp_params;

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
    void (*entry)(unsigned cpu);
    uint8_t ist_stack[AP_IST_SIZE] __attribute__((aligned(16)));
    uint8_t stack[AP_STACK_SIZE] __attribute__((aligned(16)));
} __attribute__((aligned(16)));

static struct percpu percpu[RT_MAX_CPUS];
static struct dtr bsp_idtr;

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

/* The trampoline's 64-bit code calls this with RDI = cpu.  Not a tail call
 * into the guest's entry, so backtraces show rt_ap_entry under it. */
__attribute__((noinline)) void rt_ap_entry(uint64_t cpu)
{
    struct percpu *pc = &percpu[cpu];
    load_percpu_gdt(pc);
    __asm__ volatile("lidt %0" : : "m"(bsp_idtr));
    pc->entry((unsigned)cpu);
    halt_forever();
}

int rt_ap_start(unsigned cpu, void (*entry)(unsigned cpu))
{
    uintptr_t tramp = (uintptr_t)rt_ap_trampoline;
    uint8_t vector = (uint8_t)(tramp >> 12);
    uint64_t cr3 = read_cr3();

    if (cpu == 0 || cpu >= RT_MAX_CPUS)
        return RT_AP_BAD_CPU;
    if ((tramp & 0xfff) || tramp >= 0x100000 || (cr3 >> 32))
        return RT_AP_BAD_SETUP;

    percpu[cpu].entry = entry;
    __asm__ volatile("sidt %0" : "=m"(bsp_idtr));
    rt_ap_tramp_params.cr0 = read_cr0();
    rt_ap_tramp_params.cr3 = cr3;
    rt_ap_tramp_params.cr4 = read_cr4() & ~CR4_PCIDE;
    rt_ap_tramp_params.efer = rdmsr(MSR_EFER) & ~EFER_LMA;
    rt_ap_tramp_params.entry = (uintptr_t)rt_ap_entry;
    rt_ap_tramp_params.stack = (uintptr_t)(percpu[cpu].stack + AP_STACK_SIZE);
    rt_ap_tramp_params.cpu = cpu;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    if (lapic_send_init(cpu) || lapic_send_sipi(cpu, vector) || lapic_send_sipi(cpu, vector))
        return RT_AP_NO_IPI;
    return 0;
}
