/*
 * The pykvm guest runtime: a tiny freestanding library shared by the bundled
 * guests.  Built three ways: 64-bit (-mcmodel=small, linked at 1 MiB),
 * 64-bit kernel model (higher-half guests) and 32-bit (multiboot guests).
 * Items marked [64] exist only in the 64-bit variants.
 *
 * Entry ([64], runtime/crt0_64.S): `_start` zeroes .bss, switches to a
 * 16 KiB stack inside .bss, saves RDI/RSI in rt_boot_info/rt_boot_magic and
 * calls kmain(rt_boot_info); if kmain returns, poweroff().
 * Entry (32-bit, runtime/crt0_32.S): likewise, calling
 * kmain32(eax, ebx) - for multiboot, the magic and the info address.
 *
 * Serial output is byte-exact: no "\n" -> "\r\n" translation.
 */
#ifndef RT_H
#define RT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "pykvm_abi.h"
#include "io.h"

#define RT_NORETURN __attribute__((noreturn))
#define RT_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ---- entry points the guest provides ---- */
#ifdef __x86_64__
void kmain(struct pykvm_boot_info *bi);
#else
void kmain32(uint32_t eax, uint32_t ebx);
#endif

/* ---- serial (16550 at PYKVM_PORT_COM1; polls LSR for THR empty) ---- */
void serial_putc(char c);
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);            /* no newline appended */
int serial_getc(void);                      /* waits for a received byte (polls, with pauses) */

/* ---- formatted output ----
 * Conversions: %d %i %u %x %X %c %s %p %%; length modifiers hh h l ll z;
 * flags '-', '0' and '#' (0x prefix for non-zero %x); field width (digits or *); precision for %s (.N or .*).
 * %p prints 0x followed by lower-case hex without leading zeros. */
int printf(const char *fmt, ...) RT_PRINTF(1, 2);
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) RT_PRINTF(3, 4);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- leaving the VM ---- */
/* Debug-exit port (8-bit out if v <= 0xff, else 32-bit): the VMM (and QEMU
 * isa-debug-exit) exits with status (v << 1) | 1. */
RT_NORETURN void exit_code(uint32_t v);
/* ACPI-style power-off (outw PYKVM_PORT_POWEROFF): the VMM exits 0. */
RT_NORETURN void poweroff(void);
/* Prints "PANIC: <message>\n", [64] records "PANIC=<message>\n" as the boot
 * info's crash info (appended to the crash info the guest registered with
 * bootinfo_set_crash_info, if any and shorter than 512 bytes), then
 * writes PYKVM_PVPANIC_PANICKED to the pvpanic port (the VMM stops the VM as
 * crashed and writes a core) and halts. */
RT_NORETURN void panic(const char *fmt, ...) RT_PRINTF(1, 2);

/* ---- fw_cfg (QEMU-compatible, port interface) ---- */
void fwcfg_select(uint16_t key);
void fwcfg_read(void *buf, size_t n);                    /* from the current item */
void fwcfg_read_item(uint16_t key, void *buf, size_t n); /* select + read */
uint16_t fwcfg_read16(uint16_t key);                     /* little-endian items */
uint32_t fwcfg_read32(uint16_t key);
uint64_t fwcfg_read64(uint16_t key);
int fwcfg_present(void);                                 /* signature is "QEMU" */

/* ---- boot info [64] ---- */
#ifdef __x86_64__
extern struct pykvm_boot_info *rt_boot_info;  /* RDI at entry */
extern uint64_t rt_boot_magic;                /* RSI at entry */
/* NULL if usable, else what is wrong with it (checks pointer, RSI magic,
 * magic, version, size, nr_mmap, cmdline_len, nr_cpus). */
const char *bootinfo_validate(const struct pykvm_boot_info *bi);
const char *bootinfo_cmdline(const struct pykvm_boot_info *bi); /* "" if none */
/* RAM size the VMM was given: ram_top, less the MMIO hole if above 4 GiB. */
uint64_t bootinfo_ram_size(const struct pykvm_boot_info *bi);
/* Sum of the PYKVM_MMAP_RAM entries. */
uint64_t bootinfo_ram_usable(const struct pykvm_boot_info *bi);
#define for_each_mmap(bi, e) \
    for ((e) = &(bi)->mmap[0]; (e) < &(bi)->mmap[(bi)->nr_mmap < PYKVM_MAX_MMAP ? (bi)->nr_mmap : PYKVM_MAX_MMAP]; (e)++)
/* Point the boot info's crash_info at text (a KEY=VALUE\n blob that lands
 * in the crash core); text must stay alive.  Translates the address. */
