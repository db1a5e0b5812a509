/* 16550 serial output on COM1: poll the line status register for THR empty. */
#include "rt.h"

#define UART_THR 0
#define UART_LSR 5
#define UART_LSR_THRE 0x20

void serial_putc(char c)
{
    /* Bounded: a UART that never reports empty must not hang the guest. */
    for (unsigned i = 0; i < 1000000; i++)
        if (inb(PYKVM_PORT_COM1 + UART_LSR) & UART_LSR_THRE)
            break;
    outb(PYKVM_PORT_COM1 + UART_THR, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
    while (n--)
        serial_putc(*s++);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}
