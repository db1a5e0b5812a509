/*
 * pykvm guest ABI: the one source of truth shared by the VMM and guests.
 *
 * The VMM reads this very file with cffi (pykvm/boot/abi.py), so it must stay
 * within what cffi's cdef parser accepts: plain integer #defines (decimal or
 * hex, no suffixes, no expressions) and structs of fixed-width integer types.
 * Include guards and #include lines are stripped by the VMM before parsing.
 */
#ifndef PYKVM_ABI_H
#define PYKVM_ABI_H

/* Assembly sources (firmware stubs, guest crt0) include this header too:
 * only the #defines are visible to them, the structs are C-only. */
#if !defined(PYKVM_HOST_PARSER) && !defined(__ASSEMBLER__)
#include <stdint.h>
#endif

#define PYKVM_ABI_VERSION 1
/* "PKVM" little-endian; passed in RSI at entry and stored in the boot info */
#define PYKVM_BOOT_MAGIC 0x4d564b50

/* ---- I/O ports ---- */
#define PYKVM_PORT_COM1 0x3f8
#define PYKVM_PORT_DEBUG_EXIT 0xf4
#define PYKVM_PORT_PVPANIC 0x505
#define PYKVM_PORT_FWCFG_CTL 0x510
#define PYKVM_PORT_FWCFG_DATA 0x511
/* The firmware exception stubs write here after pushing a trap frame (an
 * 8-bit out of the vector number; RSP/ESP then points at the frame). */
#define PYKVM_PORT_FW_TRAP 0x5f0
/* Clean power-off: a 16-bit write of PYKVM_POWEROFF_VALUE (QEMU's ACPI
 * PM1a_CNT with SLP_EN) makes the VMM exit with status 0. */
#define PYKVM_PORT_POWEROFF 0x604
#define PYKVM_POWEROFF_VALUE 0x2000
/* PC legacy devices hobby kernels use: the VGA CRTC index/data pair (cursor
 * position in registers 0x0e/0x0f), the 80x25 colour text buffer, and the
 * i8042 keyboard controller (data, status/command; command 0xfe resets). */
#define PYKVM_PORT_VGA_CRTC 0x3d4
#define PYKVM_VGA_TEXT_ADDR 0xb8000
#define PYKVM_VGA_COLS 80
#define PYKVM_VGA_ROWS 25
#define PYKVM_PORT_I8042_DATA 0x60
#define PYKVM_PORT_I8042_CMD 0x64
/* Never claimed by any pykvm device: the exits guest probes it with 1-, 2-
 * and 4-byte and string accesses (reads return all ones, writes are dropped). */
#define PYKVM_PORT_UNCLAIMED 0x7e0

/* Power control: select a device by its base (I/O port, or low 32 bits of its
 * MMIO base), then read its power state or write the state it should enter. */
#define PYKVM_PORT_POWERCTL 0x5e0
#define PYKVM_POWERCTL_SELECT 0
#define PYKVM_POWERCTL_STATE 4
#define PYKVM_POWERCTL_GENERATION 8
#define PYKVM_POWER_D0 0
#define PYKVM_POWER_D3 3
#define PYKVM_POWER_FAILED 0xfe
#define PYKVM_POWER_ABSENT 0xff

/* Mailbox: 256 32-bit slots the guest writes and reads back; supervised by the
 * VMM (a failed model is replaced, its slots restored from the last good state). */
#define PYKVM_PORT_MAILBOX 0x5c0
#define PYKVM_MAILBOX_INDEX 0
#define PYKVM_MAILBOX_DATA 4
#define PYKVM_MAILBOX_STATUS 8
#define PYKVM_MAILBOX_HOST_FLAGS 12
#define PYKVM_MAILBOX_SLOTS 256
#define PYKVM_MAILBOX_MAGIC 0x4d42
#define PYKVM_MAILBOX_FLAG_STOP 1

/* pvpanic events (QEMU semantics) */
#define PYKVM_PVPANIC_PANICKED 1
#define PYKVM_PVPANIC_CRASH_LOADED 2

/* fw_cfg selectors answered (QEMU numbering; MAX_RAM as kvm-unit-tests uses it) */
#define PYKVM_FWCFG_SIGNATURE 0x00
#define PYKVM_FWCFG_ID 0x01
#define PYKVM_FWCFG_RAM_SIZE 0x03
#define PYKVM_FWCFG_NB_CPUS 0x05
#define PYKVM_FWCFG_MAX_CPUS 0x0f
#define PYKVM_FWCFG_MAX_RAM 0x11

/* ---- guest-physical layout of the firmware area ---- */
/* [0, FW_BASE) is free for guests (AP trampolines live there); the firmware
 * area is reported as reserved in every memory map. */
#define PYKVM_FW_BASE 0x10000
#define PYKVM_GDT_ADDR 0x10000
#define PYKVM_TSS_ADDR 0x10800
#define PYKVM_IDT64_ADDR 0x11000
#define PYKVM_IDT32_ADDR 0x12000
#define PYKVM_BOOTINFO_ADDR 0x13000
#define PYKVM_CMDLINE_ADDR 0x14000
#define PYKVM_CMDLINE_MAX 4096
#define PYKVM_MBI_ADDR 0x15000
#define PYKVM_STUBS_ADDR 0x16000
#define PYKVM_STUBS_MAX 0x2000
/* IST stack for #DF, NMI and #MC: a stack overflow still reports */
#define PYKVM_IST_STACK_TOP 0x1c000
/* RSP at 64-bit entry */
#define PYKVM_BOOT_STACK_TOP 0x20000
#define PYKVM_PAGETABLE_ADDR 0x20000
#define PYKVM_FW_END 0x9f000

