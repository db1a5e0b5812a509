/* Leaving the VM: debug-exit port, ACPI-style power-off, pvpanic. */
#include "rt.h"

void exit_code(uint32_t v)
{
    /* A byte write when it fits: QEMU's isa-debug-exit defaults to iosize=1
     * and ignores wider writes. */
    if (v <= 0xff)
        outb(PYKVM_PORT_DEBUG_EXIT, (uint8_t)v);
    else
        outl(PYKVM_PORT_DEBUG_EXIT, v);
    halt_forever();
}

void poweroff(void)
{
    outw(PYKVM_PORT_POWEROFF, PYKVM_POWEROFF_VALUE);
    halt_forever();
}

#ifdef __x86_64__
static char panic_info[256];
#endif

void panic(const char *fmt, ...)
{
    char msg[200];
    va_list ap;

    cli();
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    printf("PANIC: %s\n", msg);
#ifdef __x86_64__
    if (rt_boot_info && rt_boot_info->magic == PYKVM_BOOT_MAGIC) {
        int n = snprintf(panic_info, sizeof(panic_info), "PANIC=%s\n", msg);
        if (n >= (int)sizeof(panic_info))
            n = sizeof(panic_info) - 1;
        bootinfo_set_crash_info(panic_info, (size_t)n);
    }
#endif
    outb(PYKVM_PORT_PVPANIC, PYKVM_PVPANIC_PANICKED);
    halt_forever();
}
