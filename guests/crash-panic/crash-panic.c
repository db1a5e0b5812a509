/*
 * crash-panic: registers vmcoreinfo-style crash info, then panics
 * (kmain -> report_fatal -> panic -> pvpanic).
 *
 * The guest points the boot info's crash_info_addr/len at
 * "BUILD_ID=crash-panic-0001\nVERSION=1.2.3\n"; the runtime's panic()
 * appends "PANIC=<message>\n", so the core's VMCOREINFO note reads
 *
 *     "BUILD_ID=crash-panic-0001\nVERSION=1.2.3\nPANIC=deliberate panic, code 42\n"
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-panic: registering crash info, then panicking\n"
 *     "PANIC: deliberate panic, code 42\n"
 *
 * Then: trigger "pvpanic" (no vector), exit status 16 and one core; RIP
 * just after the pvpanic `out` in panic().  gdb: halt_forever (inlined in
 * panic), panic, report_fatal, kmain, _start.
 */
#include "rt.h"

#define FAIL_CODE 0x30

static const char crash_info[] = "BUILD_ID=crash-panic-0001\nVERSION=1.2.3\n";

volatile int crash_panic_code = 42;

__attribute__((noinline)) void report_fatal(int code)
{
    panic("deliberate panic, code %d", code);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-panic: registering crash info, then panicking\n");
    bootinfo_set_crash_info(crash_info, sizeof(crash_info) - 1);
    report_fatal(crash_panic_code);
    printf("FAIL panic returned\n");   /* not reached: panic() is noreturn */
    exit_code(FAIL_CODE);
}
