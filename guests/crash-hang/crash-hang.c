/*
 * crash-hang: spins forever with interrupts off (kmain -> spin_forever:
 * `for (;;) hang_counter++`).  Run it with --timeout.
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-hang: spinning forever with interrupts off\n"
 *
 * Then nothing: with --timeout S the VMM stops it after S seconds, trigger
 * "timeout", exit status 18, one core; hang_counter in the core is > 0 and
 * RIP is in spin_forever().  gdb: spin_forever, kmain, _start.
 */
#include "rt.h"

volatile uint64_t hang_counter;

__attribute__((noinline)) void spin_forever(void)
{
    cli();
    for (;;)
        hang_counter++;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-hang: spinning forever with interrupts off\n");
    spin_forever();
}
