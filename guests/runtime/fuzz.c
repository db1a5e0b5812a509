/*
 * Snapshot fuzzing, the guest's side (pykvm_abi.h: PYKVM_PORT_FUZZ), and the
 * coverage callback gcc's -fsanitize-coverage=trace-pc inserts at every basic
 * block of the code compiled with it (the runtime itself is not).
 */
#include "rt.h"

static uint8_t *volatile rt_fuzz_map;   /* AFL's map once a driver listens */
static uint32_t rt_fuzz_prev;

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

void __sanitizer_cov_trace_pc(void)
{
    uint8_t *map = rt_fuzz_map;
    if (!map)
        return;
    uint64_t pc = (uint64_t)(uintptr_t)__builtin_return_address(0);
    uint32_t cur = (uint32_t)((pc ^ (pc >> 15)) * 0x9e3779b1u) >> 16;
    cur &= PYKVM_FUZZ_MAP_SIZE - 1;
    map[cur ^ rt_fuzz_prev]++;
    rt_fuzz_prev = cur >> 1;
}
