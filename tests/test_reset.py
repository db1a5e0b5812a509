"""In-memory snapshots and resets (pykvm/snapshot/reset.py) on a guest that scribbles RAM and devices.

A reset VM must be indistinguishable from the snapshot: all of RAM, every vCPU register
(regs, sregs, FPU, XSAVE, XCRs, LAPIC, events, MP state, MSRs but the TSC, which ticks
while paused) and every device's state hash the same right after the snapshot and right
after each reset, however much the guest wrote in between.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from pykvm import VM, VMError
from pykvm.kvm.abi import ffi
from pykvm.memory.numa import from_options

pytestmark = pytest.mark.kvm

MSR_TSC = 0x10


def _raw(c) -> bytes:
    return bytes(ffi.buffer(c))


def state_hash(vm) -> dict:
    """SHA-256 of each region of RAM, each vCPU register set and each device's state (the VM paused)."""
    m = vm.machine
    out = {}
    for r in m.memory.regions:
        out[f"ram {r.name}@{r.gpa:#x}"] = hashlib.sha256(r.view).hexdigest()
    indices = [i for i in m.kvm.msr_index_list() if i != MSR_TSC]
    for v in m.vcpus:
        for get in (v.get_regs, v.get_sregs, v.get_fpu, v.get_xsave, v.get_xcrs, v.get_lapic, v.get_vcpu_events):
            out[f"vcpu{v.index} {get.__name__}"] = hashlib.sha256(_raw(get())).hexdigest()
        out[f"vcpu{v.index} mp_state"] = v.get_mp_state()
        out[f"vcpu{v.index} msrs"] = sorted(v.get_msrs(indices, skip_unreadable=True).items())
    for d in m.devices.devices:
        out[f"device {d.name}"] = json.dumps(d.get_state(), sort_keys=True)
        for w in d.windows:
            out[f"device {d.name} window {w.name}"] = hashlib.sha256(bytes(w.image or b"")).hexdigest()
    return out


def _scribble_vm(**kw) -> VM:
    vm = VM("scribble", mem=kw.pop("mem", "64M"), devices=["dma"], timeout=300, **kw)
    vm.expect(b"scribble: ", timeout=120)
    vm.expect(b" cpus\n", timeout=30)
    return vm


def _resets_match(vm, rounds: int) -> None:
    vm.pause()
    snap = vm.snapshot()
    want = state_hash(vm)
    vm.resume()
    for _ in range(rounds):
        time.sleep(0.05)                 # the guest scribbles
        vm.pause()
        assert state_hash(vm) != want    # it did change something
        copied = vm.reset(snap)
        assert copied > 0
        assert state_hash(vm) == want
        vm.resume()
    snap.close()


@pytest.mark.parametrize("cpus", [1, 3])
def test_reset_restores_ram_registers_and_devices(cpus):
    with _scribble_vm(cpus=cpus) as vm:
        _resets_match(vm, 8)
        dma = vm.machine.built["dma"]
        assert dma.transfers, "the guest never used the DMA engine: host writes went untested"


def test_reset_with_vnuma_nodes():
    numa = from_options([], 2, None, 64 << 20, 2).as_json()
    with _scribble_vm(cpus=2, numa=numa) as vm:
        assert len(vm.machine.memory.regions) == 2
        _resets_match(vm, 6)


def test_reset_while_running_pauses_around_it():
    with _scribble_vm(cpus=2) as vm:
        snap = vm.snapshot()            # not paused: snapshot and reset pause around themselves
        for _ in range(5):
            vm.reset(snap)
        assert vm.running
        assert snap.resets == 5


def test_two_snapshots_each_reset_exactly():
    with _scribble_vm() as vm:
        vm.pause()
        first = vm.snapshot()
        h1 = state_hash(vm)
        vm.resume()
        time.sleep(0.05)
        vm.pause()
        second = vm.snapshot()
        h2 = state_hash(vm)
        assert h1 != h2
        vm.resume()
        for snap, want in ((first, h1), (second, h2), (first, h1), (second, h2)):
            time.sleep(0.03)
            vm.pause()
            vm.reset(snap)
            assert state_hash(vm) == want
            vm.resume()


def test_reset_refusals():
    with _scribble_vm() as vm, VM("scribble", mem="64M", timeout=60) as other:
        snap = vm.snapshot()
        with pytest.raises(VMError, match="another VM"):
            other.reset(snap)
        snap.close()
        with pytest.raises(VMError, match="closed"):
            vm.reset(snap)
        vm.stop()
        vm.wait(30)
        with pytest.raises(VMError, match="ended"):
            vm.snapshot()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_many_resets_hold_memory_and_descriptors():
    """20 000 resets: descriptors do not grow, RSS grows by less than 16 MiB after a warm-up."""
    with _scribble_vm() as vm:
        vm.pause()
        snap = vm.snapshot()
        m = vm.machine
        from pykvm.snapshot.reset import restore

        for _ in range(500):
            restore(m, snap)
        fds, rss = _fds(), _rss_kib()
        for i in range(20000):
            if i % 1000 == 0:
                vm.resume()
                vm.pause()
            restore(m, snap)
        assert _fds() == fds
        assert _rss_kib() - rss < 16 << 10
        vm.resume()


def test_reset_puts_the_bus_back_and_refuses_a_snapshot_with_a_channel_open():
    """The partition bus's host side goes back with the guest: a guest reset to before it connected
    connects, opens and echoes again (before, the host still held the old connection and refused
    it). A channel's host side cannot be rewound, so a snapshot with one open is refused."""
    with VM("bus-echo", cmdline="n=3 rescind=1 hold=1", bus=True, timeout=300) as vm:
        vm.expect(b"echo: waiting for a key\n", timeout=120)
        vm.pause()
        snap = vm.snapshot()            # the guest has not connected
        want = state_hash(vm)
        assert vm.machine.bus.state == "idle"
        for round_ in range(3):
            if round_:
                vm.pause()
                assert vm.machine.bus.state == "contact"
                vm.reset(snap)
                assert vm.machine.bus.state == "idle" and not vm.machine.bus.gpadls
                # RAM too: the pages the host wrote through its views of the rings, which KVM's dirty
                # log never saw (replies, offers, echoes), are back as they were
                got = state_hash(vm)
                assert got == want, [k for k in want if got[k] != want[k]]
            vm.resume()
            vm.send(b"x")
            vm.expect(b"echo: open, version 1.1\necho: 3 messages of 64 bytes ok\necho: host counted 3\n", timeout=120)
        vm.pause()                      # the guest waits for a rescind with its channel open
        with pytest.raises(VMError, match=r"bus channel \d+ \(echo\) is open at the snapshot"):
            vm.snapshot()
        assert vm.machine.bus.violations == 0
