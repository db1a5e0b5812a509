/*
 * crash-smp: run with --cpus 2.  The BSP starts vCPU 1 (rt_ap_start: INIT,
 * SIPI, SIPI into the runtime's trampoline at 0x8000) and spins; the AP
 * reads through a bad pointer in ap_crash() (ap_main -> ap_crash).
 *
 * Expected serial output, exact bytes:
 *
 *     "crash-smp: cpu 0 starting cpu 1\n"                 (BSP)
 *     "crash-smp: cpu 1 reading a bad pointer\n"          (AP)
 *
 * Then: the crash is on vCPU 1: trigger "exception", vector 14 (#PF),
 * error code 0 (read, not-present), CR2 0xbad00000000 (canonical, far above
 * RAM, so unmapped), RIP on the load in ap_crash(); exit status 16 and one
 * core with two NT_PRSTATUS notes, vCPU 1 (pr_pid 2) first, so gdb's current
 * thread is LWP 2 with backtrace ap_crash, ap_main, rt_ap_entry.  The BSP
 * (LWP 1) is in bsp_wait(); bsp_spins counts its loop iterations.
 * With fewer than 2 vCPUs, or if the AP never crashes within ~10 s of TSC
 * time: "FAIL ...\n", exit_code(0x30) (status 97).
 */
#include "rt.h"

#define FAIL_CODE 0x30
#define BAD_POINTER 0x00000bad00000000ull
#define WAIT_TSC 20000000000ull   /* ~10 s at 2 GHz */

volatile uint64_t bsp_spins;
volatile uint64_t ap_sink;

__attribute__((noinline)) uint64_t ap_crash(void)
{
    return *(volatile uint64_t *)BAD_POINTER;
}

static void ap_main(unsigned cpu)
{
    /* crash only once the BSP is spinning in bsp_wait(), not still sending the second SIPI:
     * the core must show it there however the host schedules the two vCPU threads */
    uint64_t start = rdtsc();
    while (!bsp_spins && rdtsc() - start < WAIT_TSC)
        cpu_relax();
    printf("crash-smp: cpu %u reading a bad pointer\n", cpu);
    ap_sink = ap_crash();
    printf("FAIL bad pointer read returned\n");
    exit_code(FAIL_CODE);
}

__attribute__((noinline)) void bsp_wait(void)
{
    uint64_t start = rdtsc();
    while (rdtsc() - start < WAIT_TSC) {
        bsp_spins++;
        cpu_relax();
    }
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    if (bi->nr_cpus < 2) {
        printf("FAIL crash-smp needs --cpus 2 (has %u)\n", bi->nr_cpus);
        exit_code(FAIL_CODE);
    }

    lapic_enable();
    printf("crash-smp: cpu 0 starting cpu 1\n");
    int rc = rt_ap_start(1, ap_main);
    if (rc) {
        printf("FAIL rt_ap_start: %d\n", rc);
        exit_code(FAIL_CODE);
    }
    bsp_wait();
    printf("FAIL cpu 1 did not crash\n");
    exit_code(FAIL_CODE);
}
