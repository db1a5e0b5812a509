/*
 * hello: the smallest pykvm guest (64-bit pykvm ELF entry).
 *
 * Expected serial output, exact bytes, for `--cpus N --mem M --cmdline C`
 * (M in MiB; the RAM figure is bootinfo_ram_size(): ram_top, less the MMIO
 * hole when RAM extends above 4 GiB, in MiB, rounded down):
 *
 *     "Hello from pykvm!\n"
 *     "cpus=N ram=MM\n"
 *     "cmdline=C\n"
 *
 * e.g. defaults of 1 cpu, 128 MiB, empty command line:
 *     "Hello from pykvm!\ncpus=1 ram=128M\ncmdline=\n"
 *
 * Then power-off (outw 0x604, 0x2000): exit status 0.
 * A bad boot info panics instead: "PANIC: bad boot info: <why>\n" + pvpanic.
 */
#include "rt.h"

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("Hello from pykvm!\n");
    printf("cpus=%u ram=%lluM\n", bi->nr_cpus,
           (unsigned long long)(bootinfo_ram_size(bi) >> 20));
    printf("cmdline=%.*s\n", (int)bi->cmdline_len, bootinfo_cmdline(bi));
    poweroff();
}
