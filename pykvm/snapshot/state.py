"""Save a running VM to a file and restore it in another pykvm process.

What is saved (all vCPUs paused, coalesced MMIO drained, every device in D0):
  - the machine configuration (MachineConfig fields that describe the VM, not the run);
  - per vCPU: regs, sregs, fpu, xcrs, LAPIC, vcpu events (raw KVM structs), mp_state, and every
    MSR of KVM_GET_MSR_INDEX_LIST that KVM lets us read; the VM's kvmclock;
  - guest RAM, sparse: only page runs holding non-zero bytes (memory/sparse.py);
  - per device: class, construction config, generation, get_state() and every window's image
    and mode.

File format, version 1 (all integers little-endian):

    offset        size  field
    0             8     magic b"PYKVMSAV"
    8             4     format version (FORMAT_VERSION)
    12            4     H: length of the header
    16            8     P: length of the payload
    24            H     header: UTF-8 JSON object (below)
    24+H          P     payload: binary sections the header points into
    24+H+P        32    SHA-256 of bytes [0, 24+H+P)

The header holds "pykvm_version", "created" (UTC, ISO 8601), "config", "clock", "vcpus"
(structs as hex strings, "msrs" as {"0xINDEX": value}), "memory" ({"regions": [{"gpa", "size",
"runs": [[offset, length, payload_offset], ...]}]}), "devices" ([{"name", "class", "config",
"generation", "state", "windows": [{"name", "gpa", "size", "mode", "payload": [offset, length]}]}])
and "policy" (the access policy's shadow registers, devices/policy.py). Payload offsets are
relative to the payload's start.

Saving is refused while a device is not in D0, while a device's optional `save_refusal()`
returns a reason (an operation in flight on its own thread), with --irqchip full (in-kernel
PIC/IOAPIC/PIT state is not saved), or when a vCPU does not pause in time.

Every header field is checked for type and range against one schema (HEADER_SCHEMA below)
before anything uses it, and any error building the restored machine from the file's
configuration is reported as a bad file too: a checksum proves integrity, not validity.
A file is refused (BadStateError, exit status 26) when its magic is wrong, its format version is
not FORMAT_VERSION, its length does not match the fixed header (truncated or padded), its
checksum does not match, its header is malformed, or it does not fit this pykvm: a different
RAM layout, device set, device class or window layout.
"""

from __future__ import annotations

from .. import record
import datetime
import fcntl
import hashlib
import json
import os
import stat
import struct

from ..version import __version__
from ..devices import State, memwindow
from ..devices.description import TRUST_LEVELS
from ..errors import BadStateError
from ..kvm import KvmError
from ..kvm import constants as C
from ..kvm.abi import ffi
from ..memory.sparse import nonzero_runs

MAGIC = b"PYKVMSAV"
FORMAT_VERSION = 1
FIXED = struct.Struct("<8sIIQ")            # magic, format version, header length, payload length
DIGEST = 32
MAX_HEADER = 64 << 20
MSR_TSC_DEADLINE = 0x6E0
EVENTS_VALID = C.KVM_VCPUEVENT_VALID_NMI_PENDING | C.KVM_VCPUEVENT_VALID_SIPI_VECTOR   # what a load sets back
# MachineConfig fields that belong to one run, not to the VM: never saved, given anew at restore
RUN_ONLY = ("serial_out", "serial_in", "serial_unbuffered", "timeout", "crash_dir", "sandbox", "memory_log")
PATH_FIELDS = ("kernel", "initrd")


# ------------------------------------------------------------------ the header's schema
# A matching checksum proves the file is what some writer wrote, not that its values are sane:
# every field of the header is checked here, in one place, before anything uses it.
U64 = (1 << 64) - 1
ADDR_LIMIT = 1 << 52                       # guest-physical addresses x86-64 can express
MAX_TEXT = 4096
MAX_ITEMS = 4096