/* ---- ACPI tables (pykvm/boot/acpi/) ---- */
/* The RSDP sits where kernels scan for it (the BIOS area 0xe0000-0xfffff, on a
 * 16-byte boundary); the other tables fill [TABLES_ADDR, END). All of it lies
 * in the reserved part of every memory map pykvm hands out, and no kernel
 * segment or module may be loaded over it. */
#define PYKVM_ACPI_RSDP_ADDR 0xe0000
#define PYKVM_ACPI_TABLES_ADDR 0xe1000
#define PYKVM_ACPI_END 0x100000

/* Start of the MMIO hole below 4 GiB; RAM beyond it continues at 4 GiB. */
#define PYKVM_MMIO_HOLE 0xc0000000
#define PYKVM_LAPIC_BASE 0xfee00000
/* A guest-physical address in the hole that no device claims: the exits guest
 * reads it (all ones at every width) and writes it (dropped). */
#define PYKVM_MMIO_UNCLAIMED 0xd0000000
/* Identity device (pykvm/devices/identity.py, identity.toml): three pages of
 * MMIO. Page 0 (window "ident") and page 1 (window "status") are memory-backed
 * windows: reads are served from memory without an exit, writes trap. Page 2
 * is plain MMIO: LOG is a coalesced write-only register, reading FLUSH exits
 * (so queued LOG writes are applied first) and returns LOG_COUNT. Offsets are
 * from PYKVM_IDENT_BASE. */
#define PYKVM_IDENT_BASE 0xfe000000
#define PYKVM_IDENT_SIZE 0x3000
#define PYKVM_IDENT_VENDOR_ID 0x000
#define PYKVM_IDENT_DEVICE_ID 0x004
#define PYKVM_IDENT_VERSION 0x008
#define PYKVM_IDENT_CAPS 0x00c
#define PYKVM_IDENT_SERIAL 0x010
#define PYKVM_IDENT_SERIAL_LEN 32
#define PYKVM_IDENT_CONTROL 0x030
#define PYKVM_IDENT_CONFIG_GEN 0x034
#define PYKVM_IDENT_CONFIG 0x040
#define PYKVM_IDENT_CONFIG_WORDS 16
#define PYKVM_IDENT_STATUS_PAGE 0x1000
#define PYKVM_IDENT_TICK 0x1000
#define PYKVM_IDENT_STATUS 0x1008
#define PYKVM_IDENT_TRAPPED_READS 0x100c
#define PYKVM_IDENT_LOG_COUNT 0x1010
#define PYKVM_IDENT_LOG_HASH 0x1014
#define PYKVM_IDENT_LOG 0x2000
#define PYKVM_IDENT_FLUSH 0x2004
#define PYKVM_IDENT_VENDOR 0x7079
#define PYKVM_IDENT_DEVICE 0x6b76
#define PYKVM_IDENT_VERSION_VALUE 0x00010002
/* CAPS bits */
#define PYKVM_IDENT_CAP_BACKED 0x1
#define PYKVM_IDENT_CAP_TRAPPED 0x2
#define PYKVM_IDENT_CAP_COALESCED_LOG 0x4
#define PYKVM_IDENT_CAP_TICK 0x8
/* CONTROL bits: switch a window to trapped mode (every read exits) */
#define PYKVM_IDENT_CTL_TRAP_STATUS 0x1
#define PYKVM_IDENT_CTL_TRAP_IDENT 0x2
/* STATUS bits */
#define PYKVM_IDENT_ST_RUNNING 0x1
#define PYKVM_IDENT_ST_STATUS_TRAPPED 0x2
#define PYKVM_IDENT_ST_IDENT_TRAPPED 0x4
/* LOG_HASH: FNV-1a over 32-bit words, h = (h ^ v) * prime mod 2^32 */
#define PYKVM_IDENT_HASH_INIT 0x811c9dc5
#define PYKVM_IDENT_HASH_PRIME 0x01000193

/* DMA engine (pykvm/devices/dma.py; what each trust level may do: dma.toml):
 * memory-to-memory copies inside guest RAM. 32-bit registers at
 * PYKVM_PORT_DMA + offset; offsets 0x24..0x2f decode but hold no register. */
#define PYKVM_PORT_DMA 0x6c0
#define PYKVM_DMA_PORTS 0x30
#define PYKVM_DMA_SRC_LO 0x00
#define PYKVM_DMA_SRC_HI 0x04
#define PYKVM_DMA_DST_LO 0x08
#define PYKVM_DMA_DST_HI 0x0c
#define PYKVM_DMA_LEN 0x10
#define PYKVM_DMA_CTRL 0x14
#define PYKVM_DMA_STATUS 0x18
#define PYKVM_DMA_RESET 0x1c
#define PYKVM_DMA_SCRATCH 0x20
/* LEN is capped here by the engine */
#define PYKVM_DMA_MAX_LEN 0x10000
/* CTRL: START runs the copy (reads 0); ENABLE is the bus-master enable;
 * IRQ_EN raises the line in bits 8-11 when a copy completes */
#define PYKVM_DMA_CTRL_START 0x1
#define PYKVM_DMA_CTRL_ENABLE 0x2
#define PYKVM_DMA_CTRL_IRQ_EN 0x4
#define PYKVM_DMA_CTRL_IRQ_SHIFT 8
#define PYKVM_DMA_CTRL_IRQ_MASK 0xf00
/* STATUS: DONE, ERROR, error code in bits 8-15 */
#define PYKVM_DMA_STATUS_DONE 0x1
#define PYKVM_DMA_STATUS_ERROR 0x2
#define PYKVM_DMA_ERR_SHIFT 8
#define PYKVM_DMA_ERR_DISABLED 1
#define PYKVM_DMA_ERR_RANGE 2