void bootinfo_set_crash_info(const char *text, size_t len);

/* ---- paging [64] ---- */
#define RT_NO_PHYS (~(uint64_t)0)
/* Walk the live page tables (CR3; tables must be identity-mapped, as the
 * VMM's are) and return the physical address of va, or RT_NO_PHYS. */
uint64_t va_to_pa(const void *va);
/* Make the 4 KiB page holding va not-present in the live page tables,
 * splitting the 1 GiB / 2 MiB mapping around it into smaller pages first
 * (new tables come from a small static pool in .bss), then reload CR3.
 * 0 on success, -1 if va was not mapped or the pool is exhausted.  Used by
 * the crash guests to make page 0 and stack guard pages fault. */
int page_unmap(const void *va);

/* ---- snapshot fuzzing [64] (runtime/fuzz.c; pykvm_abi.h PYKVM_PORT_FUZZ) ----
 * fuzz_setup(in, size) names the input buffer (in->data holds size bytes):
 * 1 under `pykvm fuzz` (coverage is recorded from then on), 0 without a
 * driver, -1 if `in` is not mapped. fuzz_snapshot() is "snapshot here": it
 * returns with in->len bytes of input in in->data (under a driver; without
 * one, in->len stays as it was). fuzz_done() ends the run: the VMM resets the
 * VM to the snapshot (without a driver it returns). fuzz_crash() reports a
 * bug the guest found itself. __sanitizer_cov_trace_pc is the callback of
 * gcc -fsanitize-coverage=trace-pc. */
int fuzz_setup(struct pykvm_fuzz_input *in, uint32_t size);
void fuzz_snapshot(void);
void fuzz_done(void);
void fuzz_crash(void);
/* FUZZ_TOKEN(name, "text"): hand the fuzzer "text" as a dictionary token
 * (pykvm_abi.h: PYKVM_FUZZ_TOKEN_MAX bytes at most, no NUL counted); the record
 * lands in .pykvm_fuzz_dict, which the linker script keeps out of the image. */
#define FUZZ_TOKEN(name, text)                                                  \
    _Static_assert(sizeof(text) > 1 && sizeof(text) - 1 <= PYKVM_FUZZ_TOKEN_MAX, \
                   "fuzz token length");                                      \
    static const struct __attribute__((packed)) {                             \
        uint8_t len;                                                           \
        char bytes[sizeof(text) - 1];                                          \
    } name __attribute__((used, aligned(1), section(".pykvm_fuzz_dict"))) =    \
        { sizeof(text) - 1, text }
void __sanitizer_cov_trace_pc(void);

/* ---- application processors [64] ----
 * rt_ap_start(cpu, entry) starts the AP with APIC id `cpu` (== vCPU index)
 * with INIT, SIPI, SIPI.  The real-mode trampoline (runtime/ap_trampoline.S)
 * must be linked at PYKVM_AP_TRAMPOLINE_ADDR: give the guest the `smp`
 * linker script (<name>_LDS := smp).  The AP enters long mode on the BSP's
 * CR0/CR3/CR4/EFER, loads its own GDT and TSS (IST stacks, so a #DF on an
 * AP still reaches the firmware stubs) and the BSP's current IDT, then calls
 * entry(cpu) from rt_ap_entry on its own 16 KiB stack (halts if entry
 * returns).  Returns 0 once the IPIs are delivered, without waiting for the
 * AP: the trampoline's parameters are shared, so have entry signal the BSP
 * and wait for that before starting the next AP. */
#define RT_MAX_CPUS 64
#define RT_AP_NO_IPI (-1)      /* an IPI's delivery status never cleared */
#define RT_AP_BAD_CPU (-2)     /* cpu is 0 or >= RT_MAX_CPUS */
#define RT_AP_BAD_SETUP (-3)   /* trampoline not a SIPI target, or CR3 >= 4 GiB */
extern char rt_ap_trampoline[];
int rt_ap_start(unsigned cpu, void (*entry)(unsigned cpu));

/* ---- interrupts [64] ----
 * idt_set_handler copies the current IDT (the firmware's exception
 * vectors) into a 256-entry runtime IDT on first use, loads it, and points
 * `vector` at handler (interrupt gate, current CS, no IST).
 * RT_IRQ_HANDLER(name, cfunc) defines an assembly entry `name` that saves
 * the caller-saved registers, calls void cfunc(void) and returns with iretq
 * (cfunc sends the EOI if needed). */
