/*
 * crash-null: a NULL pointer dereference three calls deep
 * (kmain -> a -> b -> c, c reads *(volatile int *)0).
 *
 * The VMM's boot page tables identity-map page 0, so the guest first makes
 * it not-present with page_unmap(0) (splits the first 2 MiB mapping into
 * 4 KiB pages and clears the PTE of page 0).
 *
 * Expected serial output, exact bytes (any --mem/--cmdline/--cpus):
 *
 *     "crash-null: about to dereference NULL\n"
 *
 * Then: trigger "exception", vector 14 (#PF), error code 0 (read,
 * not-present, supervisor), CR2 0, RIP on the load in c(); exit status 16
 * and one core.  gdb's backtrace: c, b, a, kmain, _start.
 * If page 0 cannot be unmapped: "FAIL ...\n", exit_code(0x30) (status 97).
 */
#include "rt.h"

#define FAIL_CODE 0x30

volatile int crash_null_sink;

/* The null pointer goes through an empty asm so gcc cannot see it is NULL
 * (it would replace a known NULL dereference with a trap instruction). */
__attribute__((noinline)) int c(void)
{
    volatile int *p = 0;
    __asm__("" : "+r"(p));
    return *p;
}

/* Each level uses the result after the call: calls, not tail jumps, so
 * every frame stays on the stack. */
__attribute__((noinline)) int b(void)
{
    int r = c();
    crash_null_sink += r;
    return r + 1;
}

__attribute__((noinline)) int a(void)
{
    int r = b();
    crash_null_sink += r;
    return r + 1;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-null: about to dereference NULL\n");
    if (page_unmap((const void *)0)) {
        printf("FAIL page_unmap(0)\n");
        exit_code(FAIL_CODE);
    }
    int r = a();
    printf("FAIL NULL read returned %d\n", r);
    exit_code(FAIL_CODE);
}
