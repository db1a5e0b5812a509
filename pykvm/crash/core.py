"""Write a CrashSnapshot as an ELF64 x86-64 core file that gdb and crash-style tools read.

File layout: ELF header, program headers (PT_NOTE first, then PT_LOADs, see
layout.py), the notes (see notes.py), an extended-numbering section header
when there are 65535 or more program headers, padding to a page, then guest
RAM region after region. The file is sized with ftruncate and only non-zero
pages are written, so untouched guest memory stays a hole (copy cores with
`cp --sparse=always` / `tar -S` to keep them small).

The pykvm note (name "PYKVM", type NT_PYKVM) holds UTF-8 JSON with: format,
trigger, reason, vector, vector_name, error_code, exit_reason, crashing_vcpu,
signal, serial_tail, config, pykvm_version, created (UTC ISO 8601), vcpus (per
vCPU index: mode, efer, cr8, apic_base, fpu), prstatus_order (vCPU index of each
NT_PRSTATUS pair), qemu_note_order, memory (regions with their phdr index),
address_spaces (cr3, paging, vcpus, phdr_first, phdr_count, walk statistics),
dropped_segments, dropped_address_spaces (not walked: cap), bytes_written,
crash_info_bytes.
"""

from __future__ import annotations

import datetime as _dt
import errno
import itertools
import json
import os
import struct
import threading

from ..devices.vga import TEXT_BYTES, screen_text
from ..memory.sparse import nonzero_runs
from . import notes as N
from .layout import Layout, plan
from .snapshot import CRASH_INFO_MAX, SERIAL_TAIL_MAX, CrashSnapshot, VcpuState
from .x86 import seg_flags, signal_for, vector_name
from ..paths import clean
from .crashdir import (  # noqa: F401  (re-exported: the crash directory's API lived here)
    CoreWriteError, _create_temp, _exists, _explain, _held, _make_sub, _open_dir, _proc_fd_links, _rel,
    _unlink_quietly, _unusable, check_crash_dir, held_parent, hold_crash_dir)

FORMAT_VERSION = 1
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
EHDR_SIZE = 64
PHDR_SIZE = 56
SHDR_SIZE = 64
DATA_ALIGN = 4096
_MAX_PWRITE = 64 << 20

_counter = itertools.count()
_counter_lock = threading.Lock()


def write_core(snapshot: CrashSnapshot, crash_dir, prefix: str = "pykvm", **limits):
    """Write `snapshot` atomically to a new `<prefix>-<UTC time>-<pid>-<n>.core` in `crash_dir`; return its pathlib.Path.

    Every file operation is relative to a descriptor of `crash_dir`: the one hold_crash_dir() keeps
    (the only way into the filesystem the sandbox leaves open), else one opened for this call.
    `limits` are passed to layout.plan: max_segments, max_spaces, walk_max_entries, walk_max_tables.
    """
    from pathlib import Path  # only for callers who want one: the VMM's own crash path uses write_core_file

    return Path(write_core_file(snapshot, crash_dir, prefix, **limits))


def write_core_file(snapshot: CrashSnapshot, crash_dir, prefix: str = "pykvm", **limits) -> str:
    """write_core, returning the core's path as str (what a run's crash path uses: it never imports pathlib)."""
    crash_dir = clean(crash_dir)
    if crash_dir in _unusable:  # found unusable while the process could still look (hold_crash_dir)
        raise CoreWriteError(_unusable[crash_dir])
    dfd = _held.get(crash_dir)
    own = dfd is None
    if own:
        dfd = _open_dir(crash_dir)
    try:
        layout = plan(snapshot, **limits)
        runs = [list(nonzero_runs(r)) for r in snapshot.memory.regions]
        written = sum(n for rr in runs for _, n in rr)
        head, data_start = _headers(snapshot, layout, written)

        _make_sub(dfd, crash_dir)
        fd, tmp = _create_temp(dfd, crash_dir, prefix)
        try:
            try:
                os.ftruncate(fd, data_start + layout.data_size)
                _pwrite_all(fd, memoryview(head), 0)
                for region, relo, rr in zip(snapshot.memory.regions, layout.region_offsets, runs):
                    for off, n in rr:
                        _pwrite_all(fd, region.view[off:off + n], data_start + relo + off)
                os.fsync(fd)
                return _publish(fd, tmp, dfd, crash_dir, prefix)
            finally:
                os.close(fd)
        except OSError as e:
            _unlink_quietly(tmp, dfd)
            raise CoreWriteError(_explain(e, f"cannot write core file in {crash_dir}")) from e
        except BaseException:
            _unlink_quietly(tmp, dfd)
            raise
    finally:
        if own:
            os.close(dfd)