def _bad(path: str, what: str) -> BadStateError:
    return BadStateError(f"malformed state file: {path}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, hi: int):
    def check(v, path):
        if not _is_int(v) or not lo <= v <= hi:
            raise _bad(path, f"expected an integer in [{lo:#x}, {hi:#x}], got {_show(v)}")
    return check


def _num(lo: float, hi: float):
    def check(v, path):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
            raise _bad(path, f"expected a number in ({lo}, {hi}], got {_show(v)}")
    return check


def _str(max_len: int = MAX_TEXT):
    def check(v, path):
        if not isinstance(v, str) or len(v) > max_len:
            raise _bad(path, f"expected text of at most {max_len} characters, got {_show(v)}")
    return check


def _enum(*values):
    def check(v, path):
        if not isinstance(v, str) or v not in values:
            raise _bad(path, f"expected one of {', '.join(values)}, got {_show(v)}")
    return check


def _bool(v, path):
    if not isinstance(v, bool):
        raise _bad(path, f"expected true or false, got {_show(v)}")


def _hex(ctype: str):
    def check(v, path):
        n = ffi.sizeof(ctype)
        if not isinstance(v, str) or len(v) != 2 * n:
            raise _bad(path, f"expected {n} bytes of {ctype} as hex, got {_show(v)}")
        try:
            bytes.fromhex(v)
        except ValueError:
            raise _bad(path, "not hexadecimal") from None
    return check


def _opt(check):
    def opt(v, path):
        if v is not None:
            check(v, path)
    return opt


def _list(item, max_len: int = MAX_ITEMS, min_len: int = 0):
    def check(v, path):
        if not isinstance(v, list) or not min_len <= len(v) <= max_len:
            raise _bad(path, f"expected a list of {min_len}..{max_len} items, got {_show(v)}")
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def _tuple(*items):
    def check(v, path):
        if not isinstance(v, list) or len(v) != len(items):
            raise _bad(path, f"expected a list of {len(items)} items, got {_show(v)}")
        for i, (x, item) in enumerate(zip(v, items)):
            item(x, f"{path}[{i}]")
    return check


def _map(key, value, max_len: int = MAX_ITEMS):
    def check(v, path):
        if not isinstance(v, dict) or len(v) > max_len:
            raise _bad(path, f"expected an object of at most {max_len} entries, got {_show(v)}")
        for k, x in v.items():
            key(k, f"{path} key")
            value(x, f"{path}.{k}")
    return check


def _obj(required: dict, optional: dict | None = None):
    """An object with these fields (others are ignored, so newer writers stay readable)."""
    optional = optional or {}

    def check(v, path):
        if not isinstance(v, dict):
            raise _bad(path, f"expected an object, got {_show(v)}")
        for name, field_check in required.items():
            if name not in v:
                raise _bad(path, f"no {name!r}")
            field_check(v[name], f"{path}.{name}")
        for name, field_check in optional.items():
            if name in v:
                field_check(v[name], f"{path}.{name}")
    return check


def _any(v, path):
    """Device state: any JSON the device's set_state() accepts (it validates the meaning)."""


def _msr_index(v, path):
    try:
        ok = isinstance(v, str) and v.startswith("0x") and len(v) <= 10 and 0 <= int(v, 16) <= 0xFFFFFFFF
    except ValueError:
        ok = False
    if not ok:
        raise _bad(path, f"expected an MSR index like '0x10', got {_show(v)}")


def _show(v) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _scalar_option(v, path):
    """A device option value as --device, the control channel or a built device's config gives it.

    true/false are what an on/off switch becomes once parsed (intel-iommu's intremap, eim);
    registry.parse_option checks the value against the option's kind when the device is built.
    """
    if not isinstance(v, (str, int, float)) or (isinstance(v, str) and len(v) > MAX_TEXT):
        raise _bad(path, f"expected a device option value, got {_show(v)}")


def _label(max_len: int = MAX_TEXT):
    """A host path as the saving VM knew it: shown to people, never opened (printable, no control bytes)."""
    def check(v, path):
        if not isinstance(v, str) or len(v) > max_len or not v.isprintable():
            raise _bad(path, f"expected printable text of at most {max_len} characters, got {_show(v)}")
    return check


def _choice(*values):
    def check(v, path):
        if not _is_int(v) or v not in values:
            raise _bad(path, f"expected one of {', '.join(map(str, values))}, got {_show(v)}")
    return check


# MachineConfig fields a state file may carry (RUN_ONLY ones are given anew at restore)
CONFIG_SCHEMA = {
    "kernel": _label(), "kernel_name": _label(), "mem": _int(2 << 20, ADDR_LIMIT), "cpus": _int(1, 255),
    "cmdline": _str(), "initrd": _opt(_label()), "exit_port": _int(0, 0xFFFC),
    "irqchip": _enum("split", "full"), "trace_io": _bool, "strict_io": _bool,
    "flat_addr": _opt(_int(0, ADDR_LIMIT - 1)), "flat_bits": _choice(16, 32, 64),
    "restart_intensity": _int(0, 1 << 31), "restart_period": _num(0, 1e9),
    "on_device_failure": _enum("remove", "crash"), "device_deadline": _num(0, 3600),
    "trust": _enum(*TRUST_LEVELS),
    "devices": _list(_tuple(_str(64), _map(_str(64), _scalar_option, 64)), 64),
    "bus": _bool, "disks": _list(_tuple(_label(), _bool), 16),
    "numa": _opt(_any),              # memory.numa.NumaConfig.from_json checks every field when the VM is built
    "cpu": _str(1024), "display": _enum("none", "text"),
}
VCPU_SCHEMA = _obj({"regs": _hex("struct kvm_regs"), "sregs": _hex("struct kvm_sregs"),
                    "fpu": _hex("struct kvm_fpu"), "lapic": _hex("struct kvm_lapic_state"),
                    "events": _hex("struct kvm_vcpu_events"), "mp_state": _int(0, 0xFFFFFFFF),
                    "msrs": _map(_msr_index, _int(0, U64))},
                   {"index": _int(0, 254), "xcrs": _opt(_hex("struct kvm_xcrs"))})
_u63 = _int(0, (1 << 63) - 1)
HEADER_SCHEMA = _obj({
    "config": _obj({"kernel": CONFIG_SCHEMA["kernel"]}, {k: v for k, v in CONFIG_SCHEMA.items() if k != "kernel"}),
    "vcpus": _list(VCPU_SCHEMA, 255, 1),
    "memory": _obj({"regions": _list(_obj({"gpa": _int(0, ADDR_LIMIT), "size": _int(0, ADDR_LIMIT),
                                           "runs": _list(_tuple(_u63, _u63, _u63), 1 << 20)}), 64)},
                   {"size": _int(0, ADDR_LIMIT)}),
    "devices": _list(_obj({"name": _str(64), "class": _str(256), "windows": _list(_obj(
        {"name": _str(64), "gpa": _int(0, ADDR_LIMIT), "size": _int(0, ADDR_LIMIT),
         "mode": _enum(*memwindow.MODES), "payload": _tuple(_u63, _u63)}), 64), "state": _any},
        {"config": _opt(_map(_str(64), _scalar_option, 64)), "generation": _int(0, (1 << 31) - 1)}), 256),
}, {"clock": _opt(_int(0, U64)),
    "disks": _list(_obj({"size": _int(1, U64), "read_only": _bool}), 16),   # what `restore --disk` must match
    "policy": _opt(_map(_str(256), _int(0, U64))),
    "numa": _opt(_any),              # dynamic memory state: memory/dynamic.py set_state checks it
    "pykvm_version": _str(64), "created": _str(64)})


def validate_header(header) -> None:
    """Check every field of a state file's header for type and range; BadStateError names the first bad one."""
    HEADER_SCHEMA(header, "header")
    if header["config"].get("cpus", 1) != len(header["vcpus"]):
        raise _bad("header.config.cpus", f"{header['config'].get('cpus', 1)} vCPUs configured, "
                   f"{len(header['vcpus'])} saved")
    disks = header["config"].get("disks", [])
    if "disks" in header:
        facts = header["disks"]
        if len(facts) != len(disks) or any(f["read_only"] != d[1] for f, d in zip(facts, disks)):
            raise _bad("header.disks", "does not describe the disks of header.config.disks")


# ------------------------------------------------------------------ raw vCPU structs
def _raw(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


def _struct(ctype: str, data: bytes):
    obj = ffi.new(ctype + " *")
    if len(data) != ffi.sizeof(ctype):
        raise BadStateError(f"malformed state file: {ctype} of {len(data)} bytes, expected {ffi.sizeof(ctype)}")
    ffi.memmove(obj, data, len(data))
    return obj


def capture_vcpu_structs(vcpu, msr_indices) -> dict:
    """One paused vCPU's state as KVM structs (cdata) plus "mp_state" and "msrs" ({index: value});
    "xcrs" is None where KVM has none. The state file and the in-memory snapshot both build on this."""
    try:
        xcrs = vcpu.get_xcrs()
    except KvmError:
        xcrs = None
    return {
        "regs": vcpu.get_regs(),
        "sregs": vcpu.get_sregs(),
        "fpu": vcpu.get_fpu(),
        "xcrs": xcrs,
        "lapic": vcpu.get_lapic(),
        "events": vcpu.get_vcpu_events(),
        "mp_state": vcpu.get_mp_state(),
        "msrs": vcpu.get_msrs(msr_indices, skip_unreadable=True),
    }


def load_vcpu_structs(vcpu, st: dict) -> list[int]:
    """Load a vCPU from capture_vcpu_structs() data (the order follows QEMU's); returns MSRs KVM refused.

    Optional keys: "xsave" (a struct kvm_xsave, loaded instead of "fpu": it holds the same and more)
    and "msr_block" (Vcpu.msr_block() of "msrs" less the TSC deadline, which KVM took in full before).
    """
    vcpu.set_sregs(st["sregs"])
    vcpu.set_regs(st["regs"])
    if st.get("xcrs") is not None:
        vcpu.set_xcrs(st["xcrs"])
    if st.get("xsave") is not None:
        vcpu.set_xsave(st["xsave"])
    else:
        vcpu.set_fpu(st["fpu"])
    msrs = st["msrs"]
    deadline = msrs.get(MSR_TSC_DEADLINE)
    block = st.get("msr_block")
    if block is not None and vcpu.set_msr_block(block) == block.nmsrs:
        refused = []
    else:
        refused = vcpu.set_msrs({i: v for i, v in msrs.items() if i != MSR_TSC_DEADLINE}, skip_refused=True)
    vcpu.set_mp_state(int(st["mp_state"]))
    vcpu.set_lapic(st["lapic"])
    events = st["events"]
    events.flags |= EVENTS_VALID
    vcpu.set_vcpu_events(events)
    if deadline:  # after the LAPIC, whose timer mode it depends on (KVM_SET_LAPIC already disarmed it: 0 needs no write)
        refused += vcpu.set_msrs({MSR_TSC_DEADLINE: deadline}, skip_refused=True)
    return refused


_VCPU_STRUCTS = (("regs", "struct kvm_regs"), ("sregs", "struct kvm_sregs"), ("fpu", "struct kvm_fpu"),
                 ("lapic", "struct kvm_lapic_state"), ("events", "struct kvm_vcpu_events"))


def capture_vcpu(vcpu, msr_indices) -> dict:
    """One paused vCPU's state as JSON data."""
    st = capture_vcpu_structs(vcpu, msr_indices)
    out = {"index": vcpu.index}
    out.update((name, _raw(st[name]).hex()) for name, _ctype in _VCPU_STRUCTS)
    out["xcrs"] = _raw(st["xcrs"]).hex() if st["xcrs"] is not None else None
    out["mp_state"] = st["mp_state"]
    out["msrs"] = {f"{i:#x}": v for i, v in st["msrs"].items()}
    return out


def restore_vcpu(vcpu, st: dict) -> list[int]:
    """Load a vCPU from capture_vcpu() data; returns MSRs KVM refused."""
    h = bytes.fromhex
    structs = {name: _struct(ctype, h(st[name])) for name, ctype in _VCPU_STRUCTS}
    structs["xcrs"] = _struct("struct kvm_xcrs", h(st["xcrs"])) if st.get("xcrs") else None
    structs["mp_state"] = int(st["mp_state"])
    structs["msrs"] = {int(k, 16): int(v) for k, v in st["msrs"].items()}
    return load_vcpu_structs(vcpu, structs)


# ------------------------------------------------------------------ configuration
def config_to_json(cfg) -> dict:
    """The MachineConfig fields that describe the VM, as JSON data."""
    out = {}
    for f in record.fields(cfg):
        if f.name in RUN_ONLY:
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # not data (a callable, an object): belongs to the run
        out[f.name] = value
    return out


def config_from_json(data: dict, **run):
    """A MachineConfig from saved fields plus the run-only ones (`run`); unknown saved fields are ignored."""
    from ..machine.config import MachineConfig

    names = {f.name for f in record.fields(MachineConfig)}
    kwargs = {k: v for k, v in data.items() if k in names and k not in RUN_ONLY}
    for k in PATH_FIELDS:
        if kwargs.get(k) is not None and not isinstance(kwargs[k], str):
            raise BadStateError(f"malformed state file: config.{k} is not a path")
    if "kernel" not in kwargs:
        raise BadStateError("malformed state file: the machine configuration names no kernel")
    kwargs.update(run)
    try:
        return MachineConfig(**kwargs)
    except TypeError as e:
        raise BadStateError(f"malformed state file: machine configuration: {e}") from None


def _class_name(obj) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


# ------------------------------------------------------------------ saving
class SaveRefused(RuntimeError):
    """The VM cannot be saved right now (a device not in D0, the VM stopping, ...)."""


def restore_command(path, cfg) -> str:
    """The `pykvm restore` command that continues this VM: the state, its trust and its disks."""
    from ..paths import shell_word as quote

    words = ["pykvm", "restore", quote(str(path))]
    if cfg.trust != "untrusted":
        words += ["--trust", cfg.trust]
    for disk, read_only in cfg.disks:
        words += ["--disk", quote(f"{disk},ro" if read_only else str(disk))]
    return " ".join(words)


def _check_saveable(machine) -> None:
    if machine.outcome is not None or machine.stopping:
        raise SaveRefused("the VM is stopping; nothing to save")
    if machine.config.irqchip != "split":
        raise SaveRefused(f"cannot save a VM with --irqchip {machine.config.irqchip}: the in-kernel PIC/IOAPIC/PIT "
                          "state is not saved (use --irqchip split)")
    for dev in machine.devices.devices:
        if dev.state is not State.D0:
            raise SaveRefused(f"device {dev.name} is {dev.state.value}, not D0: saving needs every device "
                              "operational (power it up or wait for its recovery to finish)")
        busy = getattr(dev, "save_refusal", None)
        why = busy() if callable(busy) else None
        if why:  # a device with an operation in flight (its own thread) says so
            raise SaveRefused(f"device {dev.name}: {why}; try again when it is done")
    if machine.pending_images:
        raise SaveRefused("a restored device window has not been mapped yet; try again")


def capture(machine) -> tuple[dict, list]:
    """The header and payload pieces of a paused machine (pieces may be views of guest RAM)."""
    pieces: list = []
    try:
        return _capture(machine, pieces)
    except BaseException:
        _release(pieces)
        raise


def _capture(machine, pieces: list) -> tuple[dict, list]:
    pos = 0

    def add(data) -> int:
        nonlocal pos
        start = pos
        pieces.append(data)
        pos += len(data)
        return start

    msr_indices = machine.kvm.msr_index_list()
    vcpus = [capture_vcpu(v, msr_indices) for v in machine.vcpus]
    try:
        clock = machine.vm.get_clock().clock
    except KvmError:
        clock = None
    regions = []
    for r in machine.memory.regions:
        runs = []
        for off, length in nonzero_runs(r):
            runs.append([off, length, add(r.view[off:off + length])])
        regions.append({"gpa": r.gpa, "size": r.size, "runs": runs})
    devices = []
    for dev in machine.devices.devices:
        state = dev.get_state()
        try:
            json.dumps(state)
        except (TypeError, ValueError) as e:
            raise SaveRefused(f"device {dev.name}: get_state() is not JSON data: {e}") from None
        try:
            config = json.loads(json.dumps(dev.config))
        except (TypeError, ValueError):
            config = None
        windows = []
        for w in dev.windows:
            img = memwindow.image_bytes(w)
            windows.append({"name": w.name, "gpa": w.gpa, "size": w.size, "mode": w.mode,
                            "payload": [add(img), len(img)]})
        devices.append({"name": dev.name, "class": _class_name(dev), "config": config,
                        "generation": dev.generation, "state": state, "windows": windows})
    header = {
        "pykvm_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config_to_json(machine.config),
        "clock": clock,
        "vcpus": vcpus,
        "memory": {"size": machine.memory.size, "regions": regions},
        "devices": devices,
    }
    disks = _disks(machine)
    if disks:
        header["disks"] = [{"size": os.fstat(d.fd).st_size, "read_only": d.read_only} for d in disks]
    policy = getattr(machine, "policy", None)
    if policy is not None and hasattr(policy, "get_state"):
        header["policy"] = policy.get_state()   # shadow registers: guest-visible values the policy keeps
    numa = getattr(machine, "numa", None)
    if numa is not None and numa.dm is not None:
        header["numa"] = numa.dm.get_state()    # hot-added regions and ballooned ranges per node
    return header, pieces


def _disks(machine) -> list:
    """The block services' disks, in --disk order (their channels are offered in that order)."""
    bus = getattr(machine, "bus", None)
    if bus is None:
        return []
    return [ch.service.disk for _relid, ch in sorted(bus.channels.items())
            if getattr(ch.service, "disk", None) is not None and ch.service.disk.fd is not None]


def write_file(path, header: dict, pieces) -> int:
    """Write a state file atomically (temporary file, fsync, rename); returns its size.

    memoryview pieces (views of guest RAM) are released as soon as they are written, so no stray
    reference (a traceback, a sampled frame) can keep guest memory exported afterwards.
    """
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        # 0600 (guest RAM inside), and never through a name someone placed there first
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except BaseException:
        _release(pieces)
        raise
    try:
        with open(fd, "wb") as f:
            size = _write_to(f, header, pieces)
        os.replace(tmp, path)
    except BaseException:
        _release(pieces)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return size


def write_fd(fd: int, header: dict, pieces) -> int:
    """Write a state file into `fd` (a writable regular file someone else named, e.g. the ctl client); its size."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise SaveRefused("the descriptor passed with save is not a writable regular file")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        with open(fd, "wb", closefd=False) as f:
            return _write_to(f, header, pieces)
    except BaseException:
        _release(pieces)
        raise


def _write_to(f, header: dict, pieces) -> int:
    hdr = json.dumps(header, separators=(",", ":")).encode()
    payload_len = sum(len(p) for p in pieces)
    digest = hashlib.sha256()
    for chunk in (FIXED.pack(MAGIC, FORMAT_VERSION, len(hdr), payload_len), hdr):
        digest.update(chunk)
        f.write(chunk)
    for piece in pieces:
        digest.update(piece)
        f.write(piece)
        if isinstance(piece, memoryview):
            piece.release()
    f.write(digest.digest())
    f.flush()
    os.fsync(f.fileno())
    return FIXED.size + len(hdr) + payload_len + DIGEST


def _release(pieces) -> None:
    for piece in pieces:
        if isinstance(piece, memoryview):
            piece.release()


def save_vm(machine, path: str, stop: bool = False, fd: int | None = None) -> dict:
    """Pause every vCPU, write the VM's state to `path` (or into `fd`, which the caller named `path`);
    then resume, or end the VM when `stop` (a move).

    Runs on the machine's main thread (the `save` control command goes through Machine.call).
    """
    if not path and fd is None:
        raise SaveRefused("save needs path=FILE")
    parent = os.path.dirname(os.path.abspath(path))
    if fd is None and not os.path.isdir(parent):
        raise SaveRefused(f"cannot save to {path}: directory {parent} does not exist")
    _check_saveable(machine)
    if not machine.pause():
        machine.resume()
        raise SaveRefused("a vCPU did not stop in time; nothing saved")
    stopped = False
    try:
        with machine.devices.lock:   # no hot-plug or recovery may interleave with the snapshot
            _check_saveable(machine)
            machine.serial.flush()
            header, pieces = capture(machine)
            try:
                size = write_file(path, header, pieces) if fd is None else write_fd(fd, header, pieces)
            finally:
                _release(pieces)
                del pieces
        if stop:
            from ..machine.outcome import Outcome

            stopped = machine.finish(Outcome(0, "saved", f"VM saved to {path} and stopped "
                                              f"(continue it with: {restore_command(path, machine.config)})"))
    finally:
        if not stopped:
            machine.resume()
    return {"path": str(path), "fd": fd is not None, "bytes": size, "vcpus": len(header["vcpus"]),
            "ram_bytes": sum(r[1] for reg in header["memory"]["regions"] for r in reg["runs"]),
            "stopped": stopped}


# ------------------------------------------------------------------ loading
class SavedState:
    """A verified state file: the parsed header, and payload sections read on demand."""

    def __init__(self, path, header: dict, payload_at: int, payload_len: int):
        self.path = os.fspath(path)
        self.header = header
        self.payload_at = payload_at
        self.payload_len = payload_len
        self._f = open(self.path, "rb")

    def section(self, offset: int, length: int) -> bytes:
        """`length` payload bytes at `offset`, bounds-checked."""
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset
                and 0 <= length and offset + length <= self.payload_len):
            raise BadStateError(f"malformed state file: section {offset}+{length} lies outside the payload")
        self._f.seek(self.payload_at + offset)
        data = self._f.read(length)
        if len(data) != length:
            raise BadStateError("state file changed while being restored (short read)")
        return data

    def read_into(self, offset: int, view) -> None:
        """Fill a writable buffer from the payload at `offset`."""
        length = len(view)
        if not (isinstance(offset, int) and 0 <= offset and offset + length <= self.payload_len):
            raise BadStateError(f"malformed state file: section {offset}+{length} lies outside the payload")
        self._f.seek(self.payload_at + offset)
        if self._f.readinto(view) != length:
            raise BadStateError("state file changed while being restored (short read)")

    def apply(self, machine) -> None:
        """Put this state into a Machine built from machine_config() (vCPUs created, not run)."""
        apply_state(machine, self)

    def machine_config(self, disks=(), trust: str | None = None, **run):
        """The saved MachineConfig with this run's host resources: its disks, its trust, serial, timeout, crash dir.

        The file names no host file that is opened: each disk comes from `disks` ((path, read_only),
        in the saved order) and must match what the file recorded; the trust level is at most
        "untrusted" unless `trust` grants more. BadStateError (26) says what to pass otherwise.
        """
        data = dict(self.header.get("config") or {})
        data["disks"] = bind_disks(self.header, list(disks))
        data["trust"] = bind_trust(data.get("trust", "trusted"), trust)
        return config_from_json(data, **run)

    def close(self) -> None:
        self._f.close()


def load_state(path) -> SavedState:
    """Open and verify a state file: magic, format version, length, SHA-256, header; else BadStateError."""
    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
        f = open(path, "rb")
    except OSError as e:
        raise BadStateError(f"cannot read state file {path}: {e.strerror}") from None
    with f:
        fixed = f.read(FIXED.size)
        if len(fixed) < len(MAGIC) or fixed[:len(MAGIC)] != MAGIC:
            raise BadStateError(f"{path} is not a pykvm state file (wrong magic)")
        if len(fixed) < FIXED.size:
            raise BadStateError(f"{path}: state file truncated ({size} bytes)")
        _magic, version, hlen, plen = FIXED.unpack(fixed)
        if version != FORMAT_VERSION:
            raise BadStateError(f"{path}: state format version {version} is not supported "
                                f"(this pykvm {__version__} reads version {FORMAT_VERSION})")
        want = FIXED.size + hlen + plen + DIGEST
        if size < want:
            raise BadStateError(f"{path}: state file truncated ({size} bytes, its header says {want})")
        if size > want or hlen > MAX_HEADER:
            raise BadStateError(f"{path}: state file corrupt (length {size} does not match its header)")
        digest = hashlib.sha256(fixed)
        left = hlen + plen
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise BadStateError(f"{path}: state file truncated while reading")
            digest.update(chunk)
            left -= len(chunk)
        if f.read(DIGEST) != digest.digest():
            raise BadStateError(f"{path}: state file corrupt (SHA-256 checksum mismatch)")
        f.seek(FIXED.size)
        try:
            header = json.loads(f.read(hlen))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise BadStateError(f"{path}: malformed state header: {e}") from None
    try:
        validate_header(header)
    except BadStateError as e:
        raise BadStateError(f"{path}: {e}") from None
    return SavedState(path, header, FIXED.size + hlen, plen)


# ------------------------------------------------------------------ host resources at restore
def _mode(read_only: bool) -> str:
    return "read-only" if read_only else "read-write"


def _saved_disks(header: dict) -> list[tuple[str, bool, int | None]]:
    """(label, read_only, size or None) of each disk the saved VM had."""
    disks = header.get("config", {}).get("disks", [])
    facts = header.get("disks") or [None] * len(disks)
    return [(label, ro, f["size"] if f else None) for (label, ro), f in zip(disks, facts)]


def _disk_usage(saved: list) -> str:
    parts = []
    for label, ro, size in saved:
        what = f"{size} bytes, " if size is not None else ""
        parts.append(f"--disk FILE{',ro' if ro else ''} ({what}{_mode(ro)}; saved as {label})")
    return " ".join(parts)


def bind_disks(header: dict, given: list) -> list[tuple[str, bool]]:
    """The restore command's disks, checked against the saved VM's: count, order, read-only, size."""
    saved = _saved_disks(header)
    if len(given) != len(saved):
        if not saved:
            raise BadStateError(f"the saved VM had no disk; {len(given)} --disk given")
        raise BadStateError(f"the saved VM had {len(saved)} disk{'s' if len(saved) > 1 else ''}: pass "
                            f"{'them' if len(saved) > 1 else 'it'} in this order: {_disk_usage(saved)}")
    out = []
    for i, ((label, ro, size), (path, given_ro)) in enumerate(zip(saved, given)):
        shown = path if isinstance(path, str) and path.isprintable() else repr(path)
        where = f"--disk {shown} (disk {i}, saved as {label})"
        if bool(given_ro) != ro:
            raise BadStateError(f"{where}: the saved VM had it {_mode(ro)}; pass "
                                f"--disk {shown}{',ro' if ro else ''}")
        try:
            st = os.stat(path)
        except OSError as e:
            raise BadStateError(f"{where}: {e.strerror}") from None
        except ValueError as e:          # a NUL in the name
            raise BadStateError(f"{where}: {e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BadStateError(f"{where}: not a regular file")
        if size is not None and st.st_size != size:
            raise BadStateError(f"{where}: {st.st_size} bytes, the saved VM's disk had {size}; "
                                "pass the disk the VM was saved with")
        out.append((str(path), ro))
    return out


def bind_trust(saved: str, given: str | None) -> str:
    """The restored VM's trust level: the command line's, or the file's when it asks for no more than untrusted."""
    if given is not None:
        return given
    if saved != "untrusted":
        raise BadStateError(f"the saved VM ran with trust level {saved}; a state file cannot grant it: "
                            f"pass --trust {saved} (or --trust untrusted)")
    return saved


# ------------------------------------------------------------------ restoring
def _incompatible(msg: str) -> BadStateError:
    return BadStateError(f"incompatible state file: {msg}")


def apply_state(machine, saved: SavedState) -> None:
    """Load RAM, devices and vCPUs of a freshly built (not yet running) machine from `saved`."""
    try:
        _apply(machine, saved)
    except BadStateError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise BadStateError(f"malformed state file {saved.path}: {type(e).__name__}: {e}") from None
    except KvmError as e:
        raise BadStateError(f"cannot load the saved vCPU state into KVM: {e}") from None


def _apply(machine, saved: SavedState) -> None:
    h = saved.header
    _apply_numa(machine, h)
    # RAM: same layout, then the saved runs
    layout = [(r.gpa, r.size) for r in machine.memory.regions]
    saved_layout = [(int(r["gpa"]), int(r["size"])) for r in h["memory"]["regions"]]
    if layout != saved_layout:
        raise _incompatible(f"RAM layout {saved_layout} differs from this machine's {layout}")
    for region, rs in zip(machine.memory.regions, h["memory"]["regions"]):
        for off, length, at in rs["runs"]:
            if not (0 <= off and 0 < length and off + length <= region.size):
                raise BadStateError(f"malformed state file: RAM run {off:#x}+{length:#x} outside {region.name}")
            view = region.view[off:off + length]
            try:
                saved.read_into(at, view)
            finally:
                view.release()
    _apply_devices(machine, saved)
    policy = getattr(machine, "policy", None)
    if h.get("policy"):
        if policy is None or not hasattr(policy, "set_state"):
            raise _incompatible("the saved VM has access-policy shadow registers this pykvm cannot hold")
        policy.set_state(h["policy"])
    # vCPUs
    if len(h["vcpus"]) != len(machine.vcpus):
        raise _incompatible(f"{len(h['vcpus'])} vCPUs saved, this machine has {len(machine.vcpus)}")
    refused = set()
    for vcpu, st in zip(machine.vcpus, h["vcpus"]):
        refused.update(restore_vcpu(vcpu, st))
    if refused:
        import sys

        print(f"pykvm: warning: KVM refused to restore MSRs {', '.join(hex(i) for i in sorted(refused))}",
              file=sys.stderr)
    if h.get("clock") is not None:
        try:
            machine.vm.set_clock(int(h["clock"]))
        except KvmError:
            pass


def _apply_numa(machine, h: dict) -> None:
    """Re-plug hot-added regions and re-mark ballooned pages (before RAM is compared and loaded)."""
    numa = getattr(machine, "numa", None)
    if "numa" not in h:
        return
    if numa is None or numa.dm is None:
        raise _incompatible("the saved VM has vNUMA dynamic memory state but this machine has no nodes")
    try:
        numa.dm.set_state(h["numa"])
    except ValueError as e:
        raise BadStateError(f"malformed state file: vNUMA: {e}") from None


def _apply_devices(machine, saved: SavedState) -> None:
    from ..devices import registry

    dm = machine.devices
    saved_devs = saved.header["devices"]
    names = [d["name"] for d in saved_devs]
    if len(set(names)) != len(names):
        raise BadStateError("malformed state file: two devices share a name")
    built = {d.name: d for d in dm.devices}
    for sd in saved_devs:        # hot-added in the saved VM: add again, if it is a hot-pluggable type
        if sd["name"] in built:
            continue
        spec = sd["class"]
        kind = registry.by_class(spec)
        if kind is None or not kind.hotplug or not isinstance(sd.get("config"), dict):
            raise _incompatible(f"the saved VM has a device {sd['name']} ({spec}) this pykvm does not build "
                                f"(devices here: {', '.join(built)})")
        try:
            dev = kind.make(machine.device_context, _as_options(sd["config"]))
        except (registry.DeviceSpecError, ValueError) as e:
            raise BadStateError(f"malformed state file: device {sd['name']}: {e}") from None
        dm.add(dev)
        built[dev.name] = dev
    for name in [n for n in built if n not in names]:   # hot-removed in the saved VM
        dm.hot_remove(name)
        del built[name]
    for sd in saved_devs:
        dev = built[sd["name"]]
        if _class_name(dev) != sd["class"]:
            raise _incompatible(f"device {dev.name} is a {sd['class']} in the file, a {_class_name(dev)} here")
        have = [(w.name, w.gpa, w.size) for w in dev.windows]
        want = [(w["name"], int(w["gpa"]), int(w["size"])) for w in sd["windows"]]
        if have != want:
            raise _incompatible(f"device {dev.name}: window layout {_fmt_windows(want)} in the file, "
                                f"{_fmt_windows(have)} here")
        try:
            dev.set_state(sd["state"])
        except Exception as e:
            raise BadStateError(f"device {dev.name} refused its saved state: {e}") from None
        dev.generation = int(sd.get("generation", 0))
        for w, sw in zip(dev.windows, sd["windows"]):
            if sw["mode"] not in memwindow.MODES:
                raise BadStateError(f"malformed state file: window {dev.name}/{w.name} mode {sw['mode']!r}")
            w.mode = sw["mode"]
            at, length = sw["payload"]
            if length != w.size:
                raise BadStateError(f"malformed state file: window {dev.name}/{w.name} image of {length} bytes")
            machine.pending_images[(dev.name, w.name)] = saved.section(at, length)


def _as_options(config: dict) -> dict:
    """A built device's config as option values again: a parsed switch (true/false) back to on/off."""
    return {k: ("on" if v else "off") if isinstance(v, bool) else v for k, v in config.items()}


def _fmt_windows(ws) -> str:
    return "[" + ", ".join(f"{n}@{g:#x}+{s:#x}" for n, g, s in ws) + "]" if ws else "[]"
