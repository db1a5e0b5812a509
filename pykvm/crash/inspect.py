"""Turn a pykvm core into a report: why the guest died, registers, code at RIP, backtrace."""

from __future__ import annotations

from pathlib import Path

import capstone

from .reader import CoreFile
from .symbols import SymbolError, SymbolTable
from .x86 import pf_error_text, vector_name

INPUT_SUFFIX = ".input"   # pykvm fuzz writes a crash's input beside its core, named the core's name + this
MAX_FRAMES = 64          # the rbp chain is guest data: bound the walk
MAX_FRAME_SIZE = 1 << 20  # a caller's frame more than this above its callee ends the walk
INSNS_BEFORE = 6
INSNS_AFTER = 6
_BACK_BYTES = 64          # how far before RIP to look for an instruction boundary
_FUNC_REACH = 4096        # decode from the function start when it is this close to RIP
_STACK_WORDS = 32         # without symbols: stack words above RSP searched for frame 0's return address
_CS_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}


def build_report(core_path, kernel_path=None) -> dict:
    """A JSON-serializable dict describing the crash recorded in `core_path`."""
    symbols, sym_error = None, None
    if kernel_path is not None:
        try:
            symbols = SymbolTable.from_elf(kernel_path)
        except SymbolError as e:
            sym_error = str(e)
    with CoreFile(core_path) as core:
        info = core.info
        vector, code = info.get("vector"), info.get("error_code")
        report = {
            "core": str(Path(core_path)),
            "kernel": str(kernel_path) if kernel_path is not None else None,
            "symbols_error": sym_error,
            "trigger": info.get("trigger"),
            "reason": info.get("reason"),
            "vector": vector,
            "vector_name": vector_name(vector) if isinstance(vector, int) else None,
            "error_code": code,
            "error_code_text": pf_error_text(code) if vector == 14 and isinstance(code, int) else None,
            "exit_reason": info.get("exit_reason"),
            "crashing_vcpu": info.get("crashing_vcpu"),
            "signal": info.get("signal"),
            "pykvm_version": info.get("pykvm_version"),
            "created": info.get("created"),
            "config": info.get("config"),
            "memory": info.get("memory"),
            "address_spaces": info.get("address_spaces"),
            "dropped_segments": info.get("dropped_segments", 0),
            "serial_tail": info.get("serial_tail", ""),
            "crash_info": core.vmcoreinfo.decode("utf-8", errors="replace"),
            "bus": info.get("bus") if isinstance(info.get("bus"), dict) else None,
            "screen": _screen(info.get("screen")),
            "vcpus": [_vcpu_report(core, v, symbols) for v in core.vcpus],
        }
    return report


def _screen(text) -> str:
    """The note's screen text, bounded (it is what the guest wrote): at most 25 rows of 80 characters."""
    if not isinstance(text, str):
        return ""
    return "\n".join(line[:80] for line in text.splitlines()[:25])