/* Where the bundled SMP guest puts its real-mode AP trampoline (SIPI vector
 * 0x08); any page below PYKVM_FW_BASE works. */
#define PYKVM_AP_TRAMPOLINE_ADDR 0x8000

/* ---- GDT selectors set up for 64-bit and multiboot entry ---- */
#define PYKVM_SEL_CODE64 0x08
#define PYKVM_SEL_DATA 0x10
#define PYKVM_SEL_CODE32 0x18
#define PYKVM_SEL_TSS 0x20

/* Each exception stub is this many bytes; stub for vector v = table + v * stride */
#define PYKVM_STUB_STRIDE 16

/* ---- boot information (64-bit ELF entry: RDI = &boot_info, RSI = magic) ---- */
#define PYKVM_MMAP_RAM 1
#define PYKVM_MMAP_RESERVED 2
#define PYKVM_MAX_MMAP 16

#ifndef __ASSEMBLER__
struct pykvm_mmap_entry {
    uint64_t addr;
    uint64_t len;
    uint32_t type;
    uint32_t reserved;
};

struct pykvm_boot_info {
    uint32_t magic;            /* PYKVM_BOOT_MAGIC */
    uint32_t version;          /* PYKVM_ABI_VERSION */
    uint32_t size;             /* sizeof(struct pykvm_boot_info) */
    uint32_t nr_cpus;
    uint64_t cmdline_addr;     /* guest-physical, NUL-terminated */
    uint32_t cmdline_len;      /* without the NUL */
    uint32_t nr_mmap;
    uint64_t ram_top;          /* end of the highest RAM range */
    uint64_t initrd_addr;      /* 0 when none */
    uint64_t initrd_len;
    /* Written by the guest, read by the VMM when it dies: a vmcoreinfo-style
     * text blob (KEY=VALUE lines) that lands in the crash core. */
    uint64_t crash_info_addr;  /* guest-physical */
    uint32_t crash_info_len;   /* bytes, at most PYKVM_CRASH_INFO_MAX */
    uint32_t reserved0;
    struct pykvm_mmap_entry mmap[16];
    uint64_t acpi_rsdp_addr;   /* guest-physical ACPI RSDP; 0 when there are no tables */
    /* Added at the end so older guests (which check size >= their sizeof) keep working. */
    uint64_t numa_info_addr;   /* guest-physical struct pykvm_numa_info; 0 without vNUMA */
};
#endif

/* ---- virtual NUMA (pykvm/memory/numa.py) ----
 * With --numa-node/--numa the boot info points at a struct pykvm_numa_info at
 * PYKVM_NUMA_INFO_ADDR (the rest of the boot-info page). Node n's RAM is
 * ranges[0..nr_ranges) (split around the MMIO hole when needed); hotadd_* is
 * the guest-physical range reserved for growing it (empty at boot: the host
 * plugs memory there and says so over the dynamic memory service). cpus is a
 * bitmap of vCPU indexes (bit i of word i / 64). distance[i][j] is the SLIT
 * entry (10 on the diagonal). */
#define PYKVM_NUMA_INFO_ADDR 0x13400
#define PYKVM_NUMA_MAX_NODES 8
#define PYKVM_NUMA_MAX_RANGES 4
#define PYKVM_NUMA_MAGIC 0x414d554e

#ifndef __ASSEMBLER__
struct pykvm_numa_range {
    uint64_t addr;
    uint64_t len;
};

struct pykvm_numa_node {
    uint32_t nr_ranges;
    uint32_t nr_cpus;
    uint64_t cpus[4];
    struct pykvm_numa_range ranges[4];
    uint64_t hotadd_addr;
    uint64_t hotadd_len;
};

struct pykvm_numa_info {
    uint32_t magic;            /* PYKVM_NUMA_MAGIC */
    uint32_t size;             /* sizeof(struct pykvm_numa_info) */
    uint32_t nr_nodes;
    uint32_t reserved;
    uint8_t distance[8][8];
    struct pykvm_numa_node nodes[8];
};
#endif
#define PYKVM_CRASH_INFO_MAX 4096

/* ---- trap frames pushed by the firmware stubs, lowest address first ---- */
#ifndef __ASSEMBLER__
struct pykvm_trap_frame64 {
    uint64_t r15;
    uint64_t r14;
    uint64_t r13;
    uint64_t r12;
    uint64_t r11;
    uint64_t r10;
    uint64_t r9;
    uint64_t r8;
    uint64_t rbp;
    uint64_t rdi;
    uint64_t rsi;
    uint64_t rdx;
    uint64_t rcx;
    uint64_t rbx;
    uint64_t rax;
    uint64_t vector;
    uint64_t error_code;       /* 0 for vectors without one */
    uint64_t rip;              /* pushed by the CPU from here on */
    uint64_t cs;
    uint64_t rflags;
    uint64_t rsp;
    uint64_t ss;
};

/* 32-bit stubs use pusha; esp_pusha is the stub's own and is ignored. The
 * interrupted ESP is the address just past eflags (same-privilege frame). */
struct pykvm_trap_frame32 {
    uint32_t edi;
    uint32_t esi;
    uint32_t ebp;
    uint32_t esp_pusha;
    uint32_t ebx;
    uint32_t edx;
    uint32_t ecx;
    uint32_t eax;
    uint32_t vector;
    uint32_t error_code;
    uint32_t eip;
    uint32_t cs;
    uint32_t eflags;
};
#endif

