/*
 * multiboot: a 32-bit multiboot v1 guest (ELF, and the same program as the
 * a.out-kludge flat image multiboot-kludge.bin).  Prints the multiboot info
 * it was handed and fw_cfg's CPU count, then exits through the debug port.
 *
 * Expected serial output, exact bytes (%-fields as described; each line is
 * printed only under the stated condition):
 *
 *     "multiboot: magic ok\n"
 *     "flags=0x%x\n"                        the info's flags word, lower-case hex
 *     "mem_lower=%uK mem_upper=%uK\n"       if flags bit 0
 *     "cmdline=%s\n"                        if flags bit 2: kernel file name,
 *                                           space, --cmdline (QEMU convention)
 *     "mmap entries=%u\n"                   if flags bit 6
 *     "mods=%u\n"                           if flags bit 3
 *     "mod0: %s\n"                          if mods >= 1: module 0's bytes up to
 *                                           the first '\n' (at most 64; bytes
 *                                           outside 0x20..0x7e print as '.')
 *     "fwcfg cpus=%u\n"                     fw_cfg NB_CPUS ("fwcfg absent\n" if
 *                                           there is no fw_cfg signature)
 *     "multiboot ok\n"
 *
 * Then exit_code(0): exit status 1.  Without the bootloader magic in EAX:
 * "FAIL magic 0x%x\n" and exit_code(0x30) (status 97).
 *
 * Under pykvm (`pykvm run build/guests/multiboot.elf --mem 128 --cmdline "a b"
 * --initrd F`, F's first line "hello initrd", any --cpus N), as of this
 * writing (flags, mem_lower and the mmap count come from pykvm's multiboot
 * info: flags 0x24d = MEM|CMDLINE|MODS|MMAP|BOOTLOADER_NAME; mem_lower is
 * the 64 KiB below the firmware area; 3 mmap entries, 4 when RAM extends
 * above 4 GiB):
 *
 *     multiboot: magic ok
 *     flags=0x24d
 *     mem_lower=64K mem_upper=130048K
 *     cmdline=build/guests/multiboot.elf a b
 *     mmap entries=3
 *     mods=1
 *     mod0: hello initrd
 *     fwcfg cpus=N
 *     multiboot ok
 *
 * (the cmdline starts with the kernel argument exactly as given to pykvm;
 * without --initrd the module lines are "mods=0\n" only; mem_upper is
 * (RAM below the MMIO hole - 1 MiB) / 1 KiB: 64512 for --mem 64.)
 *
 * Under QEMU 7.2 (`qemu-system-x86_64 -kernel build/guests/multiboot.elf
 * -device isa-debug-exit,iobase=0xf4,iosize=0x04 -serial stdio -display none
 * -m 128 -append "a b" -initrd F`) the same program prints flags=0x24f,
 * mem_lower=639K mem_upper=129920K and mmap entries=7, the rest identical.
 */
#include "rt.h"

#define MB_BOOT_MAGIC 0x2badb002
#define MB_OK_CODE 0x00
#define MB_FAIL_CODE 0x30

#define MBI_MEM (1u << 0)
#define MBI_CMDLINE (1u << 2)
#define MBI_MODS (1u << 3)
#define MBI_MMAP (1u << 6)

struct mb_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
};

struct mb_module {
    uint32_t mod_start, mod_end;
    uint32_t string;
    uint32_t reserved;
};

struct mb_mmap_entry {
    uint32_t size;          /* of the rest of the entry */
    uint64_t addr, len;
    uint32_t type;
} __attribute__((packed));

#define MOD_LINE_MAX 64

static void print_mod_line(const struct mb_module *m)
{
    char line[MOD_LINE_MAX + 1];
    const uint8_t *p = (const uint8_t *)m->mod_start;
    uint32_t len = m->mod_end > m->mod_start ? m->mod_end - m->mod_start : 0;
    unsigned n = 0;
    while (n < len && n < MOD_LINE_MAX && p[n] != '\n') {
        line[n] = p[n] >= 0x20 && p[n] < 0x7f ? (char)p[n] : '.';
        n++;
    }
    line[n] = '\0';
    printf("mod0: %s\n", line);
}

void kmain32(uint32_t magic, uint32_t info)
{
    if (magic != MB_BOOT_MAGIC) {
        printf("FAIL magic 0x%x\n", magic);
        exit_code(MB_FAIL_CODE);
    }
    const struct mb_info *mbi = (const struct mb_info *)info;
    printf("multiboot: magic ok\n");
    printf("flags=0x%x\n", mbi->flags);
    if (mbi->flags & MBI_MEM)
        printf("mem_lower=%uK mem_upper=%uK\n", mbi->mem_lower, mbi->mem_upper);
    if (mbi->flags & MBI_CMDLINE)
        printf("cmdline=%.*s\n", PYKVM_CMDLINE_MAX, (const char *)mbi->cmdline);
    if (mbi->flags & MBI_MMAP) {
        unsigned n = 0;
        uint32_t off = 0;
        while (off + 4 <= mbi->mmap_length && n < 1024) {
            const struct mb_mmap_entry *e = (const void *)(mbi->mmap_addr + off);
            off += e->size + 4;
            n++;
        }
        printf("mmap entries=%u\n", n);
    }
    if (mbi->flags & MBI_MODS) {
        printf("mods=%u\n", mbi->mods_count);
        if (mbi->mods_count)
            print_mod_line((const struct mb_module *)mbi->mods_addr);
    }
    if (fwcfg_present())
        printf("fwcfg cpus=%u\n", fwcfg_read16(PYKVM_FWCFG_NB_CPUS));
    else
        printf("fwcfg absent\n");
    printf("multiboot ok\n");
    exit_code(MB_OK_CODE);
}
