"""Declarative device descriptions: one TOML file per device model, read with tomllib and validated strictly.

A description names the device (its `Device.name`), lists its registers and says, per trust level,
what a guest's access to each register gets. The schema (every key is required unless marked):

    name = "serial"                      # the Device.name it describes
    summary = "16550A UART (COM1)"
    [[registers]]
    name = "rbr_thr_dll"                 # unique within the file: letters, digits, _ . -
    space = "port"                       # "port" or "mmio"
    offset = 0                           # from the base of each range of that space, in bytes
    width = 1                            # 1, 2, 4 (or 8: mmio only) bytes
    access = "rw"                        # "r", "w" or "rw"
    scope = "local"                      # "local" (this device only) or "system" (reset, interrupt routing,
                                         #  DMA addresses, decode enables, anything beyond this device)
    trusted = { action = "allow" }
    untrusted = { action = "deny", read_value = 0xff }   # read_value optional: default all ones
    count = 16                           # optional: an array of `count` registers `width` bytes apart,
                                         #  named name.0 .. name.N-1 (RAM-like windows, tables)

Actions: allow; deny (reads return read_value, writes are dropped); translate with exactly one of
`mask = M` (writes reach the device as value & M), `clamp = [lo, hi]` (writes are clamped into
[lo, hi]) or `shadow = true` (writes land in a shadow copy the guest reads back; the device never
sees them). Translations act on writes, so they need a writable register; reads of mask/clamp
registers reach the device, reads of a shadowed register return the shadow.

Rules checked at load: no unknown keys, types and ranges of every value, unique names, no two
registers of one space overlapping, values that fit the register width, and a system-scope register
is never plainly allowed to an untrusted guest. `check_ranges` checks a description against a model
instance: every register must lie inside each of the device's ranges of its space.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping

from ..startup import digest, generated
from ..errors import DeviceConfigError
from .. import paths
from ..paths import clean
from ..record import record

TRUST_LEVELS = ("trusted", "untrusted")
SPACES = ("port", "mmio")
ACCESSES = ("r", "w", "rw")
SCOPES = ("local", "system")
ACTIONS = ("allow", "deny", "translate")
WIDTHS = {"port": (1, 2, 4), "mmio": (1, 2, 4, 8)}
TOP_KEYS = ("name", "summary", "registers")
REGISTER_KEYS = ("name", "space", "offset", "width", "access", "scope", *TRUST_LEVELS)
OPTIONAL_REGISTER_KEYS = ("count",)
MAX_COUNT = 0x2000           # elements of one register array (a 64 KiB window of 8-byte registers)
ACTION_KEYS = {"allow": ("action",), "deny": ("action", "read_value"),
               "translate": ("action", "mask", "clamp", "shadow")}
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
HERE = os.path.dirname(os.path.realpath(__file__))


class DescriptionError(DeviceConfigError):
    """A device description that is malformed, or that does not match its device model."""


@record(frozen=True)
class Action:
    """What one trust level gets for one register."""

    action: str                           # "allow", "deny" or "translate"
    read_value: int | None = None         # deny: what reads return (None: all ones)
    mask: int | None = None               # translate: value & mask reaches the device
    clamp: tuple[int, int] | None = None  # translate: value clamped into [lo, hi]
    shadow: bool = False                  # translate: writes go to a shadow copy

    @property
    def kind(self) -> str:
        """allow, deny, mask, clamp or shadow."""
        if self.action != "translate":
            return self.action
        return "mask" if self.mask is not None else "clamp" if self.clamp is not None else "shadow"

    def text(self) -> str:
        """Short human form: `allow`, `deny (reads 0xff)`, `translate mask 0x1`, ..."""
        if self.action == "deny":
            return "deny" if self.read_value is None else f"deny (reads {self.read_value:#x})"
        if self.action == "allow":
            return "allow"
        if self.mask is not None:
            return f"translate mask {self.mask:#x}"
        if self.clamp is not None:
            return f"translate clamp [{self.clamp[0]:#x}, {self.clamp[1]:#x}]"
        return "translate shadow"


@record(frozen=True)
class Register:
    """One register of a device, with what each trust level may do to it."""

    name: str
    space: str
    offset: int
    width: int
    access: str
    scope: str
    trusted: Action
    untrusted: Action

    @property
    def end(self) -> int:
        return self.offset + self.width

    def action(self, trust: str) -> Action:
        return self.trusted if trust == "trusted" else self.untrusted


@record(frozen=True)
class Description:
    """A device's declared registers; `path` names the file for messages."""

    name: str
    summary: str
    registers: tuple[Register, ...]
    path: str = "<description>"

    def in_space(self, space: str) -> list[Register]:
        return [r for r in self.registers if r.space == space]

    def check_ranges(self, dev) -> None:
        """Raise DescriptionError unless every register lies inside each of `dev`'s ranges of its space."""
        ranges = {"port": list(dev.ports), "mmio": list(dev.mmio)}
        for r in self.registers:
            have = ranges[r.space]
            if not have:
                raise DescriptionError(f"{self.path}: register {r.name!r} is in {r.space} space, but device "
                                       f"{dev.name} decodes no {'I/O ports' if r.space == 'port' else 'MMIO'}")
            for base, length in have:
                if r.end > length:
                    kind = "I/O ports" if r.space == "port" else "MMIO"
                    raise DescriptionError(
                        f"{self.path}: register {r.name!r} (offset {r.offset:#x}, width {r.width}) lies outside "
                        f"device {dev.name}'s {kind} {base:#x}+{length:#x}")

    def render(self) -> str:
        """The description as a table, for `pykvm devices --describe`."""
        rows = [("register", "space", "offset", "width", "access", "scope", *TRUST_LEVELS)]
        for r in sorted(self.registers, key=lambda r: (r.space, r.offset)):
            rows.append((r.name, r.space, f"{r.offset:#x}", str(r.width), r.access, r.scope,
                         r.trusted.text(), r.untrusted.text()))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"{self.name}: {self.summary}", f"  from {self.path}"]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ parsing
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unknown(where: str, table: dict, allowed) -> None:
    extra = [k for k in table if k not in allowed]
    if extra:
        raise DescriptionError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} "
                               f"{', '.join(repr(k) for k in extra)} (allowed: {', '.join(allowed)})")