/* ---- partition bus: connecting and channel management ----
 * The guest connects once through trapped registers (PYKVM_PORT_BUS), giving
 * the GPA of its management area: 2 * (1 + PYKVM_BUS_MGMT_DATA_PAGES) pages,
 * the guest->host ring then the host->guest ring (layouts: "partition bus"
 * rings). Everything after that is an in-band packet on channel 0 whose
 * payload is a struct pykvm_bus_msg followed by the body for its type.
 * Versions are major << 16 | minor. Channel ids (relids) start at 1. */
#define PYKVM_PORT_BUS 0x580
#define PYKVM_BUS_PORTS 16
#define PYKVM_BUS_CTL_GPA_LO 0
#define PYKVM_BUS_CTL_GPA_HI 4
/* write: PYKVM_BUS_CMD_* | target vCPU << 8; read: PYKVM_BUS_STATE_* */
#define PYKVM_BUS_CTL_COMMAND 8
#define PYKVM_BUS_CMD_CONNECT 1
#define PYKVM_BUS_CMD_DISCONNECT 2
#define PYKVM_BUS_STATE_IDLE 0
#define PYKVM_BUS_STATE_CONNECTED 1
#define PYKVM_BUS_STATE_REFUSED 2
#define PYKVM_BUS_MGMT_DATA_PAGES 4
#define PYKVM_BUS_MGMT_RELID 0

#define PYKVM_BUS_VERSION_1_0 0x10000
#define PYKVM_BUS_VERSION_1_1 0x10001
#define PYKVM_BUS_MAX_VERSIONS 8
#define PYKVM_BUS_MAX_SERVICE_VERSIONS 4
#define PYKVM_BUS_GPADL_PFNS_PER_MSG 60
/* Transfer page sets live in the MMIO hole: channel relid's at BASE + relid * STRIDE */
#define PYKVM_BUS_XFER_BASE 0xe0000000
#define PYKVM_BUS_XFER_STRIDE 0x100000
#define PYKVM_BUS_XFER_PAGES 32

#define PYKVM_BUS_MSG_INITIATE_CONTACT 1
#define PYKVM_BUS_MSG_VERSION_RESPONSE 2
#define PYKVM_BUS_MSG_REQUEST_OFFERS 3
#define PYKVM_BUS_MSG_OFFER 4
#define PYKVM_BUS_MSG_ALL_OFFERS_DELIVERED 5
#define PYKVM_BUS_MSG_RESCIND 6
#define PYKVM_BUS_MSG_GPADL_HEADER 7
#define PYKVM_BUS_MSG_GPADL_BODY 8
#define PYKVM_BUS_MSG_GPADL_CREATED 9
#define PYKVM_BUS_MSG_GPADL_TEARDOWN 10
#define PYKVM_BUS_MSG_GPADL_TORNDOWN 11
#define PYKVM_BUS_MSG_OPEN 12
#define PYKVM_BUS_MSG_OPEN_RESULT 13
#define PYKVM_BUS_MSG_CLOSE 14
#define PYKVM_BUS_MSG_RELID_RELEASED 15
#define PYKVM_BUS_MSG_UNLOAD 16
#define PYKVM_BUS_MSG_UNLOAD_RESPONSE 17
/* the host closed a channel on its own (a protocol violation, the service stopped) */
#define PYKVM_BUS_MSG_CLOSED 18
/* offer flags: DATA_BUFFER: the channel is served by another partition's guest over
 * a direct channel (provider v1.2); the open may name a second GPADL, the data
 * buffer (pykvm_bus_open.data_gpadl), which is mapped into that guest too, and
 * requests name byte ranges in it instead of guest-physical pages (block: "block
 * over a direct channel"). The host answers GPADL_TORNDOWN for a GPADL of a direct
 * channel only once the service side has removed its mapping (or is known dead):
 * until then the guest must not reuse those pages. */
#define PYKVM_BUS_OFFER_FLAG_DATA_BUFFER 1

/* status codes in responses */
#define PYKVM_BUS_OK 0
#define PYKVM_BUS_E_VERSION 1
#define PYKVM_BUS_E_INVALID 2
#define PYKVM_BUS_E_LIMIT 3
#define PYKVM_BUS_E_STATE 4
#define PYKVM_BUS_E_NOT_FOUND 5
#define PYKVM_BUS_E_IO 6
#define PYKVM_BUS_E_READ_ONLY 7

/* interface type ids (16-byte GUID-like, as two little-endian halves) */
#define PYKVM_BUS_IF_ECHO_LO 0x4f48434550594b50
#define PYKVM_BUS_IF_ECHO_HI 0x0000000000000001
#define PYKVM_BUS_IF_BLOCK_LO 0x4b434f4c42594b50
#define PYKVM_BUS_IF_BLOCK_HI 0x0000000000000002
#define PYKVM_BUS_IF_SHUTDOWN_LO 0x4e574f4454594b50
#define PYKVM_BUS_IF_SHUTDOWN_HI 0x0000000000000003
#define PYKVM_BUS_IF_HEARTBEAT_LO 0x5452414548594b50
#define PYKVM_BUS_IF_HEARTBEAT_HI 0x0000000000000004
#define PYKVM_BUS_IF_DYNMEM_LO 0x4d454d4e59444b50
#define PYKVM_BUS_IF_DYNMEM_HI 0x0000000000000005
#define PYKVM_BUS_IF_PROVIDER_LO 0x5244564f52594b50
#define PYKVM_BUS_IF_PROVIDER_HI 0x0000000000000006

#ifndef __ASSEMBLER__
struct pykvm_bus_msg {
    uint32_t type;             /* PYKVM_BUS_MSG_* */
    uint32_t size;             /* bytes of the body that follows */
};

struct pykvm_bus_initiate {
    uint32_t count;            /* versions proposed, newest first */
    uint32_t target_vcpu;      /* where management interrupts go */
    uint32_t versions[8];
};

