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
static char panic_info[1024];

/* The crash info registered so far (identity-mapped physical address), then
 * "PANIC=<msg>\n", in panic_info; returns the length. */
static size_t panic_crash_info(const char *msg)
{
    const struct pykvm_boot_info *bi = rt_boot_info;
    size_t have = 0;
    if (bi->crash_info_addr && bi->crash_info_len && bi->crash_info_len < sizeof(panic_info) / 2) {
        have = strnlen((const char *)(uintptr_t)bi->crash_info_addr, bi->crash_info_len);
        memmove(panic_info, (const void *)(uintptr_t)bi->crash_info_addr, have);
        if (have && panic_info[have - 1] != '\n')
            panic_info[have++] = '\n';
    }
    int n = snprintf(panic_info + have, sizeof(panic_info) - have, "PANIC=%s\n", msg);
    if (n < 0)
        n = 0;
    have += (size_t)n;
    if (have >= sizeof(panic_info))
        have = sizeof(panic_info) - 1;
    return have;
}
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
    if (rt_boot_info && rt_boot_info->magic == PYKVM_BOOT_MAGIC)
        bootinfo_set_crash_info(panic_info, panic_crash_info(msg));
#endif
    outb(PYKVM_PORT_PVPANIC, PYKVM_PVPANIC_PANICKED);
    halt_forever();
}
