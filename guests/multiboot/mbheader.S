/*
 * Multiboot v1 header.  The ELF build relies on the ELF headers (flags 0x3:
 * page-align modules, want memory info); built with -DMB_KLUDGE it sets flag
 * bit 16 so a loader takes header_addr/load_addr/load_end_addr/bss_end_addr/
 * entry_addr from here (a.out kludge, for the flat multiboot-kludge.bin).
 * The address fields are present in both builds.
 */
#define MB_HEADER_MAGIC 0x1badb002
#ifdef MB_KLUDGE
#define MB_FLAGS 0x00010003
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a", @progbits
    .balign 4
    .globl mb_header
mb_header:
    .long MB_HEADER_MAGIC
    .long MB_FLAGS
    .long -(MB_HEADER_MAGIC + MB_FLAGS)
    .long mb_header                 /* header_addr */
    .long __image_start             /* load_addr */
    .long __data_end                /* load_end_addr */
    .long __bss_end                 /* bss_end_addr */
    .long _start                    /* entry_addr */

    .section .note.GNU-stack, "", @progbits