struct pykvm_bus_version_response {
    uint32_t accepted;         /* 1: version is in force; 0: refused */
    uint32_t version;
    uint32_t count;            /* the versions the host supports */
    uint32_t reserved;
    uint32_t supported[8];
};

struct pykvm_bus_offer {
    uint32_t relid;
    uint32_t flags;
    uint64_t interface_lo;
    uint64_t interface_hi;
    uint64_t instance_lo;
    uint64_t instance_hi;
    uint32_t version_count;
    uint32_t reserved;
    uint32_t versions[4];      /* service versions, newest first */
};

struct pykvm_bus_relid_msg {   /* RESCIND, CLOSE, RELID_RELEASED, CLOSED */
    uint32_t relid;
    uint32_t reason;           /* CLOSED: PYKVM_BUS_E_*; otherwise 0 */
};

struct pykvm_bus_gpadl_header {
    uint32_t gpadl;            /* id chosen by the guest, not 0 */
    uint32_t total;            /* pages in the whole GPADL */
    uint32_t count;            /* pfns valid in this message */
    uint32_t reserved;
    uint64_t pfns[60];
};

struct pykvm_bus_gpadl_body {
    uint32_t gpadl;
    uint32_t count;
    uint64_t pfns[60];
};

struct pykvm_bus_gpadl_result {  /* GPADL_CREATED, GPADL_TEARDOWN, GPADL_TORNDOWN */
    uint32_t gpadl;
    uint32_t status;
};

struct pykvm_bus_open {
    uint32_t relid;
    uint32_t ring_gpadl;
    uint32_t inbound_offset;   /* page in the GPADL where the host->guest ring starts */
    uint32_t target_vcpu;
    uint32_t version_count;    /* service versions the driver speaks, newest first */
    uint32_t data_gpadl;       /* 0, or the channel's data buffer (offer flag DATA_BUFFER only) */
    uint32_t versions[4];
};

struct pykvm_bus_open_result {
    uint32_t relid;
    uint32_t status;           /* PYKVM_BUS_OK or PYKVM_BUS_E_* */
    uint32_t version;          /* the service version in force */
    uint32_t count;            /* on a version refusal: what the service speaks */
    uint32_t supported[4];
    uint64_t xfer_gpa;         /* the channel's transfer page set (0: none), read-only to the guest */
    uint32_t xfer_pages;
    uint32_t reserved;
};
#endif

/* ---- bus services' messages (payloads on their channels) ---- */
/* echo: v1.0 returns each PYKVM_ECHO_OP_ECHO message; v1.1 adds
 * PYKVM_ECHO_OP_COUNT, answered with the number echoed on the channel. */
#define PYKVM_ECHO_V1_0 0x10000
#define PYKVM_ECHO_V1_1 0x10001
#define PYKVM_ECHO_OP_ECHO 1
#define PYKVM_ECHO_OP_COUNT 2
#define PYKVM_ECHO_MAX 4032
/* The trapped echo device (benchmark reference, --device echo-port): bytes
 * written to the data port are queued (at most PYKVM_ECHO_PORT_FIFO) and read
 * back in order; reads of an empty queue give 0xff. */
#define PYKVM_PORT_ECHO 0x5a0
#define PYKVM_ECHO_PORT_FIFO 4096

/* block storage v1.0: requests are GPA-direct packets (the ranges name the
 * data buffer) with a pykvm_blk_request payload; INFO and FLUSH may be
 * in-band. Each is answered by a completion with a pykvm_blk_response.
 * An in-band READ (no buffer) is answered instead by a transfer-page packet
 * (flag COMPLETION_REQ) whose range holds the data in the channel's transfer
 * page set and whose payload is the pykvm_blk_response; the guest copies the
 * data out and sends a completion with the same transaction id, which frees
 * the range. */
#define PYKVM_BLOCK_V1_0 0x10000
#define PYKVM_BLK_OP_READ 1
#define PYKVM_BLK_OP_WRITE 2
#define PYKVM_BLK_OP_FLUSH 3
#define PYKVM_BLK_OP_INFO 4
#define PYKVM_BLK_SECTOR 512
#define PYKVM_BLK_MAX_SECTORS 256
#define PYKVM_BLK_FLAG_READ_ONLY 1
/* block over a direct channel (offer flag PYKVM_BUS_OFFER_FLAG_DATA_BUFFER): every
 * request is in-band: a pykvm_blk_request, then for READ and WRITE a
 * pykvm_blk_buffer naming bytes [offset, offset + length) of the channel's data
 * buffer, length == count * 512 (at most the rules' max_transfer). The service
 * reads (client write) or writes (client read) those bytes in place and answers
 * with a completion carrying a pykvm_blk_response and no data. */

/* shutdown v1.0: the host sends PYKVM_SHUTDOWN_OP_REQUEST; the guest answers
 * with a completion and powers off. heartbeat v1.0: the guest sends
 * PYKVM_HEARTBEAT_OP_BEAT with a sequence number, unanswered. */
#define PYKVM_SHUTDOWN_V1_0 0x10000
#define PYKVM_SHUTDOWN_OP_REQUEST 1
#define PYKVM_HEARTBEAT_V1_0 0x10000
#define PYKVM_HEARTBEAT_OP_BEAT 1

