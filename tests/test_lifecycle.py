"""Model-based tests of the device lifecycle: random event sequences, randomly failing callbacks."""

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pykvm.devices import Device, DeviceManager, State
from pykvm.devices.lifecycle import TERMINAL, CallbackFailed, LifecycleError

PORT = 0x700


class Probe(Device):
    """Records callbacks and I/O; each callback can be told to fail once."""

    name = "probe"

    def __init__(self):
        super().__init__()
        self.ports = [(PORT, 4)]
        self.log: list[str] = []
        self.fail_next: set[str] = set()

    def _cb(self, name):
        self.log.append(name)
        if name in self.fail_next:
            self.fail_next.discard(name)
            raise RuntimeError(f"{name} failed on purpose")

    def prepare_hardware(self): self._cb("prepare")
    def d0_entry(self, previous): self._cb("d0_entry")
    def d0_exit(self, target): self._cb("d0_exit")
    def release_hardware(self): self._cb("release")
    def io_start(self): self._cb("io_start")
    def io_suspend(self): self._cb("io_suspend")

    def io_read(self, offset, size):
        self.log.append(f"io:{self.state.value}")
        return 0x42

    def io_write(self, offset, size, value):
        self.log.append(f"io:{self.state.value}")


CALLBACKS = ["prepare", "d0_entry", "d0_exit", "release", "io_start", "io_suspend"]


class LifecycleModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dm = DeviceManager()
        self.dev = self.dm.add(Probe())
        self.lc = self.dm.lifecycles[self.dev]

    def _event(self, fn):
        try:
            fn()
        except (CallbackFailed, LifecycleError, RuntimeError):
            pass

    @rule(cb=st.sampled_from(CALLBACKS))
    def arm_failure(self, cb):
        self.dev.fail_next.add(cb)

    @rule()
    def start(self):
        self._event(self.lc.start)

    @rule()
    def power_down(self):
        self._event(self.lc.power_down)

    @rule()
    def power_up(self):
        self._event(self.lc.power_up)

    @rule()
    def stop(self):
        self._event(self.lc.stop)

    @rule()
    def fail(self):
        self._event(self.lc.fail)

    @rule(surprise=st.booleans())
    def remove(self, surprise):
        self._event(lambda: self.lc.remove(surprise=surprise))

    @rule(write=st.booleans())
    def guest_io(self, write):
        value = self.dm.port_access(PORT, 1, write, 1)
        if self.dev.state is not State.D0 and not write:
            assert value == 0xFF  # outside D0: like nothing is there

    @invariant()
    def callback_order(self):
        calls = [e for e in self.dev.log if not e.startswith("io:")]
        if "d0_entry" in calls:
            assert calls.index("prepare") < calls.index("d0_entry")
        assert calls.count("release") <= 1
        if "release" in calls:
            assert calls[-1] == "release" or self.dev.state in TERMINAL
        # d0_exit only after a successful d0_entry and at most once per entry
        in_d0 = False
        last_entry_ok = False
        for i, c in enumerate(calls):
            if c == "d0_entry":
                nxt = calls[i + 1] if i + 1 < len(calls) else None
                last_entry_ok = nxt == "io_start" or nxt is None and self.dev.state is State.D0
                in_d0 = last_entry_ok
            elif c == "d0_exit":
                assert in_d0, f"d0_exit without a successful d0_entry: {calls}"
                in_d0 = False

    @invariant()
    def io_only_in_d0(self):
        assert all(e == "io:D0" for e in self.dev.log if e.startswith("io:"))

    @invariant()
    def linked_iff_d0(self):
        linked = PORT in self.dm.live_port_reads
        assert linked == (self.dev.state is State.D0)

    def teardown(self):
        self.dm.stop_all()
        calls = [e for e in self.dev.log if not e.startswith("io:")]
        if "prepare" in calls:
            assert calls.count("release") == 1, calls
        else:
            assert "release" not in calls


TestLifecycle = LifecycleModel.TestCase
TestLifecycle.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_release_exactly_once_even_when_prepare_fails():
    dm = DeviceManager()
    dev = dm.add(Probe())
    dev.fail_next.add("prepare")
    with pytest.raises(Exception, match="prepare failed"):
        dm.start_all()
    dm.stop_all()
    assert dev.log == ["prepare", "release"]


def test_no_d0_exit_after_failed_d0_entry():
    dm = DeviceManager()
    dev = dm.add(Probe())
    dev.fail_next.add("d0_entry")
    with pytest.raises(Exception):
        dm.start_all()
    dm.stop_all()
    assert dev.log == ["prepare", "d0_entry", "release"]
    assert dev.state is State.REMOVED
