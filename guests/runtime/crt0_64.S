/*
 * 64-bit entry for pykvm-protocol guests (also used by higher-half guests:
 * everything here is RIP-relative).  In: RDI = &boot_info (physical,
 * identity-mapped), RSI = PYKVM_BOOT_MAGIC, IF = 0.
 */
#include "pykvm_abi.h"

#define RT_STACK_SIZE 16384

    .section .text.entry, "ax", @progbits
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov %rdi, %r12
    mov %rsi, %r13
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    lea rt_stack_top(%rip), %rsp
    xor %ebp, %ebp                  /* ends the frame-pointer chain */
    mov %r12, rt_boot_info(%rip)
    mov %r13, rt_boot_magic(%rip)
    mov %r12, %rdi
    call kmain
    call poweroff
1:  cli
    hlt
    jmp 1b
    .size _start, . - _start

    .section .data
    .balign 8
    .globl rt_boot_info, rt_boot_magic
    .type rt_boot_info, @object
rt_boot_info: .quad 0
    .size rt_boot_info, 8
    .type rt_boot_magic, @object
rt_boot_magic: .quad 0
    .size rt_boot_magic, 8

    .section .bss
    .balign 16
    .globl rt_stack, rt_stack_top
rt_stack:
    .skip RT_STACK_SIZE
rt_stack_top:

    .section .note.GNU-stack, "", @progbits