def write_companion(core_path: str, suffix: str, data: bytes) -> str:
    """Write `data` beside a core written by write_core_file, named the core's name + suffix (never
    replacing a file), the way cores are written (so it works under the sandbox); its path."""
    crash_dir, _slash, base = str(core_path).rpartition("/")
    crash_dir = clean(crash_dir or ".")
    dfd = _held.get(crash_dir)
    own = dfd is None
    if own:
        dfd = _open_dir(crash_dir)
    try:
        fd, tmp = _create_temp(dfd, crash_dir, "pykvm")
        name = _rel(dfd, base + suffix)
        try:
            try:
                _pwrite_all(fd, memoryview(data), 0)
                os.fsync(fd)
                if tmp is None:
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd)
                else:
                    os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                    os.unlink(tmp, dir_fd=dfd)
            finally:
                os.close(fd)
        except OSError as e:
            _unlink_quietly(tmp, dfd)
            raise CoreWriteError(_explain(e, f"cannot write {base + suffix} in {crash_dir}")) from e
    finally:
        if own:
            os.close(dfd)
    return f"{core_path}{suffix}"


# -- headers and notes -------------------------------------------------------

def _headers(snap: CrashSnapshot, layout: Layout, written: int) -> tuple[bytes, int]:
    """ELF header + program headers + notes (+ PN_XNUM section header), and where RAM data starts."""
    note_blob = _notes(snap, layout, written)
    phnum = 1 + len(layout.loads)
    note_off = EHDR_SIZE + PHDR_SIZE * phnum
    shoff = note_off + len(note_blob) if phnum >= PN_XNUM else 0
    head_end = note_off + len(note_blob) + (SHDR_SIZE if shoff else 0)
    data_start = -(-head_end // DATA_ALIGN) * DATA_ALIGN

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, little-endian, SYSV
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, EM_X86_64, 1, 0, EHDR_SIZE, shoff, 0, EHDR_SIZE,
                               PHDR_SIZE, min(phnum, PN_XNUM), SHDR_SIZE if shoff else 0, 1 if shoff else 0, 0)
    phdrs = [struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_off, 0, 0, len(note_blob), 0, 4)]
    for ld in layout.loads:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, ld.flags, data_start + ld.rel_offset,
                                 ld.vaddr, ld.paddr, ld.size, ld.size, DATA_ALIGN))
    # Extended numbering (as Linux does): section 0 carries the real count in sh_info.
    shdr = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 1, 0, phnum, 0, 0) if shoff else b""
    return ehdr + b"".join(phdrs) + note_blob + shdr, data_start


def _ordered(snap: CrashSnapshot) -> list[VcpuState]:
    """vCPUs with the crashing one first (gdb makes the first NT_PRSTATUS the current thread)."""
    return sorted(snap.vcpus, key=lambda v: (v.index != snap.crashing_vcpu, v.index))


def _notes(snap: CrashSnapshot, layout: Layout, written: int) -> bytes:
    """All notes in order: per vCPU PRSTATUS+FPREGSET, per vCPU QEMU state, PYKVM JSON, VMCOREINFO."""
    out = []
    signo = signal_for(snap.trigger, snap.vector)
    for v in _ordered(snap):
        sig = signo  # every thread, as Linux does: BFD keeps the last NT_PRSTATUS's pr_cursig
        out.append(N.note(N.NAME_CORE, N.NT_PRSTATUS,
                          N.pack_prstatus(v.index + 1, sig, _user_regs(v), v.fpu is not None)))
        out.append(N.note(N.NAME_CORE, N.NT_FPREGSET, N.pack_fpregset(v.fpu)))
    by_index = sorted(snap.vcpus, key=lambda v: v.index)
    for v in by_index:
        out.append(N.note(N.NAME_QEMU, N.NT_QEMU, _qemu_state(v)))
    out.append(N.note(N.NAME_PYKVM, N.NT_PYKVM, _json(snap, layout, written, signo).encode()))
    info = bytes(snap.crash_info[:CRASH_INFO_MAX])
    if info:
        out.append(N.note(N.NAME_VMCOREINFO, N.NT_VMCOREINFO, info))
    return b"".join(out)


def _seg(sregs: dict, name: str) -> dict:
    s = sregs.get(name)
    return s if isinstance(s, dict) else {}


