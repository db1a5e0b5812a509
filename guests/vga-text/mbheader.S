/*
 * Multiboot v1 header of the vga-text guest (ELF: flags 0x3, page-aligned
 * modules and memory info; the loader reads the rest from the ELF headers).
 */
#define MB_HEADER_MAGIC 0x1badb002
#define MB_FLAGS 0x00000003

    .section .multiboot, "a", @progbits
    .balign 4
    .long MB_HEADER_MAGIC
    .long MB_FLAGS
    .long -(MB_HEADER_MAGIC + MB_FLAGS)

    .section .note.GNU-stack, "", @progbits
