/*
 * crash-hh: a higher-half kernel (linked at 0xffffffff80100000, loaded at
 * 1 MiB, -mcmodel=kernel, like higherhalf) that writes through a bad pointer
 * three calls deep (kmain -> level1 -> level2 -> level3).
 *
 * hh_counter starts at 1 in .data; kmain sets it to 0x1000 and each level
 * adds one, so it is 0x1003 in the core (the ELF file still says 1).
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-hh: writing through a bad pointer from the higher half\n"
 *
 * Then: trigger "exception", vector 14 (#PF), error code 2 (write,
 * not-present), CR2 0xdead0000000 (canonical, far above RAM), RIP on the
 * store in level3() (an address >= 0xffffffff80000000); exit status 16 and
 * one core.
 * gdb: level3, level2, level1, kmain, _start.
 *
 * (0xdead0000 would not fault: the low 4 GiB are identity-mapped and that
 * address is in the MMIO hole, where unclaimed writes are dropped;
 * 0xdead00000000 is not canonical and raises #GP instead.)
 */
#include "rt.h"

#define FAIL_CODE 0x30
#define BAD_POINTER 0x00000dead0000000ull

volatile uint64_t hh_counter = 1;

__attribute__((noinline)) int level3(void)
{
    hh_counter++;
    *(volatile uint64_t *)BAD_POINTER = hh_counter;
    return 3;
}

__attribute__((noinline)) int level2(void)
{
    hh_counter++;
    int r = level3();
    return r + (int)hh_counter;
}

__attribute__((noinline)) int level1(void)
{
    hh_counter++;
    int r = level2();
    return r + (int)hh_counter;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);

    printf("crash-hh: writing through a bad pointer from the higher half\n");
    hh_counter = 0x1000;
    int r = level1();
    printf("FAIL bad pointer write returned (%d)\n", r);
    exit_code(FAIL_CODE);
}