void idt_set_handler(uint8_t vector, void (*handler)(void));
#define RT_IRQ_HANDLER(name, cfunc)                                          \
    void name(void);                                                         \
    void cfunc(void);                                                        \
    __asm__(".pushsection .text\n"                                           \
            ".globl " #name "\n.type " #name ", @function\n"                 \
            #name ":\n"                                                      \
            "push %rax\npush %rcx\npush %rdx\npush %rsi\npush %rdi\n"        \
            "push %r8\npush %r9\npush %r10\npush %r11\n"                     \
            "cld\ncall " #cfunc "\n"                                         \
            "pop %r11\npop %r10\npop %r9\npop %r8\n"                         \
            "pop %rdi\npop %rsi\npop %rdx\npop %rcx\npop %rax\n"             \
            "iretq\n.size " #name ", . - " #name "\n.popsection")
#endif

/* ---- local APIC (xAPIC MMIO at PYKVM_LAPIC_BASE, or x2APIC MSRs) ---- */
#define LAPIC_ID 0x020
#define LAPIC_VERSION 0x030
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_MASKED (1u << 16)
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define LAPIC_SPURIOUS_VECTOR 0xff

/* lapic_read/write/id/eoi/send_ipi use the x2APIC MSRs (0x800 + reg/16;
 * EOI = MSR 0x80b) once the APIC is in x2APIC mode, else xAPIC MMIO. */
uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
uint32_t lapic_id(void);                 /* this CPU's APIC id */
/* software-enable (SVR), TPR 0; re-reads the mode (xAPIC or x2APIC) from IA32_APIC_BASE */
void lapic_enable(void);
/* Switch this CPU's APIC to x2APIC mode: 0, or -1 when CPUID does not offer it. */
int lapic_x2apic_enable(void);
int lapic_is_x2apic(void);
void lapic_eoi(void);
/* Send an IPI (ICR low word icr_lo) to apic_id; 0 once delivered, -1 if
 * the delivery-status bit never cleared. */
int lapic_send_ipi(uint32_t apic_id, uint32_t icr_lo);
int lapic_send_init(uint32_t apic_id);
int lapic_send_sipi(uint32_t apic_id, uint8_t vector); /* AP starts at vector << 12 */
/* One-shot timer: divide by 1, `count` bus cycles, then interrupt `vector`. */
void lapic_timer_oneshot(uint8_t vector, uint32_t count);
void lapic_timer_stop(void);

/* ---- spinlock (xchg-based; no cmpxchg16b anywhere) ---- */
typedef struct {
    volatile uint32_t locked;
} spinlock_t;
#define SPINLOCK_INIT { 0 }

static inline void spin_lock(spinlock_t *l)
{
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
        while (l->locked)
            cpu_relax();
}

static inline int spin_trylock(spinlock_t *l)
{
    return !__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE);
}

static inline void spin_unlock(spinlock_t *l)
{
    __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

/* ---- strings (gcc may emit calls to the mem* ones) ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* ---- bus doorbell and interrupt [64] (runtime/busirq.c) ----
 * bus_irq_init(hook) points PYKVM_BUS_VECTOR at a handler that counts the
 * interrupt in bus_irq_count, calls hook (if not NULL; runs with IF = 0, must
 * be short) and EOIs the local APIC; it enables the LAPIC and then interrupts
 * (sti).  bus_irq_wait(seen) halts until bus_irq_count != seen and returns it
 * (no lost wake-up: it checks with IF = 0 and halts with `sti; hlt`).
 * bus_doorbell(id) rings channel id's doorbell (outl PYKVM_PORT_BUS_DOORBELL);
 * the host takes it without a VM exit when it registered that id. */
#ifdef __x86_64__
extern volatile uint32_t bus_irq_count;
void bus_irq_init(void (*hook)(void));
uint32_t bus_irq_wait(uint32_t seen);
static inline void bus_doorbell(uint32_t channel_id)
{
    outl(PYKVM_PORT_BUS_DOORBELL, channel_id);
}
#endif

/* ---- command line (runtime/args.c) ----
 * arg_str: copy the value of the first `key=value` word into out (NUL-ended,
 * truncated to max - 1); 1 if the key is there. arg_u64: decimal or 0x hex,
 * def when absent or malformed. */
int arg_str(const char *cmdline, const char *key, char *out, size_t max);
uint64_t arg_u64(const char *cmdline, const char *key, uint64_t def);
/* arg_versions: "1.1,1.0" as version numbers (0x10001, 0x10000) into out (at
 * most max); how many, 0 when the key is absent, -1 when the value is malformed. */
int arg_versions(const char *cmdline, const char *key, uint32_t *out, int max);

#endif