def _parse_action(where: str, level: str, raw, width: int, access: str) -> Action:
    where = f"{where}: {level}"
    if not isinstance(raw, dict):
        raise DescriptionError(f"{where}: expected a table like {{ action = \"allow\" }}, got {raw!r}")
    act = raw.get("action")
    if act not in ACTIONS:
        raise DescriptionError(f"{where}: action {act!r} is not one of {', '.join(ACTIONS)}")
    _unknown(where, raw, ACTION_KEYS[act])
    top = (1 << (8 * width)) - 1

    def fits(key, v):
        if not _is_int(v) or not 0 <= v <= top:
            raise DescriptionError(f"{where}: {key} {v!r} must be an integer in 0..{top:#x} (width {width})")
        return v

    if act == "allow":
        return Action("allow")
    if act == "deny":
        rv = raw.get("read_value")
        if rv is not None:
            if "r" not in access:
                raise DescriptionError(f"{where}: read_value on a write-only register (reads of it are "
                                       "refused as a wrong-direction access anyway)")
            fits("read_value", rv)
        return Action("deny", read_value=rv)
    present = [k for k in ("mask", "clamp", "shadow") if k in raw]
    if len(present) != 1:
        raise DescriptionError(f"{where}: translate needs exactly one of mask, clamp, shadow "
                               f"(got {', '.join(present) or 'none'})")
    if "w" not in access:
        raise DescriptionError(f"{where}: translate acts on writes, but the register is read-only")
    if "mask" in raw:
        return Action("translate", mask=fits("mask", raw["mask"]))
    if "clamp" in raw:
        c = raw["clamp"]
        if not isinstance(c, list) or len(c) != 2:
            raise DescriptionError(f"{where}: clamp must be [lo, hi], got {c!r}")
        lo, hi = fits("clamp lo", c[0]), fits("clamp hi", c[1])
        if lo > hi:
            raise DescriptionError(f"{where}: clamp [{lo:#x}, {hi:#x}] has lo > hi")
        return Action("translate", clamp=(lo, hi))
    if raw["shadow"] is not True:
        raise DescriptionError(f"{where}: shadow must be true, got {raw['shadow']!r}")
    return Action("translate", shadow=True)


