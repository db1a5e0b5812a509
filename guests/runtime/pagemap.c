/* Changing the live page tables [64]: make one 4 KiB page not-present. */
#include "rt.h"

#define PTE_P (1ull << 0)
#define PTE_PS (1ull << 7)
#define PTE_ADDR 0x000ffffffffff000ull
/* Flags a split copies from the large entry to each small one (P, W, U,
 * PWT, PCD, A, D, G and NX; not PS, nor the large-page PAT bit 12). */
#define PTE_FLAGS_KEPT (0xfffull & ~PTE_PS)
#define PTE_NX (1ull << 63)

/* Enough to split one 1 GiB mapping and a few 2 MiB ones. */
#define RT_PT_POOL 8
static uint64_t rt_pt_pool[RT_PT_POOL][512] __attribute__((aligned(4096)));
static unsigned rt_pt_used;

int page_unmap(const void *va)
{
    uint64_t v = (uintptr_t)va;
    /* Tables are reached through their physical addresses: the VMM's
     * tables, and the pool (in this image's RAM), are identity-mapped. */
    volatile uint64_t *table = (volatile uint64_t *)(uintptr_t)(read_cr3() & PTE_ADDR);

    for (int level = 3; level >= 1; level--) {
        unsigned shift = 12 + 9 * level;
        volatile uint64_t *e = &table[(v >> shift) & 511];
        uint64_t ent = *e;
        if (!(ent & PTE_P))
            return -1;
        if ((ent & PTE_PS) && level <= 2) {
            /* A 1 GiB or 2 MiB leaf: replace it with a table of 512
             * entries mapping the same range one level down. */
            if (rt_pt_used == RT_PT_POOL)
                return -1;
            uint64_t *child = rt_pt_pool[rt_pt_used++];
            uint64_t child_pa = va_to_pa(child);
            if (child_pa == RT_NO_PHYS)
                return -1;
            uint64_t base = ent & PTE_ADDR & ~((1ull << shift) - 1);
            uint64_t flags = (ent & (PTE_FLAGS_KEPT | PTE_NX)) | (level == 2 ? PTE_PS : 0);
            unsigned step = shift - 9;
            for (unsigned i = 0; i < 512; i++)
                child[i] = (base + ((uint64_t)i << step)) | flags;
            barrier();
            *e = child_pa | (ent & 0x7) /* P, W, U */;
            ent = *e;
        }
        table = (volatile uint64_t *)(uintptr_t)(ent & PTE_ADDR);
    }
    volatile uint64_t *pte = &table[(v >> 12) & 511];
    if (!(*pte & PTE_P))
        return -1;
    *pte = 0;
    write_cr3(read_cr3());  /* flush the TLB, splits included */
    return 0;
}