/* dynamic memory v1.0 (pykvm/bus/services/dynmem.py), in-band both ways.
 * guest -> host STATUS: a pykvm_dm_msg then nr_nodes pykvm_dm_node_status,
 *   sent periodically and whenever a node's numbers change much. Pages are
 *   4 KiB. total = pages the node has online now (boot RAM + hot-added -
 *   ballooned); committed = pages in use; free = pages the allocator can hand
 *   out (committed + free <= total). pressure = committed * 1000 / total
 *   (per mille; above 1000 means demand the node could not meet: the
 *   allocator adds the pages it was asked for and failed to give,
 *   i.e. (committed + unmet) * 1000 / total, at most PYKVM_DM_PRESSURE_MAX).
 * host -> guest BALLOON (node, req, pages): give back up to `pages` pages of
 *   that node. The guest answers with BALLOON_RESP messages (same node and
 *   req) listing page ranges; the last carries PYKVM_DM_FLAG_LAST (it may
 *   return fewer pages than asked, none included).
 * host -> guest UNBALLOON (node, req, ranges): these pages are the guest's
 *   again (they read as zero).
 * host -> guest HOTADD (node, req, one range): new RAM of that node is
 *   online at that range; the guest answers HOTADD_ACK (same req; status
 *   PYKVM_BUS_OK or PYKVM_BUS_E_INVALID). */
#define PYKVM_DYNMEM_V1_0 0x10000
#define PYKVM_DM_OP_STATUS 1
#define PYKVM_DM_OP_BALLOON 2
#define PYKVM_DM_OP_BALLOON_RESP 3
#define PYKVM_DM_OP_UNBALLOON 4
#define PYKVM_DM_OP_HOTADD 5
#define PYKVM_DM_OP_HOTADD_ACK 6
#define PYKVM_DM_FLAG_LAST 1
#define PYKVM_DM_MAX_RANGES 128
#define PYKVM_DM_PRESSURE_MAX 10000

#ifndef __ASSEMBLER__
struct pykvm_dm_msg {
    uint32_t op;               /* PYKVM_DM_OP_* */
    uint32_t node;             /* STATUS: nr_nodes that follow */
    uint32_t req;              /* request id (the host's); STATUS: sequence number */
    uint32_t flags;            /* PYKVM_DM_FLAG_* */
    uint64_t pages;            /* BALLOON: pages wanted; HOTADD_ACK: status */
    uint32_t nr_ranges;        /* pykvm_dm_range entries that follow */
    uint32_t reserved;
};

struct pykvm_dm_range {
    uint64_t pfn;
    uint64_t count;            /* pages */
};

struct pykvm_dm_node_status {
    uint32_t node;
    uint32_t pressure;         /* per mille, see above */
    uint64_t total;
    uint64_t committed;
    uint64_t free;
};

struct pykvm_echo_msg {
    uint32_t op;
    uint32_t len;              /* bytes of data after this header */
};

struct pykvm_blk_request {
    uint32_t op;
    uint32_t reserved;
    uint64_t sector;
    uint32_t count;            /* sectors */
    uint32_t reserved2;
};

struct pykvm_blk_buffer {
    uint32_t offset;           /* bytes into the data buffer */
    uint32_t length;           /* bytes */
};

struct pykvm_blk_response {
    uint32_t status;           /* PYKVM_BUS_OK or PYKVM_BUS_E_* */
    uint32_t flags;            /* PYKVM_BLK_FLAG_* */
    uint64_t capacity;         /* sectors */
    uint32_t sector_size;
    uint32_t reserved;
};

/* provider v1.0 (several partitions, issue 12): a guest in a service partition
 * serves a bus interface to other partitions through the root. The root offers
 * PYKVM_BUS_IF_PROVIDER to partitions whose topology says they provide a service;
 * the guest opens it and sends one in-band pykvm_provider_register naming the
 * interface and the versions it serves. The root then relays each client request
 * as an in-band packet with flag COMPLETION_REQ whose trans_id is the root's tag;
 * for block the payload is a pykvm_blk_request followed by the write data (its
 * `reserved` field holds the block version the client's channel negotiated, one
 * of the registered versions: the root relays block 1.x only). The
 * guest answers each with a completion (same trans_id) whose payload is a
 * pykvm_blk_response followed by the read data. Data moves by copy through the
 * root; one relayed request carries at most PYKVM_PROVIDER_MAX_SECTORS sectors
 * (the root splits a client's larger request).
 *
 * Recovery: when a service partition that served stops (crash, stop, broken
 * link), the root RESCINDs the proxied offer in every client partition before
 * anything else. Requests outstanding on the rescinded channel FAIL: they never
 * complete (the channel's rings are no longer read or written), the driver
 * tears down the GPADL, releases the relid and reports BUS_ERR_GONE; a write it
 * did not see completed may or may not be on the disk, so the driver issues it
 * again after reopening. When the restarted service partition registers, the
 * root sends a new OFFER of the same interface and instance with a relid never
 * used before (a late CLOSE or RELID_RELEASED names the old channel only); the
 * driver opens it like any offer. A write a client saw completed is not lost
 * across the restart when the service writes through to a host file before it
 * completes (bus-blocksvc store=disk). A guest that ignores the rescind only
 * gets refusals for the old relid; old relids it never releases are forgotten
 * past 16, and re-offers stop at relid 255. */
#define PYKVM_PROVIDER_V1_0 0x10000
#define PYKVM_PROVIDER_MAX_SECTORS 16
/* provider v1.1 adds transfer by memory map change. A guest that opens the
 * provider channel at v1.1 may get block requests whose pykvm_blk_request has
 * reserved2 == PYKVM_PROVIDER_REQ_REMAPPED (reserved still holds the version),
 * followed by a pykvm_provider_remap
 * instead of write data: the client's buffer is mapped at guest-physical
 * [gpa, gpa + length) (inside the window at PYKVM_PROVIDER_REMAP_GPA, one
 * request at a time), length == count * 512, count up to PYKVM_BLK_MAX_SECTORS.
 * The guest reads (client write) or writes (client read) it in place and
 * answers with a pykvm_blk_response and no data. The window is mapped only
 * while the request is outstanding (read-only for a client write): once the
 * guest completes it, accesses there are unclaimed MMIO (reads all ones). */
