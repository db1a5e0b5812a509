/*
 * Linker script for 32-bit multiboot guests (run through cpp): one segment
 * loaded at 1 MiB, the .multiboot header first so it is within the first
 * 8 KiB of the ELF file and at offset 0 of the flat image (a.out kludge,
 * built with objcopy -O binary: header_addr == load_addr == __image_start,
 * load_end_addr == __data_end == end of the file's contents, bss_end_addr
 * == __bss_end).  No gaps between the sections, so the flat image ends
 * exactly at __data_end (the Makefile checks it).
 */
#define LOAD_ADDR 0x100000

OUTPUT_FORMAT("elf32-i386")
OUTPUT_ARCH(i386)
ENTRY(_start)

PHDRS
{
    image PT_LOAD FLAGS(7);
}

SECTIONS
{
    . = LOAD_ADDR;
    __image_start = .;
    /* data, not code: its own output section keeps it out of check-insns */
    .multiboot : { KEEP(*(.multiboot)) } :image
    .text : { KEEP(*(.text.entry)) *(.text .text.*) } :image
    .rodata : { *(.rodata .rodata.*) } :image
    .data : { *(.data .data.*) } :image
    __data_end = .;
    .bss : {
        __bss_start = .;
        *(.bss .bss.*) *(COMMON)
        . = ALIGN(16);
        __bss_end = .;
    } :image
    __image_end = .;

    /DISCARD/ : { *(.note.gnu.property) *(.note.GNU-stack) *(.comment) *(.eh_frame) *(.eh_frame_hdr) }
}
