/* 16550 serial output on COM1: poll the line status register for THR empty. */
#include "rt.h"

#define UART_THR 0
#define UART_RBR 0
#define UART_LSR 5
#define UART_LSR_DR 0x01
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

int serial_getc(void)
{
    for (;;) {
        if (inb(PYKVM_PORT_COM1 + UART_LSR) & UART_LSR_DR)
            return inb(PYKVM_PORT_COM1 + UART_RBR);
        for (int i = 0; i < 1000; i++)       /* each LSR read is an exit: poll now and then */
            __asm__ volatile("pause");
    }
}