def _parse_registers(path: str, i: int, raw) -> list[Register]:
    """One [[registers]] table as its register, or as `count` registers when it is an array."""
    is_array = isinstance(raw, dict) and "count" in raw
    count = raw.pop("count") if is_array else 1
    reg = _parse_register(path, i, raw)
    if not is_array:
        return [reg]
    if not _is_int(count) or not 1 <= count <= MAX_COUNT:
        raise DescriptionError(f"{path}: register {reg.name!r}: count {count!r} must be an integer in 1..{MAX_COUNT}")
    return [Register(f"{reg.name}.{k}", reg.space, reg.offset + k * reg.width, reg.width, reg.access, reg.scope,
                     reg.trusted, reg.untrusted) for k in range(count)]


def is_register_name(name) -> bool:
    """Whether name is a register name: one or more letters, digits, '_', '.' or '-' (ASCII), nothing else."""
    # A set test, not a regex: `re` is ~1.4 ms of every `pykvm run`, which checks descriptions.
    return isinstance(name, str) and name != "" and _NAME_CHARS.issuperset(name)


def _parse_register(path: str, i: int, raw) -> Register:
    label = raw.get("name") if isinstance(raw, dict) else None
    where = f"{path}: register {label!r}" if isinstance(label, str) else f"{path}: register #{i + 1}"
    if not isinstance(raw, dict):
        raise DescriptionError(f"{where}: expected a [[registers]] table")
    _unknown(where, raw, REGISTER_KEYS)
    missing = [k for k in REGISTER_KEYS if k not in raw]
    if missing:
        raise DescriptionError(f"{where}: missing {', '.join(missing)}")
    name = raw["name"]
    if not is_register_name(name):
        raise DescriptionError(f"{where}: name must be letters, digits, '_', '.' or '-'")
    space = raw["space"]
    if space not in SPACES:
        raise DescriptionError(f"{where}: space {space!r} is not one of {', '.join(SPACES)}")
    offset, width = raw["offset"], raw["width"]
    if not _is_int(offset) or offset < 0:
        raise DescriptionError(f"{where}: offset {offset!r} must be a non-negative integer")
    if not _is_int(width) or width not in WIDTHS[space]:
        raise DescriptionError(f"{where}: width {width!r} must be one of "
                               f"{', '.join(map(str, WIDTHS[space]))} for {space} registers")
    access, scope = raw["access"], raw["scope"]
    if access not in ACCESSES:
        raise DescriptionError(f"{where}: access {access!r} is not one of {', '.join(ACCESSES)}")
    if scope not in SCOPES:
        raise DescriptionError(f"{where}: scope {scope!r} is not one of {', '.join(SCOPES)}")
    trusted = _parse_action(where, "trusted", raw["trusted"], width, access)
    untrusted = _parse_action(where, "untrusted", raw["untrusted"], width, access)
    if scope == "system" and untrusted.action == "allow":
        raise DescriptionError(f"{where}: a system-scope register must be denied or translated for "
                               "untrusted guests, not allowed")
    return Register(name, space, offset, width, access, scope, trusted, untrusted)


def parse(text: str, path: str = "<description>") -> Description:
    """A Description from TOML text; DescriptionError (naming `path` and the register) when invalid."""
    import tomllib   # only for descriptions not shipped as data (a user's file, a source tree's first run)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DescriptionError(f"{path}: not valid TOML: {e}") from None
    return from_data(data, path)


