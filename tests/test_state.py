"""Saving a VM in one pykvm process and restoring it in another; refusing bad state files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.snapshot import state as S
from pykvm.control.client import request
from pykvm.errors import EXIT_BAD_STATE, BadStateError

from .helpers import ROOT, WINDOW_POLL_ARGS, WINDOW_POLL_DEVICES, pykvm

BEFORE = (b"window-poll: save\n"
          b"ident: vendor=0x7079 device=0x6b76 version=1.2 caps=0xf serial=PYKVM-IDENT-0001\n"
          b"config: 16 words landed, generation 16\n"
          b"log: count=100 hash=0xdd953fa9\n"
          b"save: configured, waiting\n")
AFTER = (b"after: ident page unchanged\n"
         b"after: tick monotonic\n"
         b"after: config generation=16 config[0]=0xc0f10000 config[15]=0xc0f10fff\n"
         b"after: log count=150 hash=0x3c10dc9e\n"
         b"after: status trapped, reads counted\n"
         b"after: status backed, reads not counted\n"
         b"after: ram pattern ok\n"
         b"window-poll: ok\n")


# ------------------------------------------------------------------ the file format (no KVM)
def minimal_header() -> dict:
    """The smallest header the schema accepts: one all-zero vCPU, no RAM runs, no devices."""
    from pykvm.kvm.abi import ffi

    zero = {k: "00" * ffi.sizeof(f"struct kvm_{t}") for k, t in (
        ("regs", "regs"), ("sregs", "sregs"), ("fpu", "fpu"), ("lapic", "lapic_state"), ("events", "vcpu_events"))}
    return {"config": {"kernel": "k"}, "vcpus": [{**zero, "mp_state": 0, "msrs": {}}],
            "memory": {"regions": []}, "devices": []}


def sample(tmp_path, header=None, pieces=(b"abc", b"\0" * 4096, b"xyz")) -> Path:
    path = tmp_path / "vm.state"
    header = header or minimal_header()
    S.write_file(path, header, list(pieces))
    return path


def test_round_trip(tmp_path):
    path = sample(tmp_path)
    saved = S.load_state(path)
    try:
        assert saved.header["config"] == {"kernel": "k"}
        assert saved.section(0, 3) == b"abc" and saved.section(4099, 3) == b"xyz"
        with pytest.raises(BadStateError, match="outside the payload"):
            saved.section(4100, 3)
        with pytest.raises(BadStateError, match="outside the payload"):
            saved.section(-1, 2)
    finally:
        saved.close()
    assert not list(tmp_path.glob(".*tmp*"))     # written atomically, nothing left behind


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
    elif how == "flip-header":
        data[S.FIXED.size + 3] ^= 0x01
    elif how == "truncate":
        del data[-7:]
    elif how == "truncate-fixed":
        del data[12:]
    elif how == "append":
        data += b"\0"
    elif how == "version":
        data[8:12] = (S.FORMAT_VERSION + 1).to_bytes(4, "little")
    elif how == "magic":
        data[0:8] = b"\x7fELF\2\1\1\0"
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [
    ("flip", "checksum mismatch"), ("flip-header", "checksum mismatch"), ("truncate", "truncated"),
    ("truncate-fixed", "truncated"), ("append", "does not match its header"),
    ("version", f"format version {S.FORMAT_VERSION + 1} is not supported"),
    ("magic", "not a pykvm state file"), ("empty", "not a pykvm state file"),
])
def test_corrupt_files_are_refused(tmp_path, how, message):
    path = sample(tmp_path)
    corrupt(path, how)
    with pytest.raises(BadStateError, match=message) as e:
        S.load_state(path)
    assert e.value.exit_status == EXIT_BAD_STATE == 26
    assert "\n" not in str(e.value)


def test_a_header_that_is_not_what_pykvm_writes_is_refused(tmp_path):
    with pytest.raises(BadStateError, match="no 'devices'"):
        S.load_state(sample(tmp_path, header={k: v for k, v in minimal_header().items() if k != "devices"}))


def test_machine_config_round_trip():
    from pykvm.machine import MachineConfig

    cfg = MachineConfig(kernel=Path("/k.elf"), mem=64 << 20, cpus=3, cmdline="a b", serial_out=7,
                        timeout=5.0, crash_dir=Path("/c"))
    data = json.loads(json.dumps(S.config_to_json(cfg)))
    assert "serial_out" not in data and "timeout" not in data and data["kernel"] == "/k.elf"
    back = S.config_from_json({**data, "from_the_future": 1}, serial_out=None, timeout=9.0)
    assert back.kernel == "/k.elf" and (back.mem, back.cpus, back.cmdline) == (64 << 20, 3, "a b")
    assert back.timeout == 9.0 and back.serial_out is None and back.crash_dir is None


# ------------------------------------------------------------------ moving a VM between processes
class Source:
    """`pykvm run window-poll --cmdline save --control SOCK` in the background."""

    def __init__(self, tmp_path, *extra, cmdline="save"):
        self.sock = str(tmp_path / "vm.sock")
        self.serial = tmp_path / "source.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pykvm", "run", "window-poll", *WINDOW_POLL_ARGS, "--device", "mailbox", "--cmdline", cmdline, "--control", self.sock,
             "--serial", str(self.serial), "--timeout", "120", "--no-dump", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_for(self, text: bytes, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serial.exists() and text in self.serial.read_bytes() and os.path.exists(self.sock):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"source ended early: {self.proc.returncode} {self.proc.stderr.read()!r}")
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} from the source guest")

    def ctl(self, **req):
        return request(self.sock, req)

    def finish(self, timeout=60):
        _out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode(), self.serial.read_bytes()


def wait_running(proc, sock, timeout=30):
    """Until a `pykvm ... --control sock` process has all its devices in D0 (the socket serves earlier)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        if os.path.exists(sock):
            devices = request(sock, {"cmd": "devices"})["devices"]
            if all(d["state"] == "D0" for d in devices):
                return {d["name"]: d for d in devices}
        assert time.monotonic() < deadline, "the restored VM did not start"
        time.sleep(0.01)


