"""The CPU model a guest sees: `--cpu host[,+feat,-feat...]` as QEMU users write it, applied to CPUID.

Feature names are the ones QEMU's `-cpu help` and Linux's /proc/cpuinfo print (`x2apic`,
`cx16`, `xsave`, `pdpe1gb`, `sse4.1` or `sse4_1`, `lahf_lm`, ...): '_' and '.' are read as
'-'. Hiding a feature also hides the ones that cannot work without it (no AVX without
XSAVE), as QEMU's dependency table does. Asking for a feature this host's KVM cannot give
is an error rather than a silent drop: a user asking for it wants to know.
"""

from __future__ import annotations

from ..errors import UsageError
from ..kvm.constants import cpuid_entry
from ..record import field, record

# name -> (leaf, subleaf, register, bit). Only leaves whose bits are plain feature flags.
FEATURES: dict[str, tuple[int, int, str, int]] = {}


def _bits(leaf: int, subleaf: int, reg: str, names: dict[int, str]) -> None:
    for bit, name in names.items():
        FEATURES[name] = (leaf, subleaf, reg, bit)


_bits(1, 0, "edx", {0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce", 8: "cx8",
                    9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat", 17: "pse36",
                    19: "clflush", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2", 27: "ss", 28: "ht"})
_bits(1, 0, "ecx", {0: "sse3", 1: "pclmulqdq", 3: "monitor", 5: "vmx", 9: "ssse3", 12: "fma", 13: "cx16",
                    15: "pdcm", 17: "pcid", 19: "sse4-1", 20: "sse4-2", 21: "x2apic", 22: "movbe", 23: "popcnt",
                    24: "tsc-deadline", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c", 30: "rdrand",
                    31: "hypervisor"})
_bits(7, 0, "ebx", {0: "fsgsbase", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep", 8: "bmi2", 9: "erms",
                    10: "invpcid", 11: "rtm", 16: "avx512f", 17: "avx512dq", 18: "rdseed", 19: "adx",
                    20: "smap", 21: "avx512ifma", 23: "clflushopt", 24: "clwb", 26: "avx512pf",
                    27: "avx512er", 28: "avx512cd", 29: "sha-ni", 30: "avx512bw", 31: "avx512vl"})
_bits(7, 0, "ecx", {1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 6: "avx512vbmi2", 8: "gfni",
                    9: "vaes", 10: "vpclmulqdq", 11: "avx512vnni", 12: "avx512bitalg", 14: "avx512-vpopcntdq",
                    16: "la57", 22: "rdpid"})
_bits(7, 0, "edx", {4: "fsrm", 10: "md-clear", 26: "spec-ctrl", 27: "stibp", 29: "arch-capabilities",
                    31: "ssbd"})
_bits(0xD, 1, "eax", {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"})
_bits(0x80000001, 0, "ecx", {0: "lahf-lm", 1: "cmp-legacy", 2: "svm", 4: "cr8legacy", 5: "abm", 6: "sse4a",
                             7: "misalignsse", 8: "3dnowprefetch", 11: "xop", 16: "fma4", 21: "tbm",
                             22: "topoext"})
_bits(0x80000001, 0, "edx", {11: "syscall", 20: "nx", 22: "mmxext", 25: "fxsr-opt", 26: "pdpe1gb",
                             27: "rdtscp", 29: "lm"})

ALIASES = {"pni": "sse3", "lahf": "lahf-lm", "xd": "nx", "i64": "lm", "sse4.1": "sse4-1", "sse4.2": "sse4-2",
           "cmpxchg16b": "cx16", "tsc-deadline-timer": "tsc-deadline", "sha": "sha-ni"}

_AVX512 = ("avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl",
           "avx512vbmi", "avx512vbmi2", "avx512vnni", "avx512bitalg", "avx512-vpopcntdq")
# Hiding the key hides these too: they need its state or instructions.
DEPENDENTS = {
    "xsave": ("avx", "avx2", "fma", "f16c", "xsaveopt", "xsavec", "xgetbv1", "xsaves", "pku", "vaes",
              "vpclmulqdq", "gfni") + _AVX512,
    "avx": ("avx2", "fma", "f16c", "vaes", "vpclmulqdq") + _AVX512,
    "avx512f": _AVX512[1:],
    "apic": ("x2apic", "tsc-deadline"),
    "fxsr": ("sse", "sse2", "sse3", "ssse3", "sse4-1", "sse4-2"),
    "lm": ("pdpe1gb", "la57"),
}



def canonical(name: str) -> str:
    """A feature name as FEATURES spells it (lower case, '-' for '_' and '.'), aliases resolved."""
    n = name.strip().lower()
    if n in ALIASES:
        return ALIASES[n]
    n = n.replace("_", "-").replace(".", "-")
    return ALIASES.get(n, n)


@record(frozen=True)
class CpuModel:
    """A base model ("host") and the features added or removed on top of it."""

    base: str = "host"
    add: frozenset[str] = field(default_factory=frozenset)
    remove: frozenset[str] = field(default_factory=frozenset)

    @property
    def text(self) -> str:
        """The model as a --cpu argument."""
        return ",".join([self.base] + [f"+{f}" for f in sorted(self.add)] + [f"-{f}" for f in sorted(self.remove)])

    def hidden(self) -> frozenset[str]:
        """Every feature the guest must not see: the removed ones and what depends on them."""
        out = set()
        todo = list(self.remove)
        while todo:
            f = todo.pop()
            if f in out:
                continue
            out.add(f)
            todo.extend(DEPENDENTS.get(f, ()))
        return frozenset(out)


def parse_cpu(text: str) -> CpuModel:
    """`host[,+feat|-feat|feat=on|feat=off...]` as a CpuModel; UsageError (status 2) naming a bad part."""
    if not isinstance(text, str) or len(text) > 4096:
        raise UsageError("--cpu: expected host[,+feature,-feature...]")
    base, *parts = [p.strip() for p in text.split(",")]
    if base != "host":
        raise UsageError(f"--cpu {base!r}: the only CPU model is 'host' (then +feature / -feature toggles)")
    add, remove = set(), set()
    for part in parts:
        if part.startswith(("+", "-")):
            on, raw = part[0] == "+", part[1:]
        elif part.endswith(("=on", "=off")):
            raw, _, val = part.rpartition("=")
            on = val == "on"
        else:
            raise UsageError(f"--cpu: {part!r}: expected +feature, -feature or feature=on|off")
        name = canonical(raw)
        if name not in FEATURES:
            raise UsageError(f"--cpu: unknown CPU feature {raw!r} (known: {', '.join(sorted(FEATURES))})")
        (add if on else remove).add(name)
        (remove if on else add).discard(name)
    return CpuModel("host", frozenset(add), frozenset(remove))


def check_available(model: CpuModel, entries) -> None:
    """UsageError when the model asks (+feat) for a feature the host's KVM does not offer."""
    for name in sorted(model.add):
        leaf, sub, reg, bit = FEATURES[name]
        e = cpuid_entry(entries, leaf, sub)
        if e is None or not getattr(e, reg) >> bit & 1:
            raise UsageError(f"--cpu: +{name}: this host's KVM does not offer {name}")


def apply_model(model: CpuModel, entries) -> None:
    """Clear the hidden features' bits in KVM cpuid entries (edited in place)."""
    for name in model.hidden():
        leaf, sub, reg, bit = FEATURES[name]
        e = cpuid_entry(entries, leaf, sub)
        if e is not None:
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))
    if "xsave" in model.hidden():
        # Without XSAVE the state-component leaf must not describe any XSAVE area.
        for e in entries:
            if e.function == 0xD:
                e.eax = e.ebx = e.ecx = e.edx = 0


def has(model: CpuModel, entries, name: str) -> bool:
    """Whether the guest sees feature `name` under this model."""
    name = canonical(name)
    if name in model.hidden():
        return False
    leaf, sub, reg, bit = FEATURES[name]
    e = cpuid_entry(entries, leaf, sub)
    return e is not None and bool(getattr(e, reg) >> bit & 1)
