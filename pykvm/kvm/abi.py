"""cffi (ABI mode) declarations of the linux/kvm.h structures pykvm uses, plus libc.

Field names match the kernel headers exactly: tests/test_kvm_abi_crosscheck.py compiles
a C program against <linux/kvm.h> and checks every size and offset declared here.
Anonymous unions are kept anonymous so ``run.io.port`` and ``level.irq`` read as in C.
The declarations are parsed once and cached (pykvm/startup/ffigen.py), not on every run.
"""

from ..startup import ffigen

CDEF = """
/* ---- asm/kvm.h (x86) ---- */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    uint8_t  padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];          /* (KVM_NR_INTERRUPTS + 63) / 64 */
};

struct kvm_fpu {
    uint8_t  fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t  ftwx;
    uint8_t  pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t  xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];
};

struct kvm_vcpu_events {
    struct {
        uint8_t  injected;
        uint8_t  nr;
        uint8_t  has_error_code;
        uint8_t  pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t  reserved[26];
    uint8_t  exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_lapic_state {
    char regs[1024];                       /* KVM_APIC_REG_SIZE */
};

struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];               /* KVM_MAX_XCRS */
    uint64_t padding[16];
};

struct kvm_sync_regs {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
};

/* ---- linux/kvm.h ---- */
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_interrupt {
    uint32_t irq;
};

struct kvm_irq_level {
    union {
        uint32_t irq;
        int32_t  status;
    };
    uint32_t level;
};

struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

struct kvm_run {
    uint8_t  request_interrupt_window;
    uint8_t  immediate_exit;
    uint8_t  padding1[6];

    uint32_t exit_reason;
    uint8_t  ready_for_interrupt_injection;
    uint8_t  if_flag;
    uint16_t flags;

    uint64_t cr8;
    uint64_t apic_base;

    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
        } ex;
        struct {
            uint8_t  direction;
            uint8_t  size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;          /* relative to the start of kvm_run */
        } io;
        struct {
            struct kvm_debug_exit_arch arch;
        } debug;
        struct {
            uint64_t phys_addr;
            uint8_t  data[8];
            uint32_t len;
            uint8_t  is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            uint32_t longmode;
            uint32_t pad;
        } hypercall;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        /* overlay of 'internal' for KVM_INTERNAL_ERROR_EMULATION: the failing bytes */
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            union {
                struct {
                    uint8_t insn_size;
                    uint8_t insn_bytes[15];
                };
            };
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        struct {
            uint8_t vector;
        } eoi;
        struct {
            uint8_t  error;
            uint8_t  pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        struct {
            uint32_t flags;
        } notify;
        char padding[256];                 /* fixes the size of the exit union */
    };

    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        struct kvm_sync_regs regs;
        char padding[2048];                /* SYNC_REGS_SIZE_BYTES */
    } s;
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    union {
        uint32_t pad;
        uint32_t pio;
    };
};

struct kvm_coalesced_mmio {
    uint64_t phys_addr;
    uint32_t len;
    union {
        uint32_t pad;
        uint32_t pio;
    };
    uint8_t  data[8];
};

struct kvm_coalesced_mmio_ring {
    uint32_t first, last;
    struct kvm_coalesced_mmio coalesced_mmio[];
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t  valid;
    uint8_t  writeable;
    uint8_t  usermode;
    uint8_t  pad[5];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t  fd;
    uint32_t flags;
    uint8_t  pad[36];
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t  pad[64];
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    union {
        uint32_t pad;
        uint32_t devid;
    };
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];                   /* the other route kinds are not used */
    } u;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t  pad[16];
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};

struct kvm_xsave {
    uint32_t region[1024];                 /* the legacy 4 KiB XSAVE area (KVM_GET_XSAVE) */
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;                /* one bit per page of the slot */
        uint64_t padding2;
    };
};

struct kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    union {
        void *dirty_bitmap;                /* one bit per page from first_page */
        uint64_t padding2;
    };
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t  pad[12];
};

/* ---- libc ---- */
int ioctl(int fd, unsigned long request, ...);
int *__errno_location(void);
int pthread_kill(unsigned long thread, int sig);
"""
ffi = ffigen.load("kvm", CDEF)

# libc; ffi.errno (saved by cffi right after each call, per thread) is what callers
# should read, __errno_location is only declared for completeness.
lib = ffi.dlopen(None)


def field_offsets(ctype):
    """Map dotted field paths of a struct ("io.port") to byte offsets, nested fields included."""
    out = {}

    def walk(t, prefix, base):
        for name, field in t.fields:
            path = prefix + name
            out[path] = base + field.offset
            if field.type.kind in ("struct", "union"):
                walk(field.type, path + ".", base + field.offset)

    walk(ffi.typeof(ctype), "", 0)
    return out


def cdata_to_python(value):
    """Convert a struct/array cdata to plain dicts, lists and ints (a deep copy)."""
    if not isinstance(value, ffi.CData):
        return value  # primitive fields already come back as Python ints
    t = ffi.typeof(value)
    if t.kind in ("struct", "union"):
        return {name: cdata_to_python(getattr(value, name)) for name, _ in t.fields}
    if t.kind == "array":
        if t.item.cname == "char":
            return ffi.buffer(value)[:]
        return [cdata_to_python(item) for item in value]
    return value