def restore(path, *extra, timeout=90):
    return pykvm("restore", str(path), "--trust", "trusted", "--timeout", "60", "--no-dump", *extra, timeout=timeout)


@pytest.mark.kvm
def test_move_a_configured_vm_to_another_process(tmp_path):
    src = Source(tmp_path, "--cpus", "2")
    src.wait_for(b"save: configured")
    path = tmp_path / "vm.state"
    ctl = pykvm("ctl", src.sock, "save", f"path={path}", "stop=true")      # the command line people type
    assert ctl.returncode == 0, ctl
    reply = json.loads(ctl.stdout)
    assert reply["ok"] and reply["stopped"] and reply["vcpus"] == 2 and 0 < reply["ram_bytes"] < 8 << 20
    status, err, out = src.finish()
    assert status == 0 and "saved to" in err
    assert out == BEFORE                            # the source stopped at the save point
    assert path.stat().st_size == reply["bytes"]
    r = restore(path)
    assert r.stdout == AFTER, r.stderr              # same window bytes, config, log, trapped mode, RAM
    assert r.returncode == 39, r.stderr


@pytest.mark.kvm
def test_save_without_stop_keeps_the_source_running_and_the_copy_runs_too(tmp_path):
    src = Source(tmp_path)
    src.wait_for(b"save: configured")
    path = tmp_path / "copy.state"
    reply = src.ctl(cmd="save", path=str(path), stop=False)
    assert reply["ok"] and not reply["stopped"], reply
    status, _err, out = src.finish()
    assert (status, out) == (39, BEFORE + AFTER)
    # a copy of a copy: restore with a control socket, save again from the restored VM, restore that
    sock = str(tmp_path / "r.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "restore", str(path), "--trust", "trusted", "--control", sock,
                             "--timeout", "60", "--no-dump"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_running(proc, sock)
    second = tmp_path / "second.state"
    reply = request(sock, {"cmd": "save", "path": str(second), "stop": "true"})
    assert reply["ok"] and reply["stopped"], reply
    first_out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    r = restore(second)
    assert r.returncode == 39, r.stderr
    assert first_out + r.stdout == AFTER


@pytest.mark.kvm
def test_save_is_refused_while_a_device_is_not_in_d0(tmp_path):
    src = Source(tmp_path)
    src.wait_for(b"save: configured")
    try:
        assert src.ctl(cmd="power", name="post-code", state="d3")["ok"]
        reply = src.ctl(cmd="save", path=str(tmp_path / "x.state"), stop=True)
        assert not reply["ok"] and "post-code is low-power, not D0" in reply["error"], reply
        assert not (tmp_path / "x.state").exists()
        bad = src.ctl(cmd="save", path=str(tmp_path / "missing" / "x.state"))
        assert not bad["ok"] and "does not exist" in bad["error"]
        assert not src.ctl(cmd="save", path=str(tmp_path / "y.state"), stop="maybe")["ok"]
        assert src.ctl(cmd="power", name="post-code", state="d0")["ok"]
    finally:
        status, _err, out = src.finish()
    assert (status, out) == (39, BEFORE + AFTER)    # the refused saves did not disturb the guest


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    src = Source(tmp)
    src.wait_for(b"save: configured")
    path = tmp / "vm.state"
    assert src.ctl(cmd="save", path=str(path), stop=True)["ok"]
    src.finish()
    return path


@pytest.mark.kvm
@pytest.mark.parametrize("how,message", [("flip", "checksum mismatch"), ("truncate", "truncated"),
                                         ("version", "format version"), ("magic", "not a pykvm state file")])
def test_restore_refuses_a_corrupt_file(saved_file, tmp_path, how, message):
    path = tmp_path / "bad.state"
    path.write_bytes(saved_file.read_bytes())
    corrupt(path, how)
    r = restore(path)
    assert r.returncode == EXIT_BAD_STATE
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: ") and message in lines[0]
    assert r.stdout == b""


def rewrite(saved_file, tmp_path, edit) -> Path:
    """A validly checksummed copy of saved_file with its header changed by edit(header)."""
    saved = S.load_state(saved_file)
    try:
        header = saved.header
        payload = saved.section(0, saved.payload_len)
    finally:
        saved.close()
    edit(header)
    path = tmp_path / "edited.state"
    S.write_file(path, header, [payload])
    return path


def _identity(h):
    return next(d for d in h["devices"] if d["name"] == "identity")


@pytest.mark.kvm
@pytest.mark.parametrize("edit,message", [
    (lambda h: _identity(h)["windows"][0].update(gpa=0xFD000000), "window layout"),
    (lambda h: _identity(h).update({"class": "pykvm.devices.mailbox:Mailbox"}), "is a pykvm.devices.mailbox:Mailbox"),
    (lambda h: h["devices"].append({**_identity(h), "name": "gadget", "class": "x.y:Gadget"}), "does not build"),
    (lambda h: h["memory"]["regions"][0].update(size=1 << 20), "RAM layout"),
    (lambda h: _identity(h).update(state={"config": [1, 2]}), "refused its saved state"),
    (lambda h: h["memory"]["regions"][0]["runs"].append([0, 4096, 1 << 40]), "outside the payload"),
])
def test_restore_refuses_an_incompatible_or_malformed_file(saved_file, tmp_path, edit, message):
    r = restore(rewrite(saved_file, tmp_path, edit))
    assert r.returncode == EXIT_BAD_STATE, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.kvm
def test_restore_brings_back_hot_plug_changes(saved_file, tmp_path):
    def edit(h):
        mailbox = next(d for d in h["devices"] if d["name"] == "mailbox")
        h["devices"].remove(mailbox)            # hot-removed in the saved VM
        h["devices"].append({"name": "mb2", "class": "pykvm.devices.mailbox:Mailbox",
                             "config": {"base": 0x5a0, "hang_seconds": 2.0, "name": "mb2"},
                             "generation": 3, "state": {**mailbox["state"], "host_flags": 5}, "windows": []})
    sock = str(tmp_path / "r.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "restore", "--trust", "trusted",
                             str(rewrite(saved_file, tmp_path, edit)),
                             "--control", sock, "--timeout", "60", "--no-dump"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    devices = wait_running(proc, sock)
    out, _err = proc.communicate(timeout=60)
    assert "mailbox" not in devices and devices["mb2"]["generation"] == 3 and devices["mb2"]["state"] == "D0"
    assert out == AFTER and proc.returncode == 39


@pytest.mark.kvm
def test_in_process_save_refuses_a_busy_device_then_moves(tmp_path):
    import threading

    from pykvm.machine import Machine, MachineConfig

    from .helpers import guest

    log = tmp_path / "serial.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    path = tmp_path / "vm.state"
    results = {}
    try:
        cfg = MachineConfig(kernel=guest("window-poll"), cmdline="save", serial_out=fd, timeout=120, crash_dir=None,
                            devices=WINDOW_POLL_DEVICES)
        with Machine(cfg) as m:
            def drive():
                deadline = time.monotonic() + 60
                while b"configured" not in log.read_bytes():
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                m.identity.save_refusal = lambda: "a transfer is in flight"
                try:
                    m.call(lambda: S.save_vm(m, str(path), stop=True))
                except S.SaveRefused as e:
                    results["refused"] = str(e)
                del m.identity.save_refusal
                results["saved"] = m.call(lambda: S.save_vm(m, str(path), stop=True))

            t = threading.Thread(target=drive, daemon=True)
            t.start()
            outcome = m.run()
            t.join(10)
    finally:
        os.close(fd)
    assert results["refused"] == "device identity: a transfer is in flight; try again when it is done"
    assert outcome.kind == "saved" and outcome.status == 0 and results["saved"]["stopped"]
    assert log.read_bytes() == BEFORE
    saved = S.load_state(path)
    try:
        assert "policy" in saved.header and saved.header["config"]["cmdline"] == "save"
        ident = next(d for d in saved.header["devices"] if d["name"] == "identity")
        assert ident["state"]["log_count"] == 150                   # queued coalesced writes were applied
        assert [w["mode"] for w in ident["windows"]] == ["backed", "trapped"]
        image = saved.section(*ident["windows"][0]["payload"])
        assert image[:4] == b"\x79\x70\0\0" and image[0x40:0x44] == (0xC0F10000).to_bytes(4, "little")
    finally:
        saved.close()
    r = restore(path)
    assert (r.returncode, r.stdout) == (39, AFTER), r.stderr


# ------------------------------------------------------------------ hostile headers (issue 9)
ISSUE_CASES = [
    ("config-not-a-dict", lambda h: h.update(config=["k"])),
    ("clock-too-big", lambda h: h.update(clock=1 << 64)),
    ("msr-too-big", lambda h: h["vcpus"][0]["msrs"].update({"0x10": 1 << 64})),
    ("mp-state-too-big", lambda h: h["vcpus"][0].update(mp_state=1 << 32)),
    ("kernel-float", lambda h: h["config"].update(kernel=1.5)),
    ("mem-null", lambda h: h["config"].update(mem=None)),
    ("cpus-list", lambda h: h["config"].update(cpus=[1])),
    ("exit-port-object", lambda h: h["config"].update(exit_port={"a": 1})),
    ("on-device-failure-unknown", lambda h: h["config"].update(on_device_failure="explode")),
    ("mem-unaligned", lambda h: h["config"].update(mem=(64 << 20) + 1)),
    ("cpus-too-many", lambda h: h["config"].update(cpus=300)),
    ("exit-port-collides", lambda h: h["config"].update(exit_port=0x3F8)),
    ("device-option-bad", lambda h: h["config"].update(devices=[["mailbox", {"base": "0x99999"}]])),
    ("device-unknown", lambda h: h["config"].update(devices=[["gadget", {}]])),
    ("two-vcpus-one-saved", lambda h: h["config"].update(cpus=2)),
]


@pytest.mark.kvm
@pytest.mark.parametrize("name,edit", ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_every_bad_field_of_a_resealed_file_is_status_26(saved_file, tmp_path, name, edit):
    r = restore(rewrite(saved_file, tmp_path, edit), timeout=60)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == EXIT_BAD_STATE, lines
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: "), lines


def test_the_config_schema_covers_every_saved_field():
    from pykvm import record
    from pykvm.machine import MachineConfig

    saved = {f.name for f in record.fields(MachineConfig)} - set(S.RUN_ONLY)
    assert saved == set(S.CONFIG_SCHEMA)


NASTY = st.sampled_from([None, True, False, -1, 0, 1, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 1.5,
                         float("inf"), "", "x", "0x10", "zz", [], [1], [[0, 1, 2]], {}, {"a": 1}, "a" * 5000])


def _paths(node, path=()):
    """Every (container path, key) in a JSON tree, skipping the long lists of RAM runs past their first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for i, (k, v) in enumerate(items):
        if isinstance(node, list) and i > 1:
            break
        yield path, k
        yield from _paths(v, path + (k,))


@pytest.fixture(scope="module")
def saved_parts(saved_file):
    saved = S.load_state(saved_file)
    try:
        return saved.header, saved.section(0, saved.payload_len)
    finally:
        saved.close()


def _restore_in_process(path) -> int:
    """0 when the file restores into a machine, else the PykvmError's exit status."""
    from pykvm.errors import PykvmError
    from pykvm.machine import Machine

    try:
        saved = S.load_state(path)
    except PykvmError as e:
        return e.exit_status
    try:
        cfg = saved.machine_config(trust="trusted", serial_out=None, serial_in=None, timeout=1.0, crash_dir=None)
        with Machine(cfg, restore=saved):
            return 0
    except PykvmError as e:
        assert "\n" not in str(e)
        return e.exit_status
    finally:
        saved.close()


@pytest.mark.kvm
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_restore_or_are_refused_with_26(saved_parts, tmp_path, data):
    import copy

    header, payload = saved_parts
    h = copy.deepcopy(header)
    targets = list(_paths(h))
    for _ in range(data.draw(st.integers(1, 3))):
        path, key = data.draw(st.sampled_from(targets))
        node = h
        try:
            for k in path:
                node = node[k]
            if data.draw(st.booleans()) and isinstance(node, dict):
                node.pop(key, None)
            else:
                node[key] = data.draw(NASTY)
        except (KeyError, IndexError, TypeError):
            continue   # an earlier mutation replaced a container on the way
    out = tmp_path / "mutated.state"
    S.write_file(out, h, [payload])
    assert _restore_in_process(out) in (0, EXIT_BAD_STATE)
