"""The FADT ("FACP", revision 6, full hardware ACPI with X_ fields) and the FACS it points at."""

from __future__ import annotations

import struct

from .sdt import ACCESS_DWORD, ACCESS_WORD, HEADER_SIZE, gas_io, sdt
from .topology import Platform

REVISION = 6
MINOR_REVISION = 3           # ACPI 6.3
LENGTH = 276
FACS_SIZE = 64
FACS_VERSION = 2
FACS_ALIGN = 64

PM1_EVT_LEN = 4              # status and enable, 2 bytes each
PM1_CNT_LEN = 2
PM_TMR_LEN = 4
C2_UNSUPPORTED = 101         # latencies above these say "no C2/C3"
C3_UNSUPPORTED = 1001
RTC_CENTURY_INDEX = 0x32     # the CMOS byte holding the century, as on PCs
HYPERVISOR_ID = b"PYKVM\0\0\0"

# Flags
WBINVD = 1 << 0
PROC_C1 = 1 << 2
PWR_BUTTON = 1 << 4          # set: no fixed-feature power button
SLP_BUTTON = 1 << 5          # set: no fixed-feature sleep button
FIX_RTC = 1 << 6             # set: RTC wake status is not in the fixed registers
TMR_VAL_EXT = 1 << 8         # the PM timer counts 32 bits
HW_REDUCED_ACPI = 1 << 20    # never set: pykvm guests have PM1 blocks and an SCI

# IA-PC boot architecture flags
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_NO_VGA = 1 << 2
BOOT_NO_CMOS_RTC = 1 << 5


def facs() -> bytes:
    """The FACS: signature, length, and a zero waking vector the OS fills in before S3."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def boot_arch(p: Platform) -> int:
    """The IAPC_BOOT_ARCH bits for the platform's legacy devices."""
    flags = 0 if p.vga else BOOT_NO_VGA
    flags |= 0 if p.cmos_rtc else BOOT_NO_CMOS_RTC
    if p.i8042:
        flags |= BOOT_8042 | BOOT_LEGACY_DEVICES
    return flags


def fadt(p: Platform, facs_addr: int, dsdt_addr: int) -> bytes:
    """The FADT; 32-bit block fields and their X_ twins name the same ports (old and new parsers agree)."""
    body = bytearray(LENGTH - HEADER_SIZE)
    tmr_len = PM_TMR_LEN if p.pm_timer else 0
    flags = WBINVD | PROC_C1 | PWR_BUTTON | SLP_BUTTON | FIX_RTC | (TMR_VAL_EXT if p.pm_timer else 0)

    def put(fmt: str, offset: int, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    # FIRMWARE_CTRL is set, so X_FIRMWARE_CTRL must stay 0 (the spec allows only one of them)
    put("<II", 36, facs_addr, dsdt_addr)
    put("<H", 46, p.sci_irq)            # SMI_CMD 0: ACPI mode is always on, nothing to enable
    put("<IIIIIIII", 56, p.pm1a_evt, 0, p.pm1a_cnt, 0, 0, p.pm_timer, 0, 0)
    put("<BBBB", 88, PM1_EVT_LEN, PM1_CNT_LEN, 0, tmr_len)
    put("<HH", 96, C2_UNSUPPORTED, C3_UNSUPPORTED)
    put("<B", 108, RTC_CENTURY_INDEX if p.cmos_rtc else 0)
    put("<H", 109, boot_arch(p))
    put("<I", 112, flags)
    put("<B", 131, MINOR_REVISION)
    put("<QQ", 132, 0, dsdt_addr)
    put("<12s", 148, gas_io(p.pm1a_evt, PM1_EVT_LEN, ACCESS_WORD))
    put("<12s", 172, gas_io(p.pm1a_cnt, PM1_CNT_LEN, ACCESS_WORD))
    put("<12s", 208, gas_io(p.pm_timer, PM_TMR_LEN, ACCESS_DWORD))
    put("<8s", 268, HYPERVISOR_ID)
    return sdt(b"FACP", REVISION, bytes(body))
