/*
 * higherhalf: a 64-bit pykvm-protocol guest linked at virtual
 * 0xffffffff80100000 and loaded at physical 0x100000 (p_paddr through AT()
 * in the linker script; -mcmodel=kernel).  e_entry is the higher-half _start:
 * the VMM maps every PT_LOAD's p_vaddr range onto its p_paddr.  The boot
 * info pointer in RDI is physical and reached through the VMM's identity map.
 *
 * Expected serial output, exact bytes (K, D = the values of the symbols
 * kmain and hh_data in build/guests/higherhalf.elf, as `nm` shows them, both
 * >= 0xffffffff80000000; printed as 0x + 16 lower-case hex digits; KP, DP =
 * K, D - 0xffffffff80000000, printed the same way):
 *
 *     "higherhalf: running in the top 2 GiB\n"
 *     "kmain=0xK hh_data=0xD\n"
 *     "phys: kmain=0xKP hh_data=0xDP\n"
 *     "boot info: cpus=N cmdline=C\n"
 *     "higherhalf ok\n"
 *
 * Then exit_code(0x11): exit status 35.  If an address is below the higher
 * half or the page tables do not map it to the expected physical address:
 * "FAIL <what>\n" and exit_code(0x30) (status 97); a bad boot info panics.
 */
#include "rt.h"

#define KERNEL_BASE 0xffffffff80000000ull
#define HH_OK_CODE 0x11
#define HH_FAIL_CODE 0x30

volatile uint64_t hh_data = 0x1234;

static void fail(const char *what)
{
    printf("FAIL %s\n", what);
    exit_code(HH_FAIL_CODE);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    uint64_t k = (uintptr_t)&kmain, d = (uintptr_t)&hh_data;
    printf("higherhalf: running in the top 2 GiB\n");
    printf("kmain=0x%016llx hh_data=0x%016llx\n", (unsigned long long)k, (unsigned long long)d);
    if (k < KERNEL_BASE || d < KERNEL_BASE)
        fail("not linked in the higher half");

    uint64_t kp = va_to_pa((const void *)&kmain), dp = va_to_pa((const void *)&hh_data);
    printf("phys: kmain=0x%016llx hh_data=0x%016llx\n", (unsigned long long)kp, (unsigned long long)dp);
    if (kp != k - KERNEL_BASE || dp != d - KERNEL_BASE)
        fail("page tables map the image elsewhere");
    if (hh_data != 0x1234)
        fail("data segment not loaded");

    printf("boot info: cpus=%u cmdline=%.*s\n", bi->nr_cpus, (int)bi->cmdline_len, bootinfo_cmdline(bi));
    printf("higherhalf ok\n");
    exit_code(HH_OK_CODE);
}
