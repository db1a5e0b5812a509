/*
 * crash-ud: an invalid opcode (kmain -> invalid_opcode -> ud2).
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-ud: executing ud2\n"
 *
 * Then: trigger "exception", vector 6 (#UD), error code 0, RIP on the ud2
 * in invalid_opcode(); exit status 16 and one core.
 * gdb: invalid_opcode, kmain, _start.
 */
#include "rt.h"

#define FAIL_CODE 0x30

volatile int crash_ud_sink;

__attribute__((noinline)) int invalid_opcode(void)
{
    __asm__ volatile("ud2" ::: "memory");
    return crash_ud_sink + 1;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-ud: executing ud2\n");
    int r = invalid_opcode();
    printf("FAIL ud2 returned (%d)\n", r);
    exit_code(FAIL_CODE);
}
