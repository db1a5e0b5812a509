/*
 * 32-bit entry for multiboot guests: protected mode, paging off, flat
 * segments.  Calls kmain32(eax, ebx) (multiboot: magic, info address).
 */
#define RT_STACK_SIZE 16384

    .section .text.entry, "ax", @progbits
    .code32
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov %eax, %esi                  /* magic */
    /* ebx (info address) survives rep stosb */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov $rt_stack_top, %esp
    xor %ebp, %ebp                  /* ends the frame-pointer chain */
    sub $8, %esp                    /* keep 16-byte alignment at the call */
    push %ebx
    push %esi
    call kmain32
    call poweroff
1:  cli
    hlt
    jmp 1b
    .size _start, . - _start

    .section .bss
    .balign 16
    .globl rt_stack, rt_stack_top
rt_stack:
    .skip RT_STACK_SIZE
rt_stack_top:

    .section .note.GNU-stack, "", @progbits
