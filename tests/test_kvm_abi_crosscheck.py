"""Cross-check pykvm's cffi declarations, ioctl numbers and constants against <linux/kvm.h>.

A C program is generated from what pykvm declares (every struct cffi knows about, every
field reached by walking the cffi types, every KVM* integer in ioctls.py and
constants.py), compiled with gcc and run; each value it prints must equal pykvm's.
Nothing declared can escape the check because the list comes from the ffi itself.
"""

import subprocess

import pytest

from pykvm.kvm import constants, ioctls
from pykvm.kvm.abi import ffi

from .conftest import IN_CI, require_tool



def _unavailable(reason):
    # Locally a missing toolchain is a skip; in CI it would silently hide ABI drift.
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the ABI cross-check must run)")
    pytest.skip(reason)


def _declared_structs():
    return sorted(ffi.list_types()[1])


def _walk(ctype, prefix=""):
    """Yield (dotted path, cffi field type) for every field, nested ones included."""
    for name, field in ctype.fields:
        path = prefix + name
        yield path, field.type
        if field.type.kind in ("struct", "union"):
            yield from _walk(field.type, path + ".")


def _is_open_array(t):
    return t.kind == "array" and t.length is None


def _values():
    """Every KVM* integer of ioctls.py and constants.py, by name (the C macros' names)."""
    out = {}
    for module in (ioctls, constants):
        for name, value in vars(module).items():
            if name.startswith("KVM") and isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
    return out


def _expected():
    """(kind, key) -> pykvm's value, and the C statements that print the kernel's value."""
    expected, lines = {}, []
    for sname in _declared_structs():
        ctype = f"struct {sname}"
        expected[("sizeof", sname)] = ffi.sizeof(ctype)
        lines.append(f'S({sname});')
        for path, ftype in _walk(ffi.typeof(ctype)):
            parts = path.split(".")
            expected[("offsetof", f"{sname}.{path}")] = ffi.offsetof(ctype, *parts)
            lines.append(f'O({sname}, {path});')
            if not _is_open_array(ftype):  # sizeof of a flexible array member is invalid C
                expected[("sizeof", f"{sname}.{path}")] = ffi.sizeof(ftype)
                lines.append(f'M({sname}, {path});')
    for name, value in sorted(_values().items()):
        expected[("value", name)] = value
        lines.append(f'#ifdef {name}\nV({name});\n#else\nprintf("missing {name}\\n");\n#endif')
    return expected, lines


PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
/* T is a struct tag: keys printed without spaces, "kvm_run.io.port" */
#define S(T) printf("sizeof %s %zu\n", #T, sizeof(struct T))
#define O(T, F) printf("offsetof %s.%s %zu\n", #T, #F, offsetof(struct T, F))
#define M(T, F) printf("sizeof %s.%s %zu\n", #T, #F, sizeof(((struct T *)0)->F))
#define V(N) printf("value %s %llu\n", #N, (unsigned long long)(N))
int main(void)
{
%s
    return 0;
}
"""


def _compile(tmp_path, name, source):
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(source)
    return subprocess.run(["gcc", "-std=gnu11", "-O0", "-o", str(exe), str(src)],
                          capture_output=True, text=True), exe


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory):
    """Compile and run the generated program; map (kind, key) -> the C value."""
    require_tool("gcc")
    tmp_path = tmp_path_factory.mktemp("kvm_abi")
    probe, _ = _compile(tmp_path, "probe", "#include <linux/kvm.h>\nint main(void){return 0;}\n")
    if probe.returncode != 0:
        _unavailable("<linux/kvm.h> not found (install linux-libc-dev): " + probe.stderr[-300:])
    _, lines = _expected()
    # Replace by hand: PROGRAM is full of printf '%' that str.format/% would trip on.
    source = PROGRAM.replace("%s\n    return", "\n".join(lines) + "\n    return", 1)
    build, exe = _compile(tmp_path, "kvm_abi", source)
    assert build.returncode == 0, f"generated C program failed to compile:\n{build.stderr[-3000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    values, missing = {}, []
    for line in run.stdout.splitlines():
        kind, key, *rest = line.split()
        if kind == "missing":
            missing.append(key)
        else:
            values[(kind, key)] = int(rest[0])
    return values, missing


def test_every_declaration_is_checked(kernel_values):
    values, missing = kernel_values
    expected, _ = _expected()
    assert not missing, f"macros pykvm defines but <linux/kvm.h> lacks: {missing}"
    assert set(values) == set(expected)
    # Sanity: the walk reached nested members of kvm_run, not only top-level fields.
    for key in ("io.port", "io.data_offset", "mmio.data", "internal.suberror",
                "fail_entry.hardware_entry_failure_reason", "system_event.type",
                "debug.arch.dr6", "emulation_failure.insn_bytes", "s.regs.sregs.efer"):
        assert ("offsetof", f"kvm_run.{key}") in expected


@pytest.mark.parametrize("kind", ["sizeof", "offsetof", "value"])
def test_matches_kernel_headers(kernel_values, kind):
    values, _ = kernel_values
    expected, _ = _expected()
    wrong = [f"{key}: pykvm {want} != C {values.get((k, key))}"
             for (k, key), want in sorted(expected.items())
             if k == kind and values.get((k, key)) != want]
    assert not wrong, f"{len(wrong)} {kind} mismatches:\n" + "\n".join(wrong)
