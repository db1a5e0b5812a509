"""pykvm.api.VM: serial expect/send, memory by physical and virtual address, pause, dump, save/restore."""

from __future__ import annotations

import re
import struct
import time
import subprocess
import sys

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given
from hypothesis import strategies as st

from pykvm import errors
from pykvm.api import EOF, VM, SerialLog, Timeout, VMError, _compile, disk_spec

from .conftest import require_tool
from .helpers import ROOT


def symbol(path, name: str) -> int:
    with open(path, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


# ------------------------------------------------------------------ no KVM needed
def test_import_pykvm_does_not_load_the_api():
    code = "import sys, pykvm; assert 'pykvm.api' not in sys.modules; pykvm.VM; assert 'pykvm.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_patterns_literal_regex_and_str_regex():
    assert _compile(b"a.b").search(b"axb") is None and _compile("a.b").search(b"a.b")
    assert _compile(re.compile(rb"x(\d+)")).search(b"x42").group(1) == b"42"
    assert _compile(re.compile(r"ram=(\d+)M")).search(b"ram=64M").group(1) == b"64"
    with pytest.raises(TypeError):
        _compile(42)
    with pytest.raises(ValueError):
        _compile(b"")


chunks = st.lists(st.binary(max_size=64), max_size=40)


@given(chunks, st.binary(min_size=1, max_size=4))
def test_serial_log_finds_each_occurrence_across_chunk_boundaries(parts, needle):
    log = SerialLog()
    for p in parts:
        log.feed(p)
    log.close()
    whole = b"".join(parts)
    found, at = 0, 0
    while True:
        i, m, data = log.find([_compile(needle)], 0)
        if m is None:
            break
        assert data == whole[at:] and m.start() == data.find(needle)
        at += m.end()
        found += 1
    assert found == len(whole.split(needle)) - 1
    assert log.text() == whole


@given(st.lists(st.binary(max_size=3000), max_size=20))
def test_serial_log_stays_within_its_limit(parts):
    log = SerialLog(limit=4096)
    for p in parts:
        log.feed(p)
    whole = b"".join(parts)
    assert log.text() == whole[-4096:] and len(log.pending) <= 4096
    with pytest.raises(TimeoutError):
        log.find([_compile(b"\xff" * 5000)], 0)


def test_disk_specs():
    assert disk_spec("a.img,ro") == ("a.img", True)
    assert disk_spec("a.img,rw") == ("a.img", False)
    assert disk_spec("a,b.img") == ("a,b.img", False)
    assert disk_spec(("x", 1)) == ("x", True)


@pytest.mark.parametrize("kwargs, exc, status", [
    ({"trust": "sometimes"}, errors.UsageError, errors.EXIT_USAGE),
    ({"mem": "lots"}, errors.MemorySizeError, errors.EXIT_BAD_MEMORY_SIZE),
    ({"timeout": 0}, errors.UsageError, errors.EXIT_USAGE),
    ({"devices": ["no-such-device"]}, errors.DeviceConfigError, errors.EXIT_DEVICE_CONFIG),
])
def test_bad_arguments_fail_before_any_vm_exists(kwargs, exc, status):
    with pytest.raises(exc) as e:
        VM("hello", **kwargs)
    assert e.value.exit_status == status


def test_unknown_bundled_guest():
    with pytest.raises(errors.UnknownGuestError):
        VM("no-such-guest")


# ------------------------------------------------------------------ serial
@pytest.mark.kvm
def test_expect_wait_and_the_outcome(tmp_path):
    with VM("hello", mem="64M", cpus=2, cmdline="k=v") as vm:
        assert vm.config.sandbox is False            # in-process: never confine the caller's Python
        m = vm.expect([b"no such line", re.compile(rb"cpus=(\d+) ram=(\d+)M")])
        assert vm.match_index == 1 and m.groups() == (b"2", b"64")
        assert vm.before == b"Hello from pykvm!\n" and vm.after == b"cpus=2 ram=64M"
        vm.expect("cmdline=k=v\n")
        out = vm.wait(timeout=60)
    assert (out.status, out.kind, out.ok, out.crashed) == (0, "poweroff", True, False)
    assert out.transcript == b"Hello from pykvm!\ncpus=2 ram=64M\ncmdline=k=v\n"
    assert out.core_path is None and out.report() is None


@pytest.mark.kvm
def test_timeout_then_stop(tmp_path):
    vm = VM("crash-hang", crash_dir=tmp_path)
    try:
        vm.expect(b"spinning forever")
        with pytest.raises(Timeout) as e:
            vm.expect(b"never printed", timeout=0.3)
        assert b"crash-hang: spinning" in e.value.transcript
        assert vm.running
    finally:
        vm.close()
    out = vm.outcome
    assert (out.kind, out.status, out.core_path) == ("stopped", 130, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.kvm
def test_eof_carries_the_crash_outcome_and_core(tmp_path):
    with VM("crash-null", crash_dir=tmp_path) as vm:
        with pytest.raises(EOF) as e:
            vm.expect(b"never printed")
    out = e.value.outcome
    assert (out.kind, out.status, out.crashed) == ("crash", errors.EXIT_GUEST_CRASH, True)
    assert out.core_path.parent == tmp_path and out.core_path.is_file()
    # the fields hold str (a run never imports pathlib); the API hands out Paths
    assert out.core_file == str(out.core_path) and out.kernel == vm.kernel and out.kernel.suffix == ".elf"
    report = out.report()
    assert report["vector"] == 14
    assert [f["symbol"].split("+")[0] for f in report["vcpus"][0]["backtrace"]["frames"][:4]] == ["c", "b", "a", "kmain"]
    assert "crash-null: about to dereference NULL" in out.report_text()


# ------------------------------------------------------------------ registers, memory, pause
@pytest.mark.kvm
def test_pause_memory_and_registers(tmp_path):
    with VM("crash-hang", crash_dir=tmp_path, timeout=120) as vm:
        counter = symbol(vm.kernel, "hang_counter")
        vm.expect(b"spinning forever")
        vm.pause()
        first = vm.read_virt(counter, 8)
        assert vm.read_virt(counter, 8) == first                 # nothing runs while paused
        assert vm.translate(counter) == counter                  # identity-mapped kernel
        assert vm.read_phys(counter, 8) == first
        assert vm.regs()["rip"] >= symbol(vm.kernel, "spin_forever")
        assert vm.sregs()["cr0"] & 0x80000000                    # paging on
        scratch = counter + 64
        vm.write_virt(scratch, b"pykvm-api")
        assert vm.read_phys(scratch, 9) == b"pykvm-api"
        vm.write_phys(scratch, b"PHYS")
        assert vm.read_virt(scratch, 9) == b"PHYSm-api"
        vm.resume()
        paused_value = struct.unpack("<Q", first)[0]
        for _ in range(200):
            if struct.unpack("<Q", vm.read_phys(counter, 8))[0] > paused_value:
                break
            time.sleep(0.01)
        assert struct.unpack("<Q", vm.read_phys(counter, 8))[0] > paused_value
        with pytest.raises(VMError, match="not mapped"):
            vm.read_virt(0xBAD00000000, 8)
        with pytest.raises(VMError, match="not RAM"):
            vm.read_phys(0xD0000000, 4)
        with pytest.raises(VMError, match="no vCPU 3"):
            vm.regs(3)


@pytest.mark.kvm
def test_virtual_addresses_of_a_higher_half_kernel():
    with VM("higherhalf") as vm:
        vm.expect(b"higherhalf ok")
        out = vm.wait()
        assert out.status == 35
        kmain = symbol(vm.kernel, "kmain")
        assert kmain >> 32 == 0xFFFFFFFF
        assert vm.translate(kmain) == kmain - 0xFFFFFFFF80000000   # walked after the run: vCPUs still exist
        assert vm.read_virt(kmain, 16) == vm.read_phys(kmain - 0xFFFFFFFF80000000, 16)


@pytest.mark.kvm
def test_dump_save_and_restore(tmp_path):
    state = tmp_path / "vm.state"
    with VM("crash-hang", crash_dir=tmp_path / "cores", timeout=120) as vm:
        counter = symbol(vm.kernel, "hang_counter")
        vm.expect(b"spinning forever")
        core = vm.dump()
        assert core.parent == tmp_path / "cores" and core.read_bytes()[:4] == b"\x7fELF"
        assert vm.running
        reply = vm.save(state, stop=True)
        assert reply["stopped"] and state.is_file()
        out = vm.wait()
        assert out.kind == "saved"
        saved_value = struct.unpack("<Q", vm.read_phys(counter, 8))[0]
    with VM.restore(state, trust="trusted", timeout=1, crash_dir=tmp_path / "cores") as vm2:
        out = vm2.wait()
        assert out.kind == "timeout" and out.core_path is not None
        assert struct.unpack("<Q", vm2.read_phys(counter, 8))[0] > saved_value


@pytest.mark.kvm
def test_send_reaches_the_guest(tmp_path):
    require_tool("make")
    build = tmp_path / "calc"
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples" / "calc"), f"BUILD={build}"], check=True)
    with VM(build / "kernel.elf") as vm:
        vm.expect(b"calc> ")
        vm.sendline("add 40 2")
        vm.expect(b"= 42\ncalc> ")
        vm.send(b"mul 7 6\r")
        vm.expect(b"= 42\n")
        vm.sendline("exit 5")
        assert vm.wait().status == 11
        with pytest.raises(VMError, match="ended"):
            vm.send(b"x")
