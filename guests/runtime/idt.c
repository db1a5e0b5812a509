/* A runtime-owned 256-entry IDT that keeps the firmware's exception vectors. */
#include "rt.h"

struct gate64 {
    uint16_t off0;
    uint16_t sel;
    uint8_t ist;
    uint8_t type;
    uint16_t off1;
    uint32_t off2;
    uint32_t zero;
} __attribute__((packed));

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

static struct gate64 idt[256] __attribute__((aligned(16)));
static int idt_loaded;

void idt_set_handler(uint8_t vector, void (*handler)(void))
{
    if (!idt_loaded) {
        struct dtr cur;
        __asm__ volatile("sidt %0" : "=m"(cur));
        size_t n = (size_t)cur.limit + 1;
        if (n > sizeof(idt))
            n = sizeof(idt);
        /* the firmware IDT lives in identity-mapped low memory */
        memcpy(idt, (const void *)(uintptr_t)cur.base, n);
        struct dtr mine = { sizeof(idt) - 1, (uintptr_t)idt };
        __asm__ volatile("lidt %0" : : "m"(mine));
        idt_loaded = 1;
    }
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    uint64_t a = (uintptr_t)handler;
    struct gate64 g = {
        .off0 = (uint16_t)a, .sel = cs, .ist = 0, .type = 0x8e,
        .off1 = (uint16_t)(a >> 16), .off2 = (uint32_t)(a >> 32), .zero = 0,
    };
    idt[vector] = g;
}
