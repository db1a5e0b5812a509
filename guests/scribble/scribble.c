/*
 * scribble: every vCPU writes pseudo-random words into guest RAM forever, and
 * the BSP also changes device state: the 16550's scratch register and line
 * control, and (with --device dma) DMA-engine copies inside RAM, which the
 * host writes and KVM's dirty log does not see. For the snapshot/reset tests
 * (tests/test_reset.py): whatever it wrote, a reset must undo.
 *
 * Serial output: "scribble: N cpus\n" once every AP runs, then nothing; it
 * never ends by itself.
 */
#include "rt.h"

#define AREA_PAGES 256             /* 1 MiB per vCPU */
#define MAX_CPUS 8

static uint64_t area[MAX_CPUS][AREA_PAGES * 512] __attribute__((aligned(4096)));
static volatile uint32_t online[MAX_CPUS];

static uint64_t next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void scribble(unsigned cpu, int devices)
{
    uint64_t seed = rdtsc() * 2654435761u + cpu + 1;
    uint64_t *mine = area[cpu];
    for (;;) {
        uint64_t r = next(&seed);
        mine[r % (AREA_PAGES * 512)] = next(&seed);
        if (devices && (r & 0xff) == 0) {
            outb(PYKVM_PORT_COM1 + 7, (uint8_t)(r >> 8));          /* scratch */
            outb(PYKVM_PORT_COM1 + 3, (uint8_t)((r >> 16) & 0x3f)); /* LCR, DLAB clear */
            uint64_t src = (uint64_t)(uintptr_t)&mine[(r >> 20) % (AREA_PAGES * 512 - 512)];
            uint64_t dst = (uint64_t)(uintptr_t)&mine[(r >> 40) % (AREA_PAGES * 512 - 512)];
            outl(PYKVM_PORT_DMA + PYKVM_DMA_SRC_LO, (uint32_t)src);
            outl(PYKVM_PORT_DMA + PYKVM_DMA_SRC_HI, (uint32_t)(src >> 32));
            outl(PYKVM_PORT_DMA + PYKVM_DMA_DST_LO, (uint32_t)dst);
            outl(PYKVM_PORT_DMA + PYKVM_DMA_DST_HI, (uint32_t)(dst >> 32));
            outl(PYKVM_PORT_DMA + PYKVM_DMA_LEN, 4096);
            outl(PYKVM_PORT_DMA + PYKVM_DMA_SCRATCH, (uint32_t)r);
            outl(PYKVM_PORT_DMA + PYKVM_DMA_CTRL, PYKVM_DMA_CTRL_ENABLE | PYKVM_DMA_CTRL_START);
        }
    }
}

static void ap_main(unsigned cpu)
{
    __atomic_store_n(&online[cpu], 1, __ATOMIC_RELEASE);
    scribble(cpu, 0);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    unsigned n = bi->nr_cpus < MAX_CPUS ? bi->nr_cpus : MAX_CPUS;
    lapic_enable();
    for (unsigned cpu = 1; cpu < n; cpu++) {
        if (rt_ap_start(cpu, ap_main))
            panic("IPI to apic id %u not delivered", cpu);
        while (!__atomic_load_n(&online[cpu], __ATOMIC_ACQUIRE))
            cpu_relax();
    }
    printf("scribble: %u cpus\n", n);
    scribble(0, 1);
}