def _vcpu_report(core: CoreFile, v: dict, symbols: SymbolTable | None) -> dict:
    mode = v["mode"]
    pc = _linear_pc(v)
    out = {
        "index": v["index"],
        "signal": v["signal"],
        "mode": mode,
        "regs": v["regs"],
        "segments": v["segments"],
        "cr0": v["cr0"], "cr2": v["cr2"], "cr3": v["cr3"], "cr4": v["cr4"],
        "efer": v["efer"], "cr8": v["cr8"], "apic_base": v["apic_base"],
        "pc": pc,
        "pc_symbol": symbols.format(pc) if symbols else None,
    }
    if v["fpu"]:
        f = v["fpu"]
        out["fpu"] = {k: f[k] for k in ("fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "mxcsr")}
    out["code"] = disassemble_around(core, v["index"], pc, mode["bits"], symbols)
    out["backtrace"] = backtrace(core, v, symbols)
    return out


def _linear_pc(v: dict) -> int:
    """RIP as a linear address: CS.base + IP outside 64-bit mode."""
    bits = v["mode"]["bits"]
    rip = v["regs"]["rip"]
    if bits == 64:
        return rip
    base = v["segments"].get("cs", {}).get("base", 0)
    return (base + (rip & (0xFFFF if bits == 16 else 0xFFFFFFFF))) & 0xFFFFFFFF


# -- disassembly ---------------------------------------------------------------

def disassemble_around(core: CoreFile, vcpu: int, pc: int, bits: int, symbols: SymbolTable | None = None) -> dict:
    """Instructions before and after `pc` as vCPU `vcpu` sees memory; the one at `pc` is marked current."""
    md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES.get(bits, capstone.CS_MODE_64))
    after = core.read_some(pc, 16 * INSNS_AFTER, vcpu)
    if not after:
        return {"bits": bits, "error": f"memory at {pc:#x} is not in the core", "insns": []}
    before = _before(core, md, vcpu, pc, symbols)
    following = list(md.disasm(after, pc))[:INSNS_AFTER]
    insns = [_insn(i, symbols, i.address == pc) for i in before + following]
    res = {"bits": bits, "insns": insns}
    if not following:
        res["error"] = f"bytes at {pc:#x} do not decode as a {bits}-bit instruction"
        res["bytes"] = after[:16].hex()
    return res


def _decode_to(md, code: bytes, start: int, pc: int) -> list | None:
    """Instructions from start that end exactly at pc, or None when decoding does not land on pc."""
    got = []
    for insn in md.disasm(code, start):
        if insn.address >= pc:
            break
        got.append(insn)
    if got and got[-1].address + got[-1].size == pc:
        return got
    return None


def _before(core: CoreFile, md, vcpu: int, pc: int, symbols) -> list:
    """Up to INSNS_BEFORE instructions ending at pc (x86 lengths vary, so find a start that lands on pc)."""
    start = symbols.start_of(pc) if symbols else None
    if start is not None and 0 < pc - start <= _FUNC_REACH:
        code = core.read(start, pc - start, vcpu)
        if code is not None:
            got = _decode_to(md, code, start, pc)
            if got:
                return got[-INSNS_BEFORE:]
    for back in range(min(_BACK_BYTES, pc), 0, -1):
        code = core.read(pc - back, back, vcpu)
        if code is None:
            continue
        got = _decode_to(md, code, pc - back, pc)
        if got:
            return got[-INSNS_BEFORE:]
    return []


def _insn(i, symbols, current: bool) -> dict:
    return {"address": i.address, "bytes": i.bytes.hex(), "mnemonic": i.mnemonic, "op_str": i.op_str,
            "symbol": symbols.format(i.address) if symbols else None, "current": current}


# -- backtrace -------------------------------------------------------------------

def backtrace(core: CoreFile, v: dict, symbols: SymbolTable | None = None) -> dict:
    """Frame-pointer walk from RIP/RBP through the vCPU's memory view, bounded and loop-proof."""
    bits = v["mode"]["bits"]
    pc = _linear_pc(v)
    frames = [_frame(0, pc, symbols, call_site=False)]
    if bits == 16:
        return {"frames": frames, "stop": "no frame-pointer walk in 16-bit code"}
    word = bits // 8
    mask = (1 << bits) - 1
    ss_base = 0 if bits == 64 else v["segments"].get("ss", {}).get("base", 0)
    fp = v["regs"]["rbp"] & mask
    stop = f"depth limit ({MAX_FRAMES} frames)"
    first = 1
    # Frame 0 may not have a frame of its own (a leaf gcc left frameless, RIP in the prologue
    # or at the ret): RBP is then still the caller's, and the rbp walk alone would skip the caller.
    start = symbols.start_of(pc) if symbols is not None else None
    if start is not None:
        ret = _unframed_return(core, v, pc, bits, ss_base, start)
    else:
        ret = _unframed_return_unsymbolized(core, v, pc, bits, ss_base)
    if ret is not None:
        frames.append(_frame(1, ret, symbols, call_site=True))
        first = 2
    for depth in range(first, MAX_FRAMES):
        if fp == 0:
            stop = "end of frame-pointer chain"
            break
        if fp % word:
            stop = f"misaligned frame pointer {fp:#x}"
            break
        raw = core.read((ss_base + fp) & ((1 << 64) - 1), 2 * word, v["index"])
        if raw is None:
            stop = f"frame at {fp:#x} is not in the core"
            break
        next_fp = int.from_bytes(raw[:word], "little")
        ret = int.from_bytes(raw[word:], "little")
        if ret == 0:
            stop = "return address 0"
            break
        frames.append(_frame(depth, ret, symbols, call_site=True, fp=fp))
        # The stack grows down, so each caller's frame lies above its callee's:
        # a frame pointer that does not increase is a loop or garbage.
        if next_fp <= fp or next_fp - fp > MAX_FRAME_SIZE:
            stop = "end of frame-pointer chain" if next_fp == 0 else f"frame pointer {next_fp:#x} does not move up the stack"
            break
        fp = next_fp
    return {"frames": frames, "stop": stop}


def _unframed_return(core: CoreFile, v: dict, pc: int, bits: int, ss_base: int, start: int) -> int | None:
    """Frame 0's return address when RBP is not (or no longer) its function's own frame pointer.

    At a `ret` the return address is at RSP. Otherwise the function is decoded from its symbol
    to RIP: if `mov rbp, rsp` has not run, the return address is at RSP plus what the pushes and
    `sub rsp` so far reserved. Believed only when the bytes before it are a call instruction.
    `start` is the function's first instruction (from its symbol, or from the call into it).
    """
    if bits == 16 or not 0 <= pc - start <= _FUNC_REACH:
        return None
    word = bits // 8
    sp, bp = ("rsp", "rbp") if bits == 64 else ("esp", "ebp")
    md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES[bits])
    code = core.read_some(start, pc - start + 16, v["index"])
    at = next(md.disasm(code[pc - start:], pc), None) if len(code) > pc - start else None
    if at is None:
        return None
    adjust = 0
    if at.mnemonic != "ret":
        for insn in md.disasm(code[:pc - start], start):
            ops = insn.op_str
            if insn.mnemonic == "mov" and ops == f"{bp}, {sp}":
                return None               # the frame is set up: RBP is this function's own
            if insn.mnemonic == "push":
                adjust += word
            elif insn.mnemonic == "pop":
                adjust -= word
            elif insn.mnemonic in ("sub", "add") and ops.startswith(f"{sp}, "):
                try:
                    n = int(ops.split(", ", 1)[1], 0)
                except ValueError:
                    return None
                adjust += n if insn.mnemonic == "sub" else -n
            elif ops.startswith(sp) or insn.mnemonic in ("leave", "enter"):
                return None               # RSP changed in a way this scan does not follow
        else:
            if _insn_end(md, code[:pc - start], start) != pc:
                return None               # RIP is not on an instruction boundary of the function
    if adjust < 0:
        return None
    rsp = v["regs"]["rsp"] & ((1 << bits) - 1)
    raw = core.read((ss_base + rsp + adjust) & ((1 << 64) - 1), word, v["index"])
    if raw is None:
        return None
    ret = int.from_bytes(raw, "little")
    return ret if _follows_call(core, md, v["index"], ret) else None


