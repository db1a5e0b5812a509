/*
 * crash-idt: destroys its own IDT (lidt with base 0, limit 0), then executes
 * ud2 (kmain -> fault_without_idt).  #UD finds no gate (vector beyond the
 * limit -> #GP, also beyond -> #DF, also beyond): triple fault.
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-idt: loading an empty IDT, then faulting\n"
 *
 * Then: trigger "triple-fault" (KVM_EXIT_SHUTDOWN; nested or
 * software-assisted KVM may report "internal-error" instead), no vector,
 * exit status 16 and one core whose IDTR is base 0, limit 0.
 */
#include "rt.h"

#define FAIL_CODE 0x30

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

volatile int crash_idt_sink;

__attribute__((noinline)) int fault_without_idt(void)
{
    struct dtr empty = { 0, 0 };
    __asm__ volatile("lidt %0" : : "m"(empty) : "memory");
    __asm__ volatile("ud2" ::: "memory");
    return crash_idt_sink + 1;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-idt: loading an empty IDT, then faulting\n");
    int r = fault_without_idt();
    printf("FAIL ud2 without an IDT returned (%d)\n", r);
    exit_code(FAIL_CODE);
}
