/*
 * AP trampoline [64]: real mode -> protected mode -> long mode.
 *
 * Linked and loaded (its own PT_LOAD, see ld/guest64.ld.S -DWITH_TRAMPOLINE)
 * at PYKVM_AP_TRAMPOLINE_ADDR = 0x8000, so SIPI vector 0x08 starts an AP here
 * at CS:IP = 0x0800:0000.  Real-mode data references use DS = 0 and the
 * absolute (< 64 KiB) addresses.  Only linked into guests that call
 * rt_ap_start() (runtime/ap.c).
 *
 * Before each SIPI, rt_ap_start() fills rt_ap_tramp_params (struct
 * rt_ap_tramp_params in ap.c): the BSP's CR0/CR3/CR4/EFER, this AP's stack
 * top, the 64-bit entry point and the CPU number (passed in RDI).  The GDT
 * here uses the firmware selector numbers (PYKVM_SEL_*).
 */
#include "pykvm_abi.h"

#define MSR_EFER 0xc0000080

    .section .tramp16, "ax", @progbits
    .code16
    .globl rt_ap_trampoline
rt_ap_trampoline:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    lgdtl tramp_gdtr
    mov %cr0, %eax
    or $1, %eax                     /* PE */
    mov %eax, %cr0
    ljmpl $PYKVM_SEL_CODE32, $tramp_pm32

    .section .tramp32, "ax", @progbits
    .code32
tramp_pm32:
    mov $PYKVM_SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov tramp_cr4, %eax             /* PAE etc. (PCIDE masked by the BSP) */
    mov %eax, %cr4
    mov tramp_cr3, %eax             /* BSP's page tables (below 4 GiB) */
    mov %eax, %cr3
    mov $MSR_EFER, %ecx             /* LME (+NXE, SCE as on the BSP) */
    mov tramp_efer, %eax
    mov tramp_efer + 4, %edx
    wrmsr
    mov tramp_cr0, %eax             /* PG + PE: long mode, compatibility */
    mov %eax, %cr0
    ljmp $PYKVM_SEL_CODE64, $tramp_lm64

    .section .tramp64, "ax", @progbits
    .code64
tramp_lm64:
    mov $PYKVM_SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov tramp_stack(%rip), %rsp
    mov tramp_cpu(%rip), %rdi
    mov tramp_entry(%rip), %rax
    xor %ebp, %ebp                  /* ends the frame-pointer chain */
    call *%rax
1:  cli
    hlt
    jmp 1b

    .section .trampdata, "aw", @progbits
    .balign 16
tramp_gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* PYKVM_SEL_CODE64 (0x08): 64-bit code */
    .quad 0x00cf92000000ffff        /* PYKVM_SEL_DATA   (0x10): flat data */
    .quad 0x00cf9a000000ffff        /* PYKVM_SEL_CODE32 (0x18): flat 32-bit code */
tramp_gdt_end:
    .balign 8
tramp_gdtr:
    .word tramp_gdt_end - tramp_gdt - 1
    .long tramp_gdt

    .balign 8
    .globl rt_ap_tramp_params
    .type rt_ap_tramp_params, @object
rt_ap_tramp_params:
tramp_cr0:   .quad 0
tramp_cr3:   .quad 0
tramp_cr4:   .quad 0
tramp_efer:  .quad 0
tramp_stack: .quad 0
tramp_entry: .quad 0
tramp_cpu:   .quad 0
    .size rt_ap_tramp_params, . - rt_ap_tramp_params

    .section .note.GNU-stack, "", @progbits
