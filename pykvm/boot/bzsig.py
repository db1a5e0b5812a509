"""Whether a file is a bzImage: the setup header's signature, apart from boot.linux so that telling costs no import.

Every `pykvm run` asks this of its kernel; only a bzImage needs the rest of boot.linux (~1 ms to import).
"""

from __future__ import annotations

BOOT_FLAG_OFF, BOOT_FLAG = 0x1FE, 0xAA55
HEADER_MAGIC_OFF, HEADER_MAGIC = 0x202, b"HdrS"


def is_bzimage(blob: bytes) -> bool:
    """True when blob carries the boot protocol's 'HdrS' magic and the 0xAA55 boot flag."""
    return (len(blob) >= HEADER_MAGIC_OFF + 4 and blob[HEADER_MAGIC_OFF:HEADER_MAGIC_OFF + 4] == HEADER_MAGIC
            and int.from_bytes(blob[BOOT_FLAG_OFF:BOOT_FLAG_OFF + 2], "little") == BOOT_FLAG)
