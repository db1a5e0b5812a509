/*
 * crash-stack: unbounded recursion runs into an unmapped guard page.
 *
 * The guest switches to its own 8 KiB stack whose lowest page-aligned
 * neighbour (the guard page) is made not-present with page_unmap(), then
 * recurse() calls itself until a push hits the guard page.  The #PF cannot
 * be delivered on the same stack (pushing its frame faults again), so the
 * CPU raises #DF, which the firmware IDT delivers on the TSS's IST stack.
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-stack: recursing into the guard page\n"
 *
 * Then: trigger "exception", vector 8 (#DF), error code 0, RIP in recurse()
 * and RSP at the bottom of the stack (just above the guard page); exit
 * status 16 and one core.  crash_stack_depth counts the recurse() calls
 * (about 8 KiB / 80 bytes).  gdb's backtrace: recurse (n=N) N times, then
 * kmain, where gdb stops ("previous frame inner to this frame"): kmain's
 * frame is on the boot stack, which lies below the guarded one.
 * If the guard page cannot be unmapped: "FAIL ...\n", status 97.
 */
#include "rt.h"

#define FAIL_CODE 0x30
#define STACK_SIZE 8192
#define PAGE 4096

/* [guard page][STACK_SIZE of stack]: page-aligned, the guard lowest */
static uint8_t guarded_stack[PAGE + STACK_SIZE] __attribute__((aligned(PAGE)));

volatile uint64_t crash_stack_depth;
volatile uint64_t crash_stack_limit = ~0ull;  /* never reached: keeps gcc from calling it infinite */

__attribute__((noinline)) uint64_t recurse(uint64_t n)
{
    volatile uint64_t pad[8];
    pad[0] = n;
    crash_stack_depth = n;
    if (n == crash_stack_limit)
        return 0;
    return recurse(n + 1) + pad[0];   /* the addition after the call: no tail call */
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-stack: recursing into the guard page\n");
    if (page_unmap(guarded_stack)) {
        printf("FAIL page_unmap(guard)\n");
        exit_code(FAIL_CODE);
    }
    /* Call recurse(1) on the guarded stack; RBP is left alone, so the
     * frame-pointer chain still leads back to kmain. */
    uint64_t top = (uintptr_t)(guarded_stack + sizeof(guarded_stack));
    uint64_t r;
    __asm__ volatile(
        "mov %%rsp, %%rbx\n\t"
        "mov %[top], %%rsp\n\t"
        "mov $1, %%edi\n\t"
        "call recurse\n\t"
        "mov %%rbx, %%rsp"
        : "=a"(r)
        : [top] "r"(top)
        : "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc");
    printf("FAIL recursion returned %llu\n", (unsigned long long)r);
    exit_code(FAIL_CODE);
}
