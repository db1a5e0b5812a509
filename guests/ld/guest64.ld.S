/*
 * Linker script for 64-bit pykvm-protocol guests (run through cpp).
 *
 *   default               linked and loaded at 1 MiB (virtual == physical)
 *   -DVIRT_BASE=<addr>    higher half: virtual VIRT_BASE + 1 MiB, physical
 *                         1 MiB (p_paddr via AT(); the VMM maps p_vaddr to it)
 *   -DWITH_TRAMPOLINE     adds the AP trampoline, its own PT_LOAD at
 *                         PYKVM_AP_TRAMPOLINE_ADDR (sections .tramp16,
 *                         .tramp32, .tramp64, .trampdata)
 *
 * Executable output sections ending in 16/32 are 16-/32-bit code (the
 * check-insns script disassembles them in that mode).
 */
#include "pykvm_abi.h"

#ifndef VIRT_BASE
#define VIRT_BASE 0
#endif
#define LOAD_ADDR 0x100000

OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(_start)

PHDRS
{
#ifdef WITH_TRAMPOLINE
    tramp PT_LOAD FLAGS(7);
#endif
    text PT_LOAD FLAGS(5);
    data PT_LOAD FLAGS(6);
}

SECTIONS
{
#ifdef WITH_TRAMPOLINE
    . = PYKVM_AP_TRAMPOLINE_ADDR;
    .tramp16 : AT(PYKVM_AP_TRAMPOLINE_ADDR) { KEEP(*(.tramp16)) } :tramp
    .tramp32 : { KEEP(*(.tramp32)) } :tramp
    .tramp64 : { KEEP(*(.tramp64)) } :tramp
    .trampdata : { KEEP(*(.trampdata)) } :tramp
    __tramp_end = .;
#endif

    . = VIRT_BASE + LOAD_ADDR;
    __image_start = .;
    .text : AT(ADDR(.text) - VIRT_BASE) { KEEP(*(.text.entry)) *(.text .text.*) } :text
    .rodata : AT(ADDR(.rodata) - VIRT_BASE) { *(.rodata .rodata.*) } :text
    . = ALIGN(4096);
    .data : AT(ADDR(.data) - VIRT_BASE) { *(.data .data.*) } :data
    .bss : AT(ADDR(.bss) - VIRT_BASE) {
        __bss_start = .;
        *(.bss .bss.*) *(COMMON)
        . = ALIGN(16);
        __bss_end = .;
    } :data
    __image_end = .;

    /* fuzz dictionary tokens (pykvm_abi.h): read from the file by pykvm fuzz, never loaded */
    .pykvm_fuzz_dict 0 (INFO) : { KEEP(*(.pykvm_fuzz_dict)) }

    /DISCARD/ : { *(.note.gnu.property) *(.note.GNU-stack) *(.comment) *(.eh_frame) *(.eh_frame_hdr) }
}

#ifdef WITH_TRAMPOLINE
ASSERT(__tramp_end <= PYKVM_FW_BASE, "AP trampoline overlaps the firmware area")
#endif
