"""Finding a Linux kernel on this machine for the boot tests, and extracting vmlinux from a bzImage.

Nothing is downloaded: a test that finds no kernel is skipped. To try it on Debian:
`apt-get install linux-image-cloud-amd64` (a bzImage in /boot).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

# compression magics the kernel's own scripts/extract-vmlinux looks for
MAGICS = [(b"\x1f\x8b\x08", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"),
          (b"\x02\x21\x4c\x18", "lz4"), (b"\x28\xb5\x2f\xfd", "zstd")]


def candidates() -> list[Path]:
    """Kernel images on this machine: $PYKVM_TEST_KERNEL first, then /boot and debug vmlinux files."""
    found = [os.environ["PYKVM_TEST_KERNEL"]] if os.environ.get("PYKVM_TEST_KERNEL") else []
    for pattern in ("/usr/lib/debug/boot/vmlinux-*", "/boot/vmlinux-*", "/boot/vmlinuz-*"):
        found += sorted(glob.glob(pattern), reverse=True)
    return [Path(p) for p in found if os.access(p, os.R_OK)]


def _decompress(kind: str, data: bytes) -> bytes | None:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=__import__("io").BytesIO(data)).read()
    if kind in ("xz", "lzma"):
        return lzma.LZMADecompressor().decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    tool = {"lz4": "lz4", "zstd": "zstd"}[kind]
    if shutil.which(tool) is None:
        return None
    # the kernel appends its decompressed size after the stream: the tools complain, the output is whole
    out = subprocess.run([tool, "-dc"], input=data, capture_output=True, timeout=120).stdout
    return out or None


def vmlinux_from_bzimage(blob: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage's compressed payload (None when it cannot be decompressed here)."""
    setup_sects = blob[0x1F1] or 4
    offset, length = struct.unpack_from("<II", blob, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = blob[start:start + length]
    for magic, kind in MAGICS:
        if payload.startswith(magic):
            try:
                out = _decompress(kind, payload)
            except (OSError, EOFError, lzma.LZMAError, subprocess.SubprocessError):
                return None
            return out if out and out[:4] == b"\x7fELF" else None
    return None


def find_vmlinux(cache_dir: Path) -> Path | None:
    """An uncompressed vmlinux ELF (extracted into cache_dir from a bzImage when needed), or None."""
    for path in candidates():
        blob = path.read_bytes()
        if blob[:4] == b"\x7fELF":
            return path
        if blob[0x202:0x206] == b"HdrS":
            elf = vmlinux_from_bzimage(blob)
            if elf is not None:
                out = cache_dir / f"{path.name}.vmlinux"
                out.write_bytes(elf)
                return out
    return None


def find_bzimage() -> Path | None:
    """A bzImage on this machine, or None."""
    for path in candidates():
        with open(path, "rb") as f:
            head = f.read(0x210)
        if head[0x202:0x206] == b"HdrS":
            return path
    return None


# How the tests (and README's "What boots" table) boot Linux on this kind of host.
LINUX_MEM = "256M"
LINUX_CPU = "host,-xsave,-cx16"
LINUX_CMDLINE = "earlyprintk=serial,ttyS0 console=ttyS0"
LINUX_TIMEOUT = "600"


def boot_until_memory_summary(kernel, mem: str = LINUX_MEM, cpu: str = LINUX_CPU, cmdline: str = LINUX_CMDLINE,
                              timeout: str = LINUX_TIMEOUT) -> tuple[str, object]:
    """Boot a Linux kernel in-process, stopping once it prints "Memory:"; (console text, outcome)."""
    import threading

    from pykvm.cli import parse_size
    from pykvm.machine import Machine, MachineConfig
    from pykvm.machine.outcome import Outcome

    r, w = os.pipe()
    cfg = MachineConfig(kernel=Path(kernel), mem=parse_size(mem), cmdline=cmdline, serial_out=w,
                        timeout=float(timeout), crash_dir=None, cpu=cpu)
    out = bytearray()
    try:
        with Machine(cfg) as m:
            def watch():
                while True:
                    chunk = os.read(r, 65536)
                    if not chunk:
                        return
                    out.extend(chunk)
                    if b"Memory:" in out:
                        m.finish(Outcome(0, "exit", "saw the memory summary"))
            t = threading.Thread(target=watch, daemon=True)
            t.start()
            outcome = m.run()
    finally:
        os.close(w)
    t.join(5)
    os.close(r)
    return out.decode(errors="replace"), outcome
