/*
 * vga-text: a hobby-style kernel in the manner of OSDev's "Bare Bones". It
 * writes only to the VGA text buffer at 0xb8000 (never to the serial port),
 * moves the hardware cursor through the CRTC ports and checks the i8042.
 *
 * Screen (80x25, light grey on black unless said; rows from 0):
 *     row 0  "Hello from a hobby kernel!"        yellow on blue
 *     row 1  "VGA text mode, 80x25, no serial."
 *     row 2  "i8042 self-test: ok" or "i8042 self-test: 0x%02x" (the reply to 0xaa)
 *     row 3  "mode: exit" | "mode: crash" | "mode: reset"
 *     row 24 "bottom row" at column 60, "#" in the last cell (column 79)
 * Cursor: row 4, column 0.
 *
 * Mode from the command line (multiboot: "<kernel> [crash|reset]"):
 *     default  exit_code(0): exit status 1
 *     crash    ud2 after drawing: the VMM reports an invalid opcode and its
 *              core carries the screen above
 *     reset    out 0xfe to port 0x64 (pulse the CPU reset line, as Linux's
 *              reboot=k does): pykvm stops the VM with status 0
 */
#include "rt.h"

#define VGA ((volatile uint16_t *)PYKVM_VGA_TEXT_ADDR)
#define GREY 0x07
#define YELLOW_ON_BLUE 0x1e

static void put(int row, int col, const char *s, uint8_t attr)
{
    for (; *s && col < PYKVM_VGA_COLS; s++, col++)
        VGA[row * PYKVM_VGA_COLS + col] = (uint16_t)(attr << 8 | (uint8_t)*s);
}

static void cursor(int row, int col)
{
    uint16_t pos = (uint16_t)(row * PYKVM_VGA_COLS + col);
    outb(PYKVM_PORT_VGA_CRTC, 0x0f);
    outb(PYKVM_PORT_VGA_CRTC + 1, pos & 0xff);
    outb(PYKVM_PORT_VGA_CRTC, 0x0e);
    outb(PYKVM_PORT_VGA_CRTC + 1, pos >> 8);
}

static int i8042_wait_output(void)
{
    for (int i = 0; i < 100000; i++)
        if (inb(PYKVM_PORT_I8042_CMD) & 1)
            return 1;
    return 0;
}

static int has_word(const char *s, const char *w)
{
    size_t n = 0;
    while (w[n])
        n++;
    for (; *s; s++) {
        size_t i = 0;
        while (i < n && s[i] == w[i])
            i++;
        if (i == n && (s[n] == ' ' || s[n] == 0))
            return 1;
    }
    return 0;
}

void kmain32(uint32_t magic, uint32_t info)
{
    const char *cmdline = "";
    if (magic == 0x2badb002 && (((uint32_t *)info)[0] & (1u << 2)))
        cmdline = (const char *)((uint32_t *)info)[4];

    for (int i = 0; i < PYKVM_VGA_COLS * PYKVM_VGA_ROWS; i++)
        VGA[i] = (uint16_t)(GREY << 8 | ' ');
    put(0, 0, "Hello from a hobby kernel!", YELLOW_ON_BLUE);
    put(1, 0, "VGA text mode, 80x25, no serial.", GREY);

    char line[40];
    outb(PYKVM_PORT_I8042_CMD, 0xaa);
    int reply = i8042_wait_output() ? inb(PYKVM_PORT_I8042_DATA) : -1;
    if (reply == 0x55)
        put(2, 0, "i8042 self-test: ok", GREY);
    else {
        snprintf(line, sizeof line, "i8042 self-test: 0x%02x", reply & 0xff);
        put(2, 0, line, GREY);
    }
    const char *mode = has_word(cmdline, "crash") ? "crash" : has_word(cmdline, "reset") ? "reset" : "exit";
    snprintf(line, sizeof line, "mode: %s", mode);
    put(3, 0, line, GREY);
    put(24, 60, "bottom row", GREY);
    put(24, 79, "#", GREY);
    cursor(4, 0);

    if (mode[0] == 'c')
        __asm__ volatile("ud2");
    if (mode[0] == 'r') {
        outb(PYKVM_PORT_I8042_CMD, 0xfe);
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    exit_code(0);
}
