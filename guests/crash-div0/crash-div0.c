/*
 * crash-div0: integer division by zero (kmain -> divide -> idiv by a
 * volatile zero the compiler cannot fold).
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-div0: dividing 1000 by zero\n"
 *
 * Then: trigger "exception", vector 0 (#DE), error code 0, RIP on the idiv
 * in divide(); exit status 16 and one core.  gdb: divide, kmain, _start.
 */
#include "rt.h"

#define FAIL_CODE 0x30

volatile int divisor;        /* 0: lives in .bss, read at run time */
volatile int quotient;

__attribute__((noinline)) int divide(int dividend)
{
    int q = dividend / divisor;
    quotient = q;
    return q;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-div0: dividing 1000 by zero\n");
    int q = divide(1000);
    printf("FAIL division returned %d\n", q);
    exit_code(FAIL_CODE);
}
