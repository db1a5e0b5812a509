/* Software page-table walk of the live 4-level tables. */
#include "rt.h"

#define PTE_P (1ull << 0)
#define PTE_PS (1ull << 7)
#define PTE_ADDR 0x000ffffffffff000ull

uint64_t va_to_pa(const void *va)
{
    uint64_t v = (uintptr_t)va;
    uint64_t table = read_cr3() & PTE_ADDR;

    for (int level = 3; level >= 0; level--) {
        unsigned shift = 12 + 9 * level;
        uint64_t e = ((volatile uint64_t *)(uintptr_t)table)[(v >> shift) & 511];
        if (!(e & PTE_P))
            return RT_NO_PHYS;
        if (level == 0 || ((e & PTE_PS) && level <= 2)) {
            uint64_t mask = (1ull << shift) - 1;
            return ((e & PTE_ADDR) & ~mask) | (v & mask);
        }
        table = e & PTE_ADDR;
    }
    return RT_NO_PHYS;
}
