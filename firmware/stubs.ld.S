/* Linker script for the firmware exception stubs (run through cpp). */
#include "pykvm_abi.h"

OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(pykvm_stubs64)

PHDRS
{
    stubs PT_LOAD FLAGS(5);     /* R + X */
}

SECTIONS
{
    . = PYKVM_STUBS_ADDR;
    /* One output section per CPU mode so check-insns disassembles each
     * in the right mode (the name's 64/32 suffix says which). */
    .stubs64 : AT(PYKVM_STUBS_ADDR) { *(.stubs64) } :stubs
    .stubs32 : { . = ALIGN(16); *(.stubs32) } :stubs
    pykvm_stubs_end = .;

    /DISCARD/ : { *(.note.gnu.property) *(.comment) *(.eh_frame) }
}

ASSERT(pykvm_stubs_end - PYKVM_STUBS_ADDR <= PYKVM_STUBS_MAX, "firmware stubs exceed PYKVM_STUBS_MAX")
ASSERT(pykvm_stubs64 == PYKVM_STUBS_ADDR, "pykvm_stubs64 must start the image")
