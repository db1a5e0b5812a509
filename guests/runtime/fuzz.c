/*
 * Snapshot fuzzing, the guest's side (pykvm_abi.h: PYKVM_PORT_FUZZ), and the
 * coverage callback gcc's -fsanitize-coverage=trace-pc inserts at every basic
 * block of the code compiled with it (the runtime itself is not).
 */
#include "rt.h"

/* used: __sanitizer_cov_trace_pc below reads them from assembly */
static uint8_t *volatile rt_fuzz_map __attribute__((used));   /* AFL's map once a driver listens */
static uint32_t rt_fuzz_prev __attribute__((used));

int fuzz_setup(struct pykvm_fuzz_input *in, uint32_t size)
{
    uint64_t pa = va_to_pa(in);
    if (pa == RT_NO_PHYS)
        return -1;
    in->len = 0;
    outl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_INPUT_LO, (uint32_t)pa);
    outl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_INPUT_HI, (uint32_t)(pa >> 32));
    outl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_INPUT_SIZE, size);
    if (inl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_COMMAND) != PYKVM_FUZZ_STATE_DRIVEN)
        return 0;
    rt_fuzz_map = (uint8_t *)(uintptr_t)PYKVM_FUZZ_MAP_ADDR;
    return 1;
}

void fuzz_snapshot(void)
{
    rt_fuzz_prev = 0;
    outl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_COMMAND, PYKVM_FUZZ_CMD_SNAPSHOT);
}

void fuzz_done(void)
{
    outl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_COMMAND, PYKVM_FUZZ_CMD_DONE);
}

void fuzz_crash(void)
{
    outl(PYKVM_PORT_FUZZ + PYKVM_FUZZ_COMMAND, PYKVM_FUZZ_CMD_CRASH);
}

/*
 * void __sanitizer_cov_trace_pc(void), called at every basic block of the
 * code compiled with coverage: most of what an instrumented guest executes is
 * this function, so it is written out (no frame, 14 instructions) instead of
 * left to the compiler (17, as the runtime keeps frame pointers). It does
 *   cur = (uint32_t)((pc ^ (pc >> 15)) * 0x9e3779b1u) >> 16;   (pc: its return address)
 *   map[cur ^ rt_fuzz_prev]++;  rt_fuzz_prev = cur >> 1;
 * and nothing while no driver listens (rt_fuzz_map NULL).
 */
__asm__(
    "    .text\n"
    "    .globl __sanitizer_cov_trace_pc\n"
    "    .type __sanitizer_cov_trace_pc, @function\n"
    "__sanitizer_cov_trace_pc:\n"
    "    mov    rt_fuzz_map(%rip), %rcx\n"
    "    test   %rcx, %rcx\n"
    "    je     1f\n"
    "    mov    (%rsp), %rdx\n"
    "    mov    %rdx, %rax\n"
    "    shr    $15, %rax\n"
    "    xor    %rdx, %rax\n"
    "    imul   $0x9e3779b1, %eax, %eax\n"
    "    shr    $16, %eax\n"
    "    mov    rt_fuzz_prev(%rip), %edx\n"
    "    xor    %eax, %edx\n"
    "    shr    $1, %eax\n"
    "    mov    %eax, rt_fuzz_prev(%rip)\n"
    "    addb   $1, (%rcx,%rdx)\n"
    "1:  ret\n"
    "    .size __sanitizer_cov_trace_pc, . - __sanitizer_cov_trace_pc\n");
