/* Entry for the pykvm boot protocol: long mode, paging on, RDI = boot info. */
    .section .text.start, "ax"
    .globl _start
_start:
    lea     stack_top(%rip), %rsp
    xor     %ebp, %ebp              /* ends the frame-pointer chain for backtraces */
    call    kmain                   /* RDI (the boot info) passes straight through */
1:  cli
    hlt
    jmp     1b

    .section .bss
    .balign 16
    .space  16384
stack_top:

    .section .note.GNU-stack, "", @progbits