def _user_regs(v: VcpuState) -> dict:
    """user_regs_struct values for a vCPU: GPRs, selectors, fs/gs bases."""
    r, s = v.regs, v.sregs
    u = {k: r.get(k, 0) for k in N.USER_REGS if k in r}
    u.update(eflags=r.get("rflags", 0), orig_rax=-1,
             fs_base=_seg(s, "fs").get("base", 0), gs_base=_seg(s, "gs").get("base", 0))
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        u[name] = _seg(s, name).get("selector", 0)
    return u


def _qemu_state(v: VcpuState) -> bytes:
    """QEMUCPUState for a vCPU from its KVM regs/sregs."""
    s = v.sregs
    segs = {}
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr"):
        d = _seg(s, name)
        segs[name] = (d.get("selector", 0), d.get("limit", 0), seg_flags(d), d.get("base", 0))
    for name in ("gdt", "idt"):
        d = _seg(s, name)
        segs[name] = (0, d.get("limit", 0), 0, d.get("base", 0))
    crs = (s.get("cr0", 0), 0, s.get("cr2", 0), s.get("cr3", 0), s.get("cr4", 0))
    return N.pack_qemu_cpustate(v.regs, segs, crs)


def _json(snap: CrashSnapshot, layout: Layout, written: int, signo: int) -> str:
    """The pykvm note's JSON text."""
    phys_first = 1 + len(layout.loads) - len(snap.memory.regions)
    doc = {
        "format": FORMAT_VERSION,
        "trigger": snap.trigger,
        "reason": snap.reason,
        "vector": snap.vector,
        "vector_name": vector_name(snap.vector),
        "error_code": snap.error_code,
        "exit_reason": snap.exit_reason,
        "crashing_vcpu": snap.crashing_vcpu,
        "signal": signo,
        "serial_tail": bytes(snap.serial_tail[-SERIAL_TAIL_MAX:]).decode("utf-8", errors="replace"),
        "config": snap.config,
        "pykvm_version": snap.pykvm_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "vcpus": [{"index": v.index, "mode": v.mode, "efer": N.u64(v.sregs.get("efer")),
                   "cr8": N.u64(v.sregs.get("cr8")), "apic_base": N.u64(v.sregs.get("apic_base")),
                   "fpu": v.fpu is not None} for v in sorted(snap.vcpus, key=lambda v: v.index)],
        "prstatus_order": [v.index for v in _ordered(snap)],
        "qemu_note_order": sorted(v.index for v in snap.vcpus),
        "memory": {"regions": [{"gpa": r.gpa, "size": r.size, "name": r.name, "node": r.node,
                                "phdr": phys_first + i} for i, r in enumerate(snap.memory.regions)]},
        "address_spaces": layout.spaces,
        "dropped_segments": layout.dropped_segments,
        "dropped_address_spaces": layout.dropped_spaces,
        "bytes_written": written,
        "crash_info_bytes": min(len(snap.crash_info), CRASH_INFO_MAX),
        "bus": snap.bus,
        "screen": screen_text(bytes(snap.screen[:TEXT_BYTES])) if snap.screen else "",
        "screen_cursor": list(snap.screen_cursor) if snap.screen_cursor else None,
    }
    # config comes from the caller and may hold paths or enums: stringify what JSON can't take.
    return json.dumps(doc, default=str, ensure_ascii=False)


# -- file handling -----------------------------------------------------------

def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """pwrite until everything is written (pwrite may write less than asked)."""
    while len(buf):
        n = os.pwrite(fd, buf[:_MAX_PWRITE], offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        buf, offset = buf[n:], offset + n


def _next_n() -> int:
    with _counter_lock:
        return next(_counter)


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _publish(fd: int, tmp: str | None, dfd: int, crash_dir: str, prefix: str) -> str:
    """Give the finished file a unique final name without ever replacing an existing file."""
    stamp = _stamp()
    for _ in range(1000):
        base = f"{prefix}-{stamp}-{os.getpid()}-{_next_n()}.core"
        name = _rel(dfd, base)
        try:
            if tmp is None:  # linkat(AT_FDCWD, "/proc/self/fd/N", dfd, name, AT_SYMLINK_FOLLOW)
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd)
            else:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # fails with EEXIST instead of overwriting
        except FileExistsError:
            continue
        except OSError as e:
            if tmp is None or e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or _exists(name, dfd):
                raise
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # filesystem without hard links: checked, then renamed
        else:
            if tmp is not None:
                os.unlink(tmp, dir_fd=dfd)
        os.fsync(dfd)
        return base if crash_dir == "." else f"{crash_dir.rstrip('/')}/{base}"
    raise CoreWriteError(f"cannot find a free core file name in {crash_dir}")


