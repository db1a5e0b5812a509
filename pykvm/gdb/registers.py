"""The x86-64 register file as gdb sees it: target.xml, and register values to and from KVM's structs.

The layout follows gdb's own descriptions (features/i386/64bit-core.xml, 64bit-sse.xml,
64bit-segments.xml), in their order, so gdb's i386 code recognises every register; the
control registers and EFER follow in a feature of their own ("org.gnu.gdb.i386.sys", the name
QEMU uses), which gdb shows as extra registers ("info registers cr3").
"""

from __future__ import annotations

import struct
from typing import NamedTuple


class Reg(NamedTuple):
    """One register: its name, width in bits, gdb type and group, and the feature it belongs to."""

    name: str
    bits: int
    type: str
    group: str
    feature: str


_CORE, _SSE, _SEG, _SYS = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments", \
    "org.gnu.gdb.i386.sys"
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

REGS: tuple[Reg, ...] = (
    *(Reg(n, 64, {"rbp": "data_ptr", "rsp": "data_ptr"}.get(n, "int64"), "general", _CORE) for n in GPRS),
    Reg("rip", 64, "code_ptr", "general", _CORE),
    Reg("eflags", 32, "i386_eflags", "general", _CORE),
    *(Reg(n, 32, "int32", "general", _CORE) for n in SEGMENTS),
    *(Reg(f"st{i}", 80, "i387_ext", "float", _CORE) for i in range(8)),
    *(Reg(n, 32, "int", "float", _CORE) for n in X87_CONTROL),
    *(Reg(f"xmm{i}", 128, "vec128", "vector", _SSE) for i in range(16)),
    Reg("mxcsr", 32, "i386_mxcsr", "vector", _SSE),
    Reg("fs_base", 64, "int", "general", _SEG),
    Reg("gs_base", 64, "int", "general", _SEG),
    *(Reg(n, 64, "int", "system", _SYS) for n in CONTROL),
)
INDEX = {r.name: i for i, r in enumerate(REGS)}
RIP = INDEX["rip"]

_EFLAGS = [("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
           ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21)]
_MXCSR = [("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7), ("DM", 8),
          ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)]
_VEC128 = """<vector id="v8bf16" type="bfloat16" count="8"/><vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/><vector id="v16i8" type="int8" count="16"/>
<vector id="v8i16" type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/>
<vector id="v2i64" type="int64" count="2"/>
<union id="vec128"><field name="v8_bfloat16" type="v8bf16"/><field name="v4_float" type="v4f"/>
<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>"""


def _flags(ident: str, fields) -> str:
    inner = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in fields)
    return f'<flags id="{ident}" size="4">{inner}</flags>'


def target_xml(bfloat16: bool = True) -> str:
    """The whole target description, one document (no xi:include, so one qXfer annex serves it)."""
    types = {_CORE: _flags("i386_eflags", _EFLAGS),
             _SSE: (_VEC128 if bfloat16 else _VEC128.replace('<vector id="v8bf16" type="bfloat16" count="8"/>', "")
                    .replace('<field name="v8_bfloat16" type="v8bf16"/>', "")) + _flags("i386_mxcsr", _MXCSR)}
    parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">',
             "<target><architecture>i386:x86-64</architecture>"]
    feature = None
    for i, r in enumerate(REGS):
        if r.feature != feature:
            if feature is not None:
                parts.append("</feature>")
            feature = r.feature
            parts.append(f'<feature name="{feature}">{types.get(feature, "")}')
        parts.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" group="{r.group}" regnum="{i}"/>')
    parts.append("</feature></target>")
    return "".join(parts)


TARGET_XML = target_xml().encode()


# ---------------------------------------------------------------- values
def _tag_word(abridged: int) -> int:
    """The full x87 tag word from FXSAVE's abridged one: 'valid' (00) where in use, 'empty' (11) elsewhere."""
    return sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))


def _abridged(tag: int) -> int:
    return sum((1 if (tag >> (2 * i)) & 3 != 3 else 0) << i for i in range(8))


def read_values(regs, sregs, fpu) -> list[bytes]:
    """Every register's little-endian bytes, in REGS order, from KVM's regs/sregs/fpu cdata (fpu may be None)."""
    out: list[bytes] = [struct.pack("<Q", getattr(regs, n)) for n in GPRS]
    out.append(struct.pack("<Q", regs.rip))
    out.append(struct.pack("<I", regs.rflags & 0xFFFFFFFF))
    out += [struct.pack("<I", getattr(sregs, n).selector) for n in SEGMENTS]
    if fpu is not None:
        out += [bytes(fpu.fpr[i][0:10]) for i in range(8)]
        out += [struct.pack("<I", v) for v in (fpu.fcw, fpu.fsw, _tag_word(fpu.ftwx), 0,
                                               fpu.last_ip & 0xFFFFFFFF, 0, fpu.last_dp & 0xFFFFFFFF,
                                               fpu.last_opcode)]
        out += [bytes(fpu.xmm[i][0:16]) for i in range(16)]
        out.append(struct.pack("<I", fpu.mxcsr))
    else:
        out += [bytes(10)] * 8 + [bytes(4)] * 8 + [bytes(16)] * 16 + [bytes(4)]
    out += [struct.pack("<Q", sregs.fs.base), struct.pack("<Q", sregs.gs.base)]
    out += [struct.pack("<Q", getattr(sregs, n)) for n in CONTROL]
    return out


def write_value(index: int, raw: bytes, regs, sregs, fpu) -> str:
    """Store one register's bytes into the cdata it lives in; returns which ('regs', 'sregs' or 'fpu')."""
    r = REGS[index]
    if len(raw) != r.bits // 8:
        raise ValueError(f"{r.name} is {r.bits // 8} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "little")
    if r.name in GPRS or r.name == "rip":
        setattr(regs, r.name, value)
        return "regs"
    if r.name == "eflags":
        regs.rflags = value
        return "regs"
    if r.name in SEGMENTS:
        getattr(sregs, r.name).selector = value & 0xFFFF
        return "sregs"
    if r.name in ("fs_base", "gs_base"):
        getattr(sregs, r.name[:2]).base = value
        return "sregs"
    if r.name in CONTROL:
        setattr(sregs, r.name, value)
        return "sregs"
    if fpu is None:
        raise ValueError("the FPU state is unavailable")
    if r.name.startswith("st"):
        fpu.fpr[int(r.name[2:])][0:10] = list(raw)
    elif r.name.startswith("xmm"):
        fpu.xmm[int(r.name[3:])][0:16] = list(raw)
    elif r.name == "mxcsr":
        fpu.mxcsr = value
    elif r.name == "fctrl":
        fpu.fcw = value & 0xFFFF
    elif r.name == "fstat":
        fpu.fsw = value & 0xFFFF
    elif r.name == "ftag":
        fpu.ftwx = _abridged(value)
    elif r.name == "fop":
        fpu.last_opcode = value & 0xFFFF
    elif r.name == "fioff":
        fpu.last_ip = value
    elif r.name == "fooff":
        fpu.last_dp = value
    # fiseg/foseg have no place in KVM's 64-bit FPU state: writes are accepted and dropped
    return "fpu"


REG_SIZES = tuple(r.bits // 8 for r in REGS)
G_SIZE = sum(REG_SIZES)
