/*
 * gdb-target: a guest for the live gdb stub's tests (tests/test_gdbstub_gdb.py).
 *
 * kmain -> work -> bump writes the global `counter` twice (1, then 2), so a
 * test can break at a function, walk the stack, single-step, and watch a
 * global change.  Expected serial output, exact bytes (any --mem/--cmdline):
 *
 *     "gdb-target: start\n"
 *     "gdb-target: counter=2\n"
 *
 * Then exit_code(0x21): exit status 67.
 */
#include "rt.h"

#define DONE_CODE 0x21

volatile unsigned long counter;

/* noinline and a use after each call: real frames for `bt`, real calls for `break`. */
__attribute__((noinline)) void bump(unsigned long value)
{
    counter = value;
}

__attribute__((noinline)) unsigned long work(unsigned long n)
{
    for (unsigned long i = 1; i <= n; i++)
        bump(i);
    return counter;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("gdb-target: start\n");
    unsigned long r = work(2);
    printf("gdb-target: counter=%lu\n", r);
    exit_code(DONE_CODE);
}
