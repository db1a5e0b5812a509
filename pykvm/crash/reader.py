"""Read a pykvm core back: the pykvm JSON, per-vCPU registers, and memory by virtual or physical address."""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..record import record
from . import notes as N
from .x86 import cpu_mode, seg_attrs

MAX_NOTES = 4096  # a pykvm core has 3 notes per vCPU plus two; anything wildly larger is not ours


class CoreFormatError(Exception):
    """The file is not a pykvm core, or it is truncated or damaged."""


@record(frozen=True)
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
        except Exception as e:  # noqa: BLE001 - the file is untrusted input
            # pyelftools (and construct under it) raise assorted errors on damaged headers and
            # notes; whatever a core file makes them raise, it is a bad core, not a pykvm bug.
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
        self._phnum = elf.num_segments()
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
        try:
            self.info = validate_info(info, self._phnum)
        except ValueError as e:
            raise CoreFormatError(f"{self.path}: bad pykvm note: {e}") from None
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
        phys_idx = {r["phdr"] for r in self.info["memory"]["regions"]}
        phys = [s for s in self.loads if s.index in phys_idx] or [s for s in self.loads if s.vaddr == s.paddr]
        self._phys = _Index(phys, "paddr")
        self._identity = _Index(phys, "vaddr")
        self._spaces: list[tuple[list[int], _Index]] = []
        for sp in self.info["address_spaces"]:
            first, count = sp.get("phdr_first", 0), sp.get("phdr_count", 0)   # bounded by validate_info
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


# -- the pykvm note's schema -------------------------------------------------------
# Cores come from other machines: every field inspect reads is checked for type and range
# before anything uses it. None stands for "not recorded" wherever core.py may write it.
U64 = (1 << 64) - 1
MAX_VCPUS = 4096
MAX_LIST = 1 << 16          # any list in the note longer than this is not from pykvm
_TEXT_MAX = 1 << 20

_SCALARS = {                 # field -> (type, lowest, highest) for ints; (str, 0, max length) for text
    "format": (int, 0, U64), "vector": (int, 0, 255), "error_code": (int, 0, U64),
    "crashing_vcpu": (int, 0, MAX_VCPUS - 1), "signal": (int, 0, 255),
    "dropped_segments": (int, 0, U64),
    "bytes_written": (int, 0, U64), "crash_info_bytes": (int, 0, U64),
    "trigger": (str, 0, 256), "reason": (str, 0, _TEXT_MAX), "vector_name": (str, 0, 256),
    "exit_reason": (str, 0, _TEXT_MAX), "serial_tail": (str, 0, _TEXT_MAX), "pykvm_version": (str, 0, 256),
    "created": (str, 0, 256),
}
_VCPU_SCALARS = {"index": (int, 0, MAX_VCPUS - 1), "efer": (int, 0, U64), "cr8": (int, 0, U64),
                 "apic_base": (int, 0, U64), "mode": (str, 0, 256)}


def _scalar(where: str, value, kind, lo: int, hi: int) -> None:
    if kind is int:
        if type(value) is not int or not lo <= value <= hi:
            raise ValueError(f"{where} must be an integer in [{lo}, {hi:#x}], not {_show(value)}")
    elif type(value) is not str or len(value) > hi:
        raise ValueError(f"{where} must be text of at most {hi} characters, not {_show(value)}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _list(where: str, value, limit: int = MAX_LIST) -> list:
    if type(value) is not list or len(value) > limit:
        raise ValueError(f"{where} must be a list of at most {limit} entries, not {_show(value)}")
    return value


def _dict(where: str, value) -> dict:
    if type(value) is not dict:
        raise ValueError(f"{where} must be an object, not {_show(value)}")
    return value


def _fields(where: str, d: dict, schema: dict) -> None:
    for key, (kind, lo, hi) in schema.items():
        if d.get(key) is not None:
            _scalar(f"{where}{key}", d[key], kind, lo, hi)


def validate_info(info: dict, phnum: int) -> dict:
    """The pykvm note checked field by field (types and ranges), with absent containers filled in.

    `phnum` is the core's program header count, which bounds every phdr index the note names.
    Raises ValueError naming the first bad field.
    """
    _fields("", info, _SCALARS)
    if info.get("config") is not None:
        _dict("config", info["config"])
    if info.get("dropped_address_spaces") is not None:
        _list("dropped_address_spaces", info["dropped_address_spaces"])
    out = dict(info)
    out["vcpus"] = _list("vcpus", info.get("vcpus") or [], MAX_VCPUS)
    for k, v in enumerate(out["vcpus"]):
        _fields(f"vcpus[{k}].", _dict(f"vcpus[{k}]", v), _VCPU_SCALARS)
        if "index" not in v:
            raise ValueError(f"vcpus[{k}] has no index")
    for key in ("qemu_note_order", "prstatus_order"):
        if info.get(key) is not None:
            for k, i in enumerate(_list(key, info[key], MAX_VCPUS)):
                _scalar(f"{key}[{k}]", i, int, 0, MAX_VCPUS - 1)
    memory = _dict("memory", info.get("memory") or {"regions": []})
    regions = _list("memory.regions", memory.get("regions") or [])
    for k, r in enumerate(regions):
        _dict(f"memory.regions[{k}]", r)
        _scalar(f"memory.regions[{k}].phdr", r.get("phdr"), int, 0, max(phnum - 1, 0))
        _fields(f"memory.regions[{k}].", r, {"gpa": (int, 0, U64), "size": (int, 0, U64), "node": (int, 0, U64),
                                             "name": (str, 0, 256)})
    out["memory"] = dict(memory, regions=regions)
    out["address_spaces"] = _list("address_spaces", info.get("address_spaces") or [])
    for k, sp in enumerate(out["address_spaces"]):
        where = f"address_spaces[{k}]"
        _dict(where, sp)
        first, count = sp.get("phdr_first", 0), sp.get("phdr_count", 0)
        _scalar(f"{where}.phdr_first", first, int, 0, phnum)
        _scalar(f"{where}.phdr_count", count, int, 0, phnum - first)
        for j, i in enumerate(_list(f"{where}.vcpus", sp.get("vcpus", []), MAX_VCPUS)):
            _scalar(f"{where}.vcpus[{j}]", i, int, 0, MAX_VCPUS - 1)
    return out


def _need(desc: bytes, size: int, path: Path, name: str) -> bytes:
    if len(desc) < size:
        raise CoreFormatError(f"{path}: {name} note is {len(desc)} bytes, expected {size}")
    return desc


def open_core(path) -> CoreFile:
    """Open and validate a pykvm core file."""
    return CoreFile(path)