def from_data(data: dict, path: str = "<description>") -> Description:
    """A Description from a TOML document's data (as tomllib gives it); DescriptionError when invalid."""
    _unknown(path, data, TOP_KEYS)
    name, summary, regs = data.get("name"), data.get("summary"), data.get("registers")
    if not isinstance(name, str) or not name:
        raise DescriptionError(f"{path}: `name` (the Device.name described) must be a non-empty string")
    if not isinstance(summary, str):
        raise DescriptionError(f"{path}: `summary` must be a string")
    if not isinstance(regs, list) or not regs:
        raise DescriptionError(f"{path}: no [[registers]]: a description lists at least one register")
    registers = [reg for i, r in enumerate(regs)
                 for reg in _parse_registers(path, i, dict(r) if isinstance(r, dict) else r)]
    seen: dict[str, Register] = {}
    for r in registers:
        if r.name in seen:
            raise DescriptionError(f"{path}: register {r.name!r} is defined twice")
        seen[r.name] = r
    for space in SPACES:
        ordered = sorted((r for r in registers if r.space == space), key=lambda r: r.offset)
        for a, b in zip(ordered, ordered[1:]):
            if b.offset < a.end:
                raise DescriptionError(f"{path}: register {b.name!r} ({space} {b.offset:#x}+{b.width}) overlaps "
                                       f"register {a.name!r} ({space} {a.offset:#x}+{a.width})")
    return Description(name, summary, tuple(registers), path)


def load(path) -> Description:
    """Read and validate one description file."""
    path = clean(path)
    try:
        text = _read(path).decode("utf-8")
    except OSError as e:
        raise DescriptionError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DescriptionError(f"{path}: not UTF-8: {e}") from None
    return parse(text, _display(path))


def _display(path: str, resolved: bool = False) -> str:
    """The path relative to the tree (or installed package) root when under it, else as given."""
    full = path if resolved else os.path.realpath(path)
    root = os.path.dirname(os.path.dirname(HERE))
    if full.startswith(root + os.sep):
        return full[len(root) + 1:]
    return path


def _read(path: str) -> bytes:
    """A whole file's bytes."""
    with open(path, "rb") as f:
        return f.read()


def load_dir(directory) -> dict[str, Description]:
    """Every *.toml description in `directory`, by device name (two files for one name is an error)."""
    out: dict[str, Description] = {}
    directory = os.fspath(directory)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".toml"):
            continue
        d = load(os.path.join(directory, name))
        if d.name in out:
            raise DescriptionError(f"{d.path}: describes device {d.name!r}, already described by {out[d.name].path}")
        out[d.name] = d
    return out


GENERATED = "_pykvm_descriptions"   # the module holding the shipped descriptions as Python data
_DATA_TYPES = (str, int, bool, list, dict)


def _source_digest(raw: dict[str, bytes]) -> str:
    """Digest of every shipped file's name and bytes: what a generated module was made from."""
    h = digest.new()
    for stem in sorted(raw):
        h.update(f"{stem}\0{len(raw[stem])}\0".encode() + raw[stem])
    return h.hexdigest()


def _plain(value) -> bool:
    """Whether repr(value) is a Python literal that evaluates back to it (TOML dates and floats are not needed)."""
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if type(value) is list:
        return all(_plain(v) for v in value)
    return type(value) in _DATA_TYPES


def documents(raw: dict[str, bytes]) -> dict[str, dict]:
    """Every description file (stem -> bytes) as tomllib reads it; ValueError for one that is not UTF-8 TOML of plain data."""
    import tomllib

    data = {}
    for stem in sorted(raw):
        try:
            doc = tomllib.loads(raw[stem].decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{stem}.toml: {e}") from None
        if not _plain(doc):
            raise ValueError(f"{stem}.toml: holds a value other than strings, integers, booleans, arrays and tables")
        data[stem] = doc
    return data


def module_text(raw: dict[str, bytes], data: dict[str, dict]) -> str:
    """The generated module holding the documents (documents(raw)) of these description files."""
    return (f'"""The shipped device descriptions (pykvm/devices/*.toml) as data, generated by '
            f'pykvm.devices.description.module_text: do not edit."""\n\nSOURCE = {_source_digest(raw)!r}\n'
            f"DATA = {data!r}\n")


def read_files(directory: str) -> dict[str, bytes | OSError]:
    """stem -> bytes (or the OSError) of every *.toml file in directory."""
    # plain os calls, one path resolution for the directory rather than one per file:
    # a third of the cost of pathlib's glob, read_bytes and resolve
    out: dict[str, bytes | OSError] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".toml"):
            try:
                out[name[:-5]] = _read(os.path.join(directory, name))
            except OSError as e:
                out[name[:-5]] = e
    return out


