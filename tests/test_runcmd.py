"""`pykvm run`'s click-free parser agrees with click wherever it does not hand over to it."""

import subprocess
import sys

import click
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import cli, runcmd

from .helpers import ROOT

_NAMES = sorted(runcmd._BY_NAME) + ["--help", "-h", "--", "-m64M", "--bogus", "--mem=", "--no-dump=1", "--cpus=2"]
_VALUES = ["hello", "64M", "0", "1", "2", "255", "256", "08", "+3", " 4", "1.5", "0.0", ".5", "1e3", "-1", "",
           "split", "full", "off", "on", "text", "untrusted", "crash", "32", "/tmp", "/etc/passwd",
           "/nonexistent/x", "0xf4", "5/60", "tcp::0", "a=b"]


def _click_parse(args):
    """(params, dests given) as click parses them, or None when click refuses the arguments."""
    try:
        ctx = cli.run.make_context("run", list(args), parent=click.Context(cli.main, info_name="pykvm"))
    except (click.UsageError, click.exceptions.Exit):
        return None
    given_ = {n for n in ctx.params if n != "kernel"
              and ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT}
    return ctx.params, given_


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_NAMES), st.sampled_from(_VALUES), st.text(max_size=6)), max_size=8))
def test_fast_parse_agrees_with_click(args):
    fast = runcmd.parse(args)
    if fast is None:
        return                                   # handed to click: nothing to compare
    slow = _click_parse(args)
    assert slow is not None, f"fast path accepted what click refuses: {args}"
    values, given_ = fast
    assert values == slow[0]
    assert given_ == slow[1]


def test_plain_run_lines_take_the_fast_path():
    for args in (["hello"], ["hello", "--serial", "none", "--no-dump"], ["-m", "64M", "k", "-c", "2", "--timeout=1.5"],
                 ["k", "--device", "a", "--device", "b,x=1", "--trust", "untrusted", "--exit-port", "0x501"]):
        assert runcmd.parse(args) is not None, args
        assert runcmd.parse(args)[0] == _click_parse(args)[0]


def test_doubtful_lines_go_to_click():
    for args in ([], ["--help"], ["k", "-h"], ["k", "extra"], ["k", "--cpus", "0"], ["k", "--cpus", "+1"],
                 ["k", "--timeout", "1e3"], ["k", "--serial"], ["k", "--mem", "1", "--mem", "2"],
                 ["k", "--", "x"], ["k", "-m64M"], ["k", "--no-dump=1"], ["k", "--irqchip", "Split"],
                 ["k", "--initrd", "/nonexistent"], ["k", "--crash-dir", "/etc/passwd"], ["k", "--serial", "-"]):
        assert runcmd.parse(args) is None, args


def test_run_module_does_not_import_click():
    code = "import sys, pykvm.runcmd; assert 'click' not in sys.modules, 'click imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


def test_run_vm_turns_the_collector_back_on_before_the_guest_runs():
    import gc

    from pykvm import runcmd

    seen = []

    class FakeVM:
        policy_summary = ""
        unclaimed_io = {}

        def request_dump(self):
            pass

        def run(self):
            seen.append(gc.isenabled())
            return type("O", (), {"kind": "exit", "status": 7, "core_file": None, "core_error": None, "kernel_file": None})()

    runcmd._pause_gc()   # as fast_run does
    try:
        assert not gc.isenabled()
        assert runcmd.run_vm(FakeVM(), None, False, False) == 7
        assert seen == [True] and gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def _intensity_by_pattern(text):
    """parse_intensity's answer as the N/SECONDS pattern alone gives it (None: BadValue)."""
    import re

    m = re.fullmatch(r"\s*(\d{1,9})\s*/\s*(\d{1,9}(?:\.\d+)?)\s*", text)
    if not m or float(m.group(2)) <= 0:
        return None
    return int(m.group(1)), float(m.group(2))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(alphabet="0123456789/ .\u0663\t+-x", max_size=24),
                 st.builds(lambda a, b: f"{a}/{b}", st.integers(0, 10**10), st.integers(0, 10**10)),
                 st.text(max_size=12)))
def test_restart_intensity_plain_form_reads_as_the_pattern_does(text):
    try:
        got = runcmd.parse_intensity(text)
    except runcmd.BadValue:
        got = None
    assert got == _intensity_by_pattern(text)