def _called_function(core: CoreFile, md, vcpu: int, ret: int) -> int | None:
    """The target of the direct `call rel32` that ends just before `ret`, or None."""
    code = core.read(ret - 5, 5, vcpu)
    insns = list(md.disasm(code, ret - 5)) if code is not None else []
    if len(insns) == 1 and insns[0].mnemonic == "call" and insns[0].size == 5:
        try:
            return int(insns[0].op_str, 0)
        except ValueError:
            return None
    return None


def _unframed_return_unsymbolized(core: CoreFile, v: dict, pc: int, bits: int, ss_base: int) -> int | None:
    """Frame 0's return address without symbols: the function start comes from the call that entered it.

    A stack word just above RSP that follows a direct call into a function containing RIP
    names that function's start; from there the same decode as with symbols decides whether
    RBP is still the caller's and where the return address is. Both must agree.
    """
    if bits == 16:
        return None
    word = bits // 8
    md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES[bits])
    rsp = v["regs"]["rsp"] & ((1 << bits) - 1)
    stack = core.read_some((ss_base + rsp) & ((1 << 64) - 1), _STACK_WORDS * word, v["index"])
    for k in range(len(stack) // word):
        cand = int.from_bytes(stack[k * word:(k + 1) * word], "little")
        start = _called_function(core, md, v["index"], cand)
        if start is None or not 0 <= pc - start <= _FUNC_REACH:
            continue
        ret = _unframed_return(core, v, pc, bits, ss_base, start)
        return ret if ret == cand else None
    return None


def _insn_end(md, code: bytes, start: int) -> int:
    """Address just past the last instruction that decodes from code."""
    end = start
    for insn in md.disasm(code, start):
        end = insn.address + insn.size
    return end


def _follows_call(core: CoreFile, md, vcpu: int, addr: int) -> bool:
    """Whether the bytes just before `addr` decode as one call instruction ending at `addr`."""
    for size in (5, 2, 3, 6, 7):          # call rel32; call reg; call [reg+d8]; call [rip+d32] ...
        code = core.read(addr - size, size, vcpu)
        if code is None:
            continue
        insns = list(md.disasm(code, addr - size))
        if len(insns) == 1 and insns[0].mnemonic == "call" and insns[0].size == size:
            return True
    return False


def _frame(depth: int, pc: int, symbols, call_site: bool, fp: int | None = None) -> dict:
    return {"depth": depth, "pc": pc, "fp": fp, "symbol": symbols.format(pc, call_site) if symbols else None}


# -- text ------------------------------------------------------------------------

def render_text(report: dict) -> str:
    """A human-readable crash report."""
    out = [f"pykvm crash report: {report['core']}"]
    why = report.get("trigger") or "?"
    if report.get("vector_name"):
        why += f": {report['vector_name']} (vector {report['vector']})"
    out.append(f"  trigger:       {why}")
    if report.get("error_code") is not None:
        text = f" ({report['error_code_text']})" if report.get("error_code_text") else ""
        out.append(f"  error code:    {report['error_code']:#x}{text}")
    out.append(f"  reason:        {report.get('reason')}")
    if report.get("exit_reason"):
        out.append(f"  exit reason:   {report['exit_reason']}")
    out.append(f"  crashing vCPU: {report.get('crashing_vcpu')} of {len(report['vcpus'])}")
    fuzz = (report.get("config") or {}).get("fuzz_input")
    if isinstance(fuzz, dict) and fuzz.get("suffix") == INPUT_SUFFIX:
        out.append(f"  fuzz input:    {report['core']}{INPUT_SUFFIX} ({fuzz.get('bytes')} bytes, "
                   f"sha256 {fuzz.get('sha256')}; rerun: pykvm fuzz KERNEL --input FILE)")
    out.append(f"  written by:    pykvm {report.get('pykvm_version')} at {report.get('created')}")
    if report.get("symbols_error"):
        out.append(f"  symbols:       {report['symbols_error']}")
    if report.get("dropped_segments"):
        out.append(f"  note:          {report['dropped_segments']} virtual mappings were not recorded (segment cap)")
    crashing = report.get("crashing_vcpu")
    for v in sorted(report["vcpus"], key=lambda v: v["index"] != crashing):
        out.append("")
        out += _render_vcpu(v, v["index"] == crashing, report.get("vector") == 14)
    tail = report.get("serial_tail") or ""
    if tail:
        out += ["", "serial output (tail):"] + ["  " + line for line in tail.rstrip("\n").splitlines()[-40:]]
    out += _bus_lines(report.get("bus"))
    if report.get("screen"):
        out += ["", "VGA text screen (final):"] + ["  |" + line for line in report["screen"].splitlines()]
    if report.get("crash_info"):
        out += ["", "guest crash info:"] + ["  " + line for line in report["crash_info"].rstrip("\n").splitlines()]
    return "\n".join(out) + "\n"


def _bus_lines(bus) -> list[str]:
    """The partition bus section: connection, channels with ring indices, GPADLs (tolerates a bad note)."""
    if not isinstance(bus, dict):
        return []

    def text(v) -> str:
        return str(v)[:80] if isinstance(v, (str, int, float)) or v is None else "?"

    out = ["", "partition bus:",
           f"  state {text(bus.get('state'))}, version {text(bus.get('version'))}, "
           f"{text(bus.get('violations'))} violations, {text(bus.get('refusals'))} refusals"]
    channels = bus.get("channels") if isinstance(bus.get("channels"), list) else []
    for ch in channels[:64]:
        if not isinstance(ch, dict):
            continue
        v = ch.get("version")
        version = f"{v >> 16}.{v & 0xFFFF}" if isinstance(v, int) and 0 <= v < 1 << 32 else text(v)
        line = (f"  channel {text(ch.get('relid'))} {text(ch.get('service'))}: {text(ch.get('state'))}"
                f" v{version} gpadl {text(ch.get('gpadl'))}"
                f" in {text(ch.get('packets_in'))} out {text(ch.get('packets_out'))}")
        for name in ("guest_to_host", "host_to_guest"):
            ring = ch.get(name)
            if isinstance(ring, dict):
                line += f" {name} w={text(ring.get('write_index'))} r={text(ring.get('read_index'))}"
        if ch.get("closed_reason"):
            line += f" (closed: {text(ch.get('closed_reason'))})"
        out.append(line)
    gpadls = bus.get("gpadls") if isinstance(bus.get("gpadls"), list) else []
    for g in gpadls[:64]:
        if isinstance(g, dict):
            out.append(f"  gpadl {text(g.get('id'))}: {text(g.get('pages'))} pages")
    return out


def _render_vcpu(v: dict, crashing: bool, page_fault: bool) -> list[str]:
    m = v["mode"]
    paging = f"paging {m['paging_levels']}-level" if m["paging"] else "paging off"
    head = (f"vCPU {v['index']}{' (crashing)' if crashing else ''}: {m['name']} mode, {m['bits']}-bit code, "
            f"{paging}{', PAE' if m['pae'] else ''}, interrupts {'on' if m['interrupts'] else 'off'}")
    out = [head]
    regs = v["regs"]
    names = list(regs)
    for i in range(0, len(names), 4):
        out.append("  " + "  ".join(f"{n:>6} {regs[n]:#018x}" for n in names[i:i + 4]))
    for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt"):
        s = v["segments"].get(name)
        if s:
            out.append(f"  {name:>3} sel {s['selector']:#06x} base {s['base']:#018x} limit {s['limit']:#010x} "
                       f"type {s.get('type', 0):#x} dpl {s.get('dpl', 0)} "
                       f"{'L' if s.get('l') else ''}{'D' if s.get('db') else ''}{'P' if s.get('present') else 'NP'}")
    for name in ("gdt", "idt"):
        s = v["segments"].get(name)
        if s:
            out.append(f"  {name} base {s['base']:#018x} limit {s['limit']:#06x}")
    out.append("  " + "  ".join(f"{k} {v[k]:#x}" for k in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")))
    if crashing and page_fault:
        out.append(f"  fault address (cr2): {v['cr2']:#x}")
    out.append("  code:")
    code = v["code"]
    out += _code_lines(code["insns"])
    if code.get("error"):
        out.append(f"     ({code['error']})")
    out.append("  backtrace:")
    for f in v["backtrace"]["frames"]:
        sym = f" {f['symbol']}" if f.get("symbol") else ""
        out.append(f"    #{f['depth']:<2} {f['pc']:#018x}{sym}")
    out.append(f"    ({v['backtrace']['stop']})")
    return out


def _code_lines(insns: list[dict]) -> list[str]:
    """The code listing with every column (address, symbol, bytes, mnemonic) aligned across lines."""
    if not insns:
        return []
    heads = [f"{i['address']:#x}" + (f" <{i['symbol']}>" if i.get("symbol") else "") + ":" for i in insns]
    head_w = max(map(len, heads))
    bytes_w = max(len(i["bytes"]) for i in insns)
    mnem_w = max(len(i["mnemonic"]) for i in insns)
    return [f"  {'=>' if i['current'] else '  '} {h:<{head_w}} {i['bytes']:<{bytes_w}} "
            f"{i['mnemonic']:<{mnem_w}} {i['op_str']}".rstrip() for h, i in zip(heads, insns)]
