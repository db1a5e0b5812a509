"""Read a pykvm core back: the pykvm JSON, per-vCPU registers, and memory by virtual or physical address."""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import notes as N
from .x86 import cpu_mode, seg_attrs

MAX_NOTES = 4096  # a pykvm core has 3 notes per vCPU plus two; anything wildly larger is not ours


class CoreFormatError(Exception):
    """The file is not a pykvm core, or it is truncated or damaged."""


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD of the core."""

    index: int  # program header index
    vaddr: int
    paddr: int
    size: int
    offset: int
    flags: int


class _Index:
    """Non-overlapping segments sorted by one address, looked up by bisection."""

    def __init__(self, segs: list[LoadSegment], key: str):
        self.key = key
        self.segs = sorted(segs, key=lambda s: getattr(s, key))
        self.starts = [getattr(s, key) for s in self.segs]

    def find(self, addr: int) -> LoadSegment | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            s = self.segs[i]
            if addr < getattr(s, self.key) + s.size:
                return s
        return None


class CoreFile:
    """An open pykvm core file."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise CoreFormatError(f"{self.path}: cannot open: {e.strerror or e}") from e
        try:
            self._parse()
        except CoreFormatError:
            self._f.close()
            raise
        except (ELFError, ValueError, KeyError, TypeError, IndexError, OSError) as e:
            # pyelftools raises assorted errors on damaged headers; report them as one kind.
            self._f.close()
            raise CoreFormatError(f"{self.path}: damaged core file ({type(e).__name__}: {e})") from e

    # -- parsing --------------------------------------------------------------
    def _parse(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        if self._f.read(4) != b"\x7fELF":
            raise CoreFormatError(f"{self.path}: not an ELF file")
        self._f.seek(0)
        elf = ELFFile(self._f)
        if elf["e_type"] != "ET_CORE" or elf["e_machine"] != "EM_X86_64" or elf.elfclass != 64:
            raise CoreFormatError(f"{self.path}: not an x86-64 ELF core (type {elf['e_type']}, "
                                  f"machine {elf['e_machine']}, class {elf.elfclass})")
        note_seg = None
        loads = []
        for i, seg in enumerate(elf.iter_segments()):
            h = seg.header
            if h["p_offset"] + h["p_filesz"] > size:
                raise CoreFormatError(f"{self.path}: truncated: segment {i} ends at "
                                      f"{h['p_offset'] + h['p_filesz']:#x} but the file has {size:#x} bytes")
            if h["p_type"] == "PT_NOTE" and note_seg is None:
                note_seg = seg
            elif h["p_type"] == "PT_LOAD":
                loads.append(LoadSegment(i, h["p_vaddr"], h["p_paddr"], h["p_filesz"], h["p_offset"], h["p_flags"]))
        if note_seg is None:
            raise CoreFormatError(f"{self.path}: no PT_NOTE segment: not a pykvm core")
        self.loads = loads
        self._read_notes(note_seg)
        self._index_memory()

    def _read_notes(self, seg) -> None:
        prstatus, fpregs, qemu = [], [], []
        info = None
        self.vmcoreinfo = b""
        for k, n in enumerate(seg.iter_notes()):
            if k >= MAX_NOTES:
                raise CoreFormatError(f"{self.path}: more than {MAX_NOTES} notes: not a pykvm core")
            name, ntype, desc = n["n_name"], n["n_type"], bytes(n["n_descdata"])
            if len(desc) != n["n_descsz"]:
                raise CoreFormatError(f"{self.path}: truncated note {name!r}")
            if name == N.NAME_CORE and ntype == "NT_PRSTATUS":
                prstatus.append(N.unpack_prstatus(_need(desc, N.PRSTATUS_SIZE, self.path, name)))
            elif name == N.NAME_CORE and ntype == "NT_FPREGSET":
                fpregs.append(N.unpack_fpregset(_need(desc, N.FPREGSET_SIZE, self.path, name)))
            elif name == N.NAME_QEMU and ntype == N.NT_QEMU:
                qemu.append(N.unpack_qemu_cpustate(_need(desc, N.QEMU_CPUSTATE_SIZE, self.path, name)))
            elif name == N.NAME_PYKVM and ntype == N.NT_PYKVM:
                try:
                    info = json.loads(desc.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise CoreFormatError(f"{self.path}: unreadable pykvm note: {e}") from e
            elif name == N.NAME_VMCOREINFO:
                self.vmcoreinfo = desc
        if not isinstance(info, dict):
            raise CoreFormatError(f"{self.path}: no pykvm note: not a core written by pykvm")
        self.info = info
        self.vcpus = self._merge_vcpus(prstatus, fpregs, qemu)

    def _merge_vcpus(self, prstatus, fpregs, qemu) -> list[dict]:
        """One register dict per vCPU, in index order: GPRs from NT_PRSTATUS, the rest from the QEMU note."""
        meta = {v["index"]: v for v in self.info.get("vcpus", [])}
        qemu_order = self.info.get("qemu_note_order") or sorted(meta)
        by_qemu = dict(zip(qemu_order, qemu))
        out = []
        for k, ps in enumerate(prstatus):  # each NT_PRSTATUS is followed by its NT_FPREGSET
            index = ps["pid"] - 1
            u, q, m = ps["regs"], by_qemu.get(index), meta.get(index, {})
            regs = {name: u[name] for name in N.QEMU_GPRS if name != "rflags"}
            regs["rflags"] = u["eflags"]
            v = {"index": index, "pid": ps["pid"], "signal": ps["cursig"], "regs": regs,
                 "fpu": fpregs[k] if k < len(fpregs) and ps["fpvalid"] else None,
                 "efer": m.get("efer", 0), "cr8": m.get("cr8", 0), "apic_base": m.get("apic_base", 0),
                 "mode_hint": m.get("mode", "")}
            if q:
                segs = {}
                for name, s in q["segments"].items():
                    if name in ("gdt", "idt"):
                        segs[name] = {"base": s["base"], "limit": s["limit"]}
                    else:
                        segs[name] = dict(s, **seg_attrs(s["flags"]))
                v["segments"] = segs
                v.update(cr0=q["cr0"], cr2=q["cr2"], cr3=q["cr3"], cr4=q["cr4"])
            else:
                v["segments"] = {}
                v.update(cr0=0, cr2=0, cr3=0, cr4=0)
            cs = v["segments"].get("cs", {})
            v["mode"] = cpu_mode(v["cr0"], v["cr4"], v["efer"], regs["rflags"], cs.get("l", 1), cs.get("db", 0))
            out.append(v)
        return sorted(out, key=lambda v: v["index"])

    def _index_memory(self) -> None:
        by_index = {s.index: s for s in self.loads}
        phys_idx = {r["phdr"] for r in self.info.get("memory", {}).get("regions", []) if isinstance(r, dict)}
        phys = [s for s in self.loads if s.index in phys_idx] or [s for s in self.loads if s.vaddr == s.paddr]
        self._phys = _Index(phys, "paddr")
        self._identity = _Index(phys, "vaddr")
        self._spaces: list[tuple[list[int], _Index]] = []
        for sp in self.info.get("address_spaces", []):
            first, count = int(sp.get("phdr_first", 0)), int(sp.get("phdr_count", 0))
            segs = [by_index[i] for i in range(first, first + count) if i in by_index]
            self._spaces.append((list(sp.get("vcpus", [])), _Index(segs, "vaddr")))

    # -- memory ---------------------------------------------------------------
    def _lookup(self, addr: int, vcpu: int | None) -> LoadSegment | None:
        """The segment gdb would use for `addr` (vcpu=None), or the one vCPU `vcpu` sees."""
        for vcpus, idx in self._spaces:
            if vcpu is None or vcpu in vcpus:
                s = idx.find(addr)
                if s is not None:
                    return s
        return self._identity.find(addr)

    def read_some(self, addr: int, size: int, vcpu: int | None = None) -> bytes:
        """As many bytes from virtual `addr` as the core holds contiguously (up to `size`)."""
        out = bytearray()
        addr &= (1 << 64) - 1
        while size > 0:
            s = self._lookup(addr, vcpu)
            if s is None:
                break
            n = min(size, s.vaddr + s.size - addr)
            chunk = os.pread(self._f.fileno(), n, s.offset + (addr - s.vaddr))
            out += chunk
            if len(chunk) < n:
                break
            addr, size = addr + n, size - n
        return bytes(out)

    def read(self, addr: int, size: int, vcpu: int | None = None) -> bytes | None:
        """`size` bytes at virtual `addr` as vCPU `vcpu` sees them (gdb's view when None), or None."""
        data = self.read_some(addr, size, vcpu)
        return data if len(data) == size else None

    def read_physical(self, paddr: int, size: int) -> bytes | None:
        """`size` bytes of guest-physical memory, or None when not all of it is RAM in the core."""
        s = self._phys.find(paddr)
        if s is None or paddr + size > s.paddr + s.size:
            return None
        data = os.pread(self._f.fileno(), size, s.offset + (paddr - s.paddr))
        return data if len(data) == size else None

    def vcpu(self, index: int) -> dict | None:
        """The register dict of vCPU `index`."""
        return next((v for v in self.vcpus if v["index"] == index), None)

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> "CoreFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _need(desc: bytes, size: int, path: Path, name: str) -> bytes:
    if len(desc) < size:
        raise CoreFormatError(f"{path}: {name} note is {len(desc)} bytes, expected {size}")
    return desc


def open_core(path) -> CoreFile:
    """Open and validate a pykvm core file."""
    return CoreFile(path)
