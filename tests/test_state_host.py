"""A state file names no host resource: disks and trust come from `pykvm restore`'s command line.

The reproducer of issue 19 finding 4: a saved `bus-block --disk d.img` VM whose config.disks
was edited to another file (SHA-256 recomputed) made the restored guest overwrite that file.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.control.client import request
from pykvm.errors import EXIT_BAD_STATE, BadStateError
from pykvm.snapshot import state as S

from .helpers import ROOT, pykvm
from .test_state import rewrite

pytestmark = pytest.mark.kvm

SECTOR = 512
WRITES = "crash=2 wsec=16 wcount=24 seed=3"     # rewrites sectors 16..39 until the host stops it


def run_and_save(tmp, *run_args: str) -> tuple:
    """`pykvm run RUN_ARGS --control SOCK`, saved with `ctl save stop=true` at once: (state path, stderr)."""
    sock = tmp / "ctl.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", *run_args, "--control", str(sock),
                             "--timeout", "120", "--no-dump"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        state = tmp / "vm.state"
        reply = request(str(sock), {"cmd": "save", "path": str(state), "stop": True})
        assert reply["ok"], reply
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return state, err.decode()


@pytest.fixture(scope="module")
def saved_block(tmp_path_factory):
    """A bus-block VM saved before its first instruction (--gdb-wait holds it; a connected bus cannot be
    saved), with disk.img as its disk: (state path, disk path)."""
    tmp = tmp_path_factory.mktemp("block")
    disk = tmp / "disk.img"
    disk.write_bytes(b"\0" * (64 * SECTOR))
    state, err = run_and_save(tmp, "bus-block", "--disk", str(disk), "--cmdline", WRITES,
                              "--gdb", "tcp::0", "--gdb-wait")
    assert f"pykvm restore {state} --trust trusted --disk {disk}" in err
    return state, disk


def other_file(tmp_path, size=64 * SECTOR):
    other = tmp_path / "other.img"
    content = bytes(range(256)) * (size // 256)
    other.write_bytes(content)
    return other, content


def test_a_state_file_naming_another_disk_opens_nothing(saved_block, tmp_path):
    state, _disk = saved_block
    other, content = other_file(tmp_path)
    edited = rewrite(state, tmp_path, lambda h: h["config"].update(disks=[[str(other), False]]))
    r = pykvm("restore", str(edited), "--trust", "trusted", "--timeout", "5", "--no-dump", timeout=60)
    err = r.stderr.decode()
    assert r.returncode == EXIT_BAD_STATE, err
    assert "pass it in this order: --disk FILE (32768 bytes, read-write" in err and "Traceback" not in err
    assert other.read_bytes() == content


@pytest.mark.parametrize("how,message", [
    ("size", "32000 bytes, the saved VM's disk had 32768"),
    ("ro", "the saved VM had it read-write; pass --disk"),
    ("trust", "pass --trust trusted"),
    ("two", "the saved VM had 1 disk"),
    ("missing", "No such file or directory"),
])
def test_disks_and_trust_that_differ_are_refused_with_26(saved_block, tmp_path, how, message):
    state, disk = saved_block
    other, content = other_file(tmp_path, 32000 if how == "size" else 64 * SECTOR)
    args = {"size": ["--trust", "trusted", "--disk", str(other)],
            "ro": ["--trust", "trusted", "--disk", f"{other},ro"],
            "trust": ["--disk", str(other)],
            "two": ["--trust", "trusted", "--disk", str(other), "--disk", str(other)],
            "missing": ["--trust", "trusted", "--disk", str(tmp_path / "nope.img")]}[how]
    r = pykvm("restore", str(state), *args, "--timeout", "5", "--no-dump", timeout=60)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == EXIT_BAD_STATE, lines
    assert len(lines) == 1 and message in lines[0], lines
    assert other.read_bytes() == content


def test_the_disk_given_on_the_command_line_is_the_one_written(saved_block, tmp_path):
    state, disk = saved_block
    mine = tmp_path / "mine.img"
    mine.write_bytes(disk.read_bytes())
    other, content = other_file(tmp_path)
    edited = rewrite(state, tmp_path, lambda h: h["config"].update(disks=[[str(other), False]]))
    for sector in range(16, 40):
        mine_bytes = bytearray(mine.read_bytes())
        mine_bytes[sector * SECTOR:(sector + 1) * SECTOR] = b"\xee" * SECTOR
        mine.write_bytes(bytes(mine_bytes))
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "restore", str(edited), "--trust", "trusted",
                             "--disk", str(mine), "--timeout", "120", "--no-dump"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 100
        while all(mine.read_bytes()[s * SECTOR:(s + 1) * SECTOR] == b"\xee" * SECTOR for s in range(16, 40)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the restored guest wrote nothing"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.communicate()
    assert other.read_bytes() == content


def test_an_untrusted_state_restores_untrusted_without_asking():
    assert S.bind_trust("untrusted", None) == "untrusted"
    assert S.bind_trust("trusted", "untrusted") == "untrusted"
    assert S.bind_trust("untrusted", "trusted") == "trusted"      # the command line may grant it
    with pytest.raises(BadStateError, match="--trust trusted"):
        S.bind_trust("trusted", None)


@settings(max_examples=200, deadline=None)
@given(saved=st.lists(st.tuples(st.text(min_size=1, max_size=8).filter(str.isprintable), st.booleans(),
                                st.one_of(st.none(), st.integers(1, 1 << 20))), max_size=3),
       given_=st.lists(st.tuples(st.text(max_size=12), st.booleans()), max_size=4))
def test_disk_binding_never_opens_a_saved_path_and_fails_only_with_bad_state(tmp_path_factory, saved, given_):
    header = {"config": {"disks": [[label, ro] for label, ro, _ in saved]}}
    if all(size is not None for *_, size in saved):
        header["disks"] = [{"size": size, "read_only": ro} for _l, ro, size in saved]
    try:
        out = S.bind_disks(header, given_)
    except BadStateError as e:
        assert "\n" not in str(e)
        return
    assert [p for p, _ in out] == [str(p) for p, _ in given_]    # only the command line's paths


def test_a_vm_with_intel_iommu_saved_through_ctl_restores(tmp_path):
    """Issue 19 finding 8: intremap (an on/off switch, true once parsed) failed the schema with 26."""
    state, _err = run_and_save(tmp_path, "crash-hang", "--device", "intel-iommu")
    saved = S.load_state(state)
    try:
        iommu = [d for d in saved.header["devices"] if d["class"].endswith(":IntelIommu")]
        assert iommu and iommu[0]["config"]["intremap"] is True
    finally:
        saved.close()
    r = pykvm("restore", str(state), "--trust", "trusted", "--timeout", "2", "--no-dump", timeout=60)
    assert r.returncode == 18, r.stderr.decode()


HOSTILE = st.sampled_from([None, True, False, -1, 0, 1, 2 ** 64, 1.5, "", "x", "/etc/shadow", "/dev/sda",
                           "a\x1b[2Jb", "a\nb", "x.elf; rm -rf ~", [], [["/etc/passwd", False]],
                           [["/etc/passwd", True], ["/etc/passwd", False]], [[1, 2]], {}, {"size": 1},
                           [{"size": 32768, "read_only": False}], [{"size": 1, "read_only": True}],
                           "trusted", "untrusted", "root", [["edu", {}]], [["mailbox", {"base": True}]],
                           [["intel-iommu", {"intremap": True}]]])
HOST_FIELDS = [("config", "kernel"), ("config", "kernel_name"), ("config", "initrd"), ("config", "disks"),
               ("config", "trust"), ("config", "devices"), ("config", "bus"), ("config", "display"),
               ("config", "numa"), ("config", "cpu"), (None, "disks")]


@settings(max_examples=60, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(HOST_FIELDS), HOSTILE), min_size=1, max_size=3),
       trust=st.sampled_from([None, "trusted", "untrusted"]))
def test_edited_host_fields_restore_with_the_given_disk_or_are_refused_with_26(saved_block, tmp_path_factory,
                                                                               edits, trust):
    """Whatever a resealed header says about host resources: status 0 or 26, no traceback, and the only
    file opened as a disk is the command line's."""
    import copy

    from pykvm.errors import PykvmError
    from pykvm.machine import Machine

    state, disk = saved_block
    tmp = tmp_path_factory.mktemp("edit")
    mine = tmp / "mine.img"
    mine.write_bytes(disk.read_bytes())
    opened = []
    saved = S.load_state(state)
    try:
        header, payload = copy.deepcopy(saved.header), saved.section(0, saved.payload_len)
    finally:
        saved.close()
    for (where, key), value in edits:
        (header["config"] if where == "config" else header)[key] = value
    out = tmp / "edited.state"
    S.write_file(out, header, [payload])
    from pykvm.bus.services import block

    real_init = block.Disk.__init__

    def spy(self, path, read_only=False):
        opened.append(str(path))
        real_init(self, path, read_only)

    block.Disk.__init__ = spy
    try:
        status = 0
        try:
            loaded = S.load_state(out)
        except PykvmError as e:
            status = e.exit_status
        else:
            try:
                cfg = loaded.machine_config(disks=[(str(mine), False)], trust=trust, serial_out=None,
                                            serial_in=None, timeout=1.0, crash_dir=None)
                with Machine(cfg, restore=loaded):
                    pass
            except PykvmError as e:
                assert "\n" not in str(e)
                status = e.exit_status
            finally:
                loaded.close()
    finally:
        block.Disk.__init__ = real_init
    assert status in (0, EXIT_BAD_STATE)
    assert set(opened) <= {str(mine)}