#define PYKVM_PROVIDER_V1_1 0x10001
#define PYKVM_PROVIDER_REQ_REMAPPED 1
#define PYKVM_PROVIDER_REMAP_GPA 0xdf000000
#define PYKVM_PROVIDER_REMAP_PAGES 64

struct pykvm_provider_remap {
    uint64_t gpa;              /* where the buffer's first byte is in this guest */
    uint32_t length;           /* bytes */
    uint32_t reserved;
};

struct pykvm_provider_register {
    uint64_t if_lo;
    uint64_t if_hi;
    uint32_t nversions;        /* 1..PYKVM_BUS_MAX_SERVICE_VERSIONS, newest first */
    uint32_t reserved;
    uint32_t versions[PYKVM_BUS_MAX_SERVICE_VERSIONS];
};

/* provider v1.2 adds direct channels (issue 20): a client partition's channel
 * whose rings the service guest reads and writes itself. The root maps the
 * client's ring pages (exactly the pages of its ring GPADL) at
 * PYKVM_DIRECT_GPA + id * PYKVM_DIRECT_STRIDE, wires the client's doorbell to
 * this guest's bus interrupt (PYKVM_BUS_VECTOR, vCPU 0) and sends an in-band
 * pykvm_direct_msg of op PYKVM_DIRECT_OPEN on the provider channel (no
 * completion asked). The client->service ring is the first inbound_offset
 * pages (the service reads it), the service->client ring the rest (the
 * service writes it); the service signals the client by writing `doorbell`
 * to PYKVM_PORT_BUS_DOORBELL. From then on no host code runs per message.
 * PYKVM_DIRECT_CLOSE (same id) says the pages are gone: the guest must stop
 * using them (reads there are all ones afterwards). The client can change
 * its rings at any time: the guest copies every packet before checking it
 * and closes a channel whose ring breaks, never trusting an index twice.
 * `rules` (PYKVM_DIRECT_RULE_*) and `max_message` are the client's policy,
 * which the guest enforces: a packet over max_message closes the channel.
 * A client that gave a data buffer (offer flag DATA_BUFFER) has its pages mapped
 * at data_gpa = gpa + PYKVM_DIRECT_DATA_OFFSET, data_pages pages (1..
 * PYKVM_DIRECT_DATA_MAX_PAGES; both 0 for none), removed with the rings.
 * max_transfer (a multiple of 512, at most PYKVM_BLK_MAX_SECTORS sectors) is
 * the policy's largest request in bytes, which the guest enforces too. */
#define PYKVM_PROVIDER_V1_2 0x10002
#define PYKVM_DIRECT_GPA 0xd8000000
#define PYKVM_DIRECT_STRIDE 0x100000
#define PYKVM_DIRECT_MAX 16
#define PYKVM_DIRECT_MAX_PAGES 64
#define PYKVM_DIRECT_DOORBELL_BASE 0x1000
#define PYKVM_DIRECT_OPEN 0x44495201
#define PYKVM_DIRECT_CLOSE 0x44495202
#define PYKVM_DIRECT_RULE_READ_ONLY 1
#define PYKVM_DIRECT_DATA_OFFSET 0x40000
#define PYKVM_DIRECT_DATA_MAX_PAGES 192

struct pykvm_direct_msg {
    uint32_t op;               /* PYKVM_DIRECT_OPEN or PYKVM_DIRECT_CLOSE */
    uint32_t id;               /* 0..PYKVM_DIRECT_MAX-1 */
    uint64_t gpa;              /* the ring pages in this guest */
    uint32_t ring_pages;       /* 4..PYKVM_DIRECT_MAX_PAGES */
    uint32_t inbound_offset;   /* pages of the client->service ring */
    uint32_t doorbell;         /* value to write to PYKVM_PORT_BUS_DOORBELL */
    uint32_t version;          /* the service version the client's channel speaks */
    uint32_t rules;            /* PYKVM_DIRECT_RULE_* */
    uint32_t max_message;      /* bytes of payload a packet may carry */
    uint64_t data_gpa;         /* the client's data buffer in this guest, 0: none */
    uint32_t data_pages;       /* 0, or 1..PYKVM_DIRECT_DATA_MAX_PAGES */
    uint32_t max_transfer;     /* bytes one request may move through the data buffer */
};

struct pykvm_ic_msg {          /* shutdown and heartbeat */
    uint32_t op;
    uint32_t flags;
    uint64_t seq;
};
#endif

/* ---- partition bus (pykvm/bus/, guests/runtime/ring.c; notes: BUS.md) ----
 * A ring is one header page then N >= 1 data pages. Indices are byte offsets
 * into the data area, multiples of 8, below its size; the ring is empty when
 * read_index == write_index, and a writer always leaves at least 8 bytes free.
 * A packet is a struct pykvm_vmpacket, then (types 7 and 9 only) the range
 * list, which must end exactly at offset8 * 8, then the payload up to
 * len8 * 8 (padded to 8 bytes: receivers get the padding too), then an 8-byte
 * trailer: the writer's write_index before the packet, shifted left by 32.
 * Packets may wrap from the end of the data area to its start. */
#define PYKVM_BUS_PAGE_SIZE 4096
#define PYKVM_RING_HEADER_SIZE 4096
#define PYKVM_RING_ALIGN 8
#define PYKVM_RING_TRAILER_SIZE 8
/* feature_bits: the writer honours pending_send_sz */
#define PYKVM_RING_FEAT_PENDING_SEND_SZ 1
/* packet types (VMBus numbering) */
#define PYKVM_VMPKT_DATA_INBAND 6
#define PYKVM_VMPKT_DATA_XFER_PAGES 7
#define PYKVM_VMPKT_DATA_GPA_DIRECT 9
#define PYKVM_VMPKT_COMP 11
#define PYKVM_VMPKT_FLAG_COMPLETION_REQ 1