def write_generated(outdir: str) -> str:
    """Validate every shipped description and write their generated module into outdir (setup.py); its path."""
    raw = read_files(HERE)
    for stem, data in raw.items():
        if isinstance(data, OSError):
            raise DescriptionError(f"{stem}.toml: cannot read: {data.strerror}")
    try:
        docs = documents(raw)
    except ValueError as e:
        raise DescriptionError(str(e)) from None
    for stem, doc in docs.items():       # a wheel never ships a description a run would refuse
        d = from_data(doc, f"pykvm/devices/{stem}.toml")
        if d.name != stem:
            raise DescriptionError(f"{d.path}: describes device {d.name!r}; a shipped description is named "
                                   f"for its file ({stem}.toml)")
    path = os.path.join(outdir, f"{GENERATED}.py")
    with open(path, "w") as f:
        f.write(module_text(raw, docs))
    return path


class _Shipped(Mapping):
    """Shipped descriptions by device name (the file's stem), each validated on first use.

    A VM has a few of the twenty-odd devices described; parsing them all cost ~20 ms of every
    `pykvm run`. They come as Python data generated from the TOML files (module_text), so a
    run imports no tomllib and reads no file: an installed package ships that module; a source
    tree reads the files (while it still may: the sandbox refuses opens once the VM runs),
    uses its build/generated module when it was made from exactly these files, and otherwise
    makes it. Never from the cache: these decide what untrusted guests may touch.
    """

    def __init__(self, directory: str):
        self._dir = os.path.realpath(directory)
        self._raw: dict[str, bytes | OSError] = {}
        self._data = self._installed_data()
        if self._data is None:
            self._raw = read_files(self._dir)
            self._data = self._tree_data()
        self._parsed: dict[str, Description] = {}

    def _installed_data(self) -> dict | None:
        if not paths.INSTALLED or self._dir != HERE:
            return None
        path = generated.find("", GENERATED)
        return None if path is None else generated.load(GENERATED, path).DATA

    def _tree_data(self) -> dict | None:
        """The generated data for exactly the files read, made now if needed; None if they cannot all be data."""
        if self._dir != HERE or any(isinstance(v, OSError) for v in self._raw.values()):
            return None
        want = _source_digest(self._raw)
        path = generated.find("", GENERATED)
        if path is not None:
            mod = generated.load(GENERATED, path)
            if getattr(mod, "SOURCE", None) == want:
                return mod.DATA
            del sys.modules[GENERATED]    # made from other files: replaced below
        try:
            data = documents(self._raw)
        except ValueError:
            return None                   # a broken file: each is parsed (and reported) on use
        try:
            generated.write("", GENERATED, module_text(self._raw, data))
        except OSError:
            pass                          # a read-only tree: parsed again next run
        return data

    def __getitem__(self, name: str) -> Description:
        d = self._parsed.get(name)
        if d is None:
            path = os.path.join(self._dir, f"{name}.toml")
            if self._data is not None:
                if name not in self._data:
                    raise KeyError(name)
                d = from_data(self._data[name], _display(path, resolved=True))
            else:
                data = self._raw[name]
                if isinstance(data, OSError):
                    raise DescriptionError(f"{path}: cannot read: {data.strerror}")
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DescriptionError(f"{path}: not UTF-8: {e}") from None
                d = parse(text, _display(path, resolved=True))
            if d.name != name:
                raise DescriptionError(f"{d.path}: describes device {d.name!r}; a shipped description is named "
                                       f"for its file ({name}.toml)")
            self._parsed[name] = d
        return d

    def __iter__(self):
        return iter(self._data if self._data is not None else self._raw)

    def __len__(self) -> int:
        return len(self._data if self._data is not None else self._raw)

    def __contains__(self, name) -> bool:
        return name in (self._data if self._data is not None else self._raw)


@functools.lru_cache(maxsize=1)
def shipped() -> Mapping[str, Description]:
    """The descriptions shipped next to the device models (pykvm/devices/*.toml), by name, parsed on use."""
    return _Shipped(HERE)


def for_device(dev, descriptions: dict[str, Description] | None = None) -> Description | None:
    """The description of `dev`: by its instance name, else by its model's class-level name."""
    table = shipped() if descriptions is None else descriptions
    d = table.get(dev.name)
    if d is None:
        d = table.get(getattr(type(dev), "name", None))
    return d
