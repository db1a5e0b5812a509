/*
 * cpuid: prints the CPUID feature words the guest sees, so tests can check
 * what `--cpu host,+feat,-feat` did (64-bit pykvm ELF entry).
 *
 * Serial output, one line per word, lower-case hex without leading zeros:
 *
 *     "cpuid 1 ecx=%x edx=%x\n"
 *     "cpuid 7.0 ebx=%x ecx=%x edx=%x\n"             (zeros when leaf 7 is absent)
 *     "cpuid d.1 eax=%x\n"                           (zero when leaf 0xd is absent)
 *     "cpuid 80000001 ecx=%x edx=%x\n"               (zeros when absent)
 *     "apic_base=%x\n"                               the IA32_APIC_BASE MSR (bit 10: x2APIC enabled)
 *
 * Then power-off: exit status 0.
 */
#include "rt.h"

void kmain(struct pykvm_boot_info *bi)
{
    (void)bi;
    uint32_t max, ext, a, b, c, d;
    cpuid(0, 0, &max, &b, &c, &d);
    cpuid(0x80000000u, 0, &ext, &b, &c, &d);
    cpuid(1, 0, &a, &b, &c, &d);
    printf("cpuid 1 ecx=%x edx=%x\n", c, d);
    a = b = c = d = 0;
    if (max >= 7)
        cpuid(7, 0, &a, &b, &c, &d);
    printf("cpuid 7.0 ebx=%x ecx=%x edx=%x\n", b, c, d);
    a = 0;
    if (max >= 0xd)
        cpuid(0xd, 1, &a, &b, &c, &d);
    printf("cpuid d.1 eax=%x\n", a);
    c = d = 0;
    if (ext >= 0x80000001u)
        cpuid(0x80000001u, 0, &a, &b, &c, &d);
    printf("cpuid 80000001 ecx=%x edx=%x\n", c, d);
    printf("apic_base=%llx\n", (unsigned long long)rdmsr(0x1b));
    poweroff();
}