#ifndef __ASSEMBLER__
struct pykvm_ring_header {
    uint32_t write_index;      /* owned by the writer */
    uint32_t read_index;       /* owned by the reader */
    uint32_t interrupt_mask;   /* set by the reader while it polls */
    uint32_t pending_send_sz;  /* set by a writer waiting for this much free space */
    uint32_t reserved1[12];
    uint32_t feature_bits;     /* PYKVM_RING_FEAT_* */
    uint8_t reserved2[4028];   /* pads the header to one page */
};

struct pykvm_vmpacket {
    uint16_t type;             /* PYKVM_VMPKT_* */
    uint16_t offset8;          /* payload start, 8-byte units from the packet start */
    uint16_t len8;             /* whole packet without trailer, 8-byte units */
    uint16_t flags;            /* PYKVM_VMPKT_FLAG_* */
    uint64_t trans_id;
};

/* PYKVM_VMPKT_DATA_GPA_DIRECT: this header, then range_count ranges, each a
 * struct pykvm_gpa_range followed by its PFNs: the range covers byte_count
 * bytes from byte_offset (< 4096) in the first page, so it lists
 * (byte_offset + byte_count + 4095) / 4096 PFNs. */
struct pykvm_gpa_direct_header {
    uint32_t reserved;
    uint32_t range_count;
};

struct pykvm_gpa_range {
    uint32_t byte_count;
    uint32_t byte_offset;
    uint64_t pfn_array[];
};

/* PYKVM_VMPKT_DATA_XFER_PAGES: this header, then range_count ranges of the
 * transfer page set xfer_pageset_id. */
struct pykvm_xfer_page_header {
    uint16_t xfer_pageset_id;
    uint8_t sender_owns_set;
    uint8_t reserved;
    uint32_t range_count;
};

struct pykvm_xfer_range {
    uint32_t byte_count;
    uint32_t byte_offset;
};
#endif

/* ---- bus doorbell and interrupt ----
 * Guest -> host: a 32-bit outl of a channel id to PYKVM_PORT_BUS_DOORBELL. The
 * host registers each channel id as an ioeventfd datamatch, so KVM wakes the
 * host's bus thread without an exit; any other value exits like an unclaimed
 * port (dropped). Host -> guest: an MSI with vector PYKVM_BUS_VECTOR (fixed,
 * physical destination = the channel's target APIC id), edge-triggered; the
 * guest EOIs its local APIC. */
#define PYKVM_PORT_BUS_DOORBELL 0x590
#define PYKVM_BUS_VECTOR 0x50

/* ---- snapshot fuzzing (pykvm fuzz; pykvm/devices/fuzzport.py, pykvm/fuzz/) ----
 * The guest names its input buffer (a struct pykvm_fuzz_input followed by
 * INPUT_SIZE bytes of data; guest-physical) with 32-bit writes, then writes
 * CMD_SNAPSHOT to COMMAND: the VMM takes its snapshot there, writes an input
 * into the buffer and lets the guest go on. The guest runs the input and
 * writes CMD_DONE (or crashes, or writes CMD_CRASH for a bug it detected):
 * the VMM resets the VM to the snapshot, so CMD_SNAPSHOT returns again with
 * the next input. Reading COMMAND gives STATE_DRIVEN under pykvm fuzz (then
 * AFL's coverage map is RAM at MAP_ADDR, MAP_SIZE bytes) and STATE_IDLE
 * otherwise (commands are then ignored and nothing is mapped there). Edges
 * are recorded AFL-style: map[cur ^ prev]++, prev = cur >> 1. */
#define PYKVM_PORT_FUZZ 0x5d0
#define PYKVM_FUZZ_PORTS 16
#define PYKVM_FUZZ_INPUT_LO 0
#define PYKVM_FUZZ_INPUT_HI 4
#define PYKVM_FUZZ_INPUT_SIZE 8
#define PYKVM_FUZZ_COMMAND 12
#define PYKVM_FUZZ_CMD_SNAPSHOT 1
#define PYKVM_FUZZ_CMD_DONE 2
#define PYKVM_FUZZ_CMD_CRASH 3
#define PYKVM_FUZZ_STATE_IDLE 0
#define PYKVM_FUZZ_STATE_DRIVEN 1
#define PYKVM_FUZZ_MAP_ADDR 0xdc000000
#define PYKVM_FUZZ_MAP_SIZE 65536
/* inputs longer than the buffer are cut to INPUT_SIZE; at most this many bytes */
#define PYKVM_FUZZ_INPUT_MAX 1048576
/* Dictionary tokens: a guest may declare strings its parser compares input
 * against (keywords, magic values) in a non-loaded ELF section named
 * ".pykvm_fuzz_dict" (runtime/rt.h: FUZZ_TOKEN). The section holds records
 * [length byte 1..TOKEN_MAX][that many bytes]; zero bytes between records are
 * padding. `pykvm fuzz` checks it (at most TOKENS_MAX records, nothing else in
 * it) and hands the tokens to afl-fuzz as AFL++'s autodictionary. */
#define PYKVM_FUZZ_TOKEN_MAX 128
#define PYKVM_FUZZ_TOKENS_MAX 256

#ifndef __ASSEMBLER__
struct pykvm_fuzz_input {
    uint32_t len;              /* bytes of data that hold this run's input */
    uint32_t reserved;
    uint8_t data[];
};
#endif

#endif
