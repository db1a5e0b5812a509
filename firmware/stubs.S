/*
 * pykvm firmware exception stubs.
 *
 * Loaded at PYKVM_STUBS_ADDR (linked there, loaded by PT_LOAD physical
 * address).  The VMM points IDT vectors 0..31 at
 *     pykvm_stubs64 + v * PYKVM_STUB_STRIDE   (64-bit IDT, pykvm ELF entry)
 *     pykvm_stubs32 + v * PYKVM_STUB_STRIDE   (32-bit IDT, multiboot entry)
 *
 * A stub pushes a zero error code for vectors where the CPU pushes none, then
 * the vector, then jumps to the common path which pushes the general-purpose
 * registers so the stack holds exactly struct pykvm_trap_frame64 (or
 * struct pykvm_trap_frame32) at RSP/ESP, writes the vector (8-bit out) to
 * PYKVM_PORT_FW_TRAP and halts forever with interrupts off.  The VMM reads
 * the frame at that exit; CR2 comes from the special registers.
 *
 * Nothing here may use int3, movbe, xrstor or cmpxchg16b (see check-insns).
 */
#include "pykvm_abi.h"

/* Vectors for which the CPU pushes an error code. */
#define HAS_ERR(v) ((v) == 8 || (v) == 10 || (v) == 11 || (v) == 12 || (v) == 13 || \
                    (v) == 14 || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

/* One stub; `.org` fails the assembly if a stub outgrows its slot. */
.macro STUB v, common
    .org \v * PYKVM_STUB_STRIDE, 0x90      /* pad with nop */
    .if HAS_ERR(\v) == 0
    push $0
    .endif
    push $\v
    jmp \common
.endm

.macro STUB_TABLE common
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    STUB \v, \common
    .endr
    .org 32 * PYKVM_STUB_STRIDE, 0x90
.endm

/* ------------------------------------------------------------------ 64-bit */
    .section .stubs64, "ax", @progbits
    .code64
    .globl pykvm_stubs64
    .type pykvm_stubs64, @function
pykvm_stubs64:
    STUB_TABLE pykvm_trap_common64
    .size pykvm_stubs64, . - pykvm_stubs64

    .globl pykvm_trap_common64
    .type pykvm_trap_common64, @function
pykvm_trap_common64:
    /* struct pykvm_trap_frame64: rax is highest, r15 lowest */
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov 15*8(%rsp), %eax            /* vector */
    mov $PYKVM_PORT_FW_TRAP, %dx
    out %al, %dx
1:  cli
    hlt
    jmp 1b
    .size pykvm_trap_common64, . - pykvm_trap_common64

/* ------------------------------------------------------------------ 32-bit */
    .section .stubs32, "ax", @progbits
    .code32
    .globl pykvm_stubs32
    .type pykvm_stubs32, @function
pykvm_stubs32:
    STUB_TABLE pykvm_trap_common32
    .size pykvm_stubs32, . - pykvm_stubs32

    .globl pykvm_trap_common32
    .type pykvm_trap_common32, @function
pykvm_trap_common32:
    /* struct pykvm_trap_frame32: pusha leaves edi lowest */
    pusha
    mov 8*4(%esp), %eax             /* vector */
    mov $PYKVM_PORT_FW_TRAP, %dx
    out %al, %dx
1:  cli
    hlt
    jmp 1b
    .size pykvm_trap_common32, . - pykvm_trap_common32

    .section .note.GNU-stack, "", @progbits
