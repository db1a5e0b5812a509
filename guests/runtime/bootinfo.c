/* pykvm boot info helpers (64-bit entry protocol). */
#include "rt.h"

const char *bootinfo_validate(const struct pykvm_boot_info *bi)
{
    if (!bi)
        return "no boot info pointer";
    if (rt_boot_magic != PYKVM_BOOT_MAGIC)
        return "bad magic in RSI";
    if (bi->magic != PYKVM_BOOT_MAGIC)
        return "bad boot info magic";
    if (bi->version != PYKVM_ABI_VERSION)
        return "unsupported boot info version";
    if (bi->size < sizeof(*bi))
        return "boot info too small";
    if (bi->nr_mmap > PYKVM_MAX_MMAP)
        return "too many memory map entries";
    if (bi->cmdline_len >= PYKVM_CMDLINE_MAX)
        return "command line too long";
    if (bi->nr_cpus == 0)
        return "no cpus";
    return 0;
}

const char *bootinfo_cmdline(const struct pykvm_boot_info *bi)
{
    if (!bi->cmdline_addr || !bi->cmdline_len)
        return "";
    return (const char *)(uintptr_t)bi->cmdline_addr;
}

uint64_t bootinfo_ram_size(const struct pykvm_boot_info *bi)
{
    const uint64_t four_g = 0x100000000ull;
    if (bi->ram_top > four_g)
        return bi->ram_top - (four_g - PYKVM_MMIO_HOLE);
    return bi->ram_top;
}

uint64_t bootinfo_ram_usable(const struct pykvm_boot_info *bi)
{
    const struct pykvm_mmap_entry *e;
    uint64_t sum = 0;
    for_each_mmap(bi, e)
        if (e->type == PYKVM_MMAP_RAM)
            sum += e->len;
    return sum;
}

void bootinfo_set_crash_info(const char *text, size_t len)
{
    struct pykvm_boot_info *bi = rt_boot_info;
    uint64_t pa = va_to_pa(text);
    if (!bi || pa == RT_NO_PHYS)
        return;
    if (len > PYKVM_CRASH_INFO_MAX)
        len = PYKVM_CRASH_INFO_MAX;
    bi->crash_info_len = 0;
    barrier();
    bi->crash_info_addr = pa;
    barrier();
    bi->crash_info_len = (uint32_t)len;
}
