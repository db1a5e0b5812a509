/* Flat real-mode guest for the exit benchmark: N one-byte OUTs, then the debug-exit port.
 * Built with -DCOUNT=<n>; loaded at 0x8000 by both minimon and pykvm. */
    .code16
    .globl _start
_start:
    mov $COUNT, %ecx
    mov $BENCH_PORT, %dx
    mov $0x5a, %al
1:  out %al, %dx
    dec %ecx
    jnz 1b
    mov $0xf4, %dx
    xor %eax, %eax
    out %al, %dx
2:  hlt
    jmp 2b
