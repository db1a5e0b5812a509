"""The docs keep up with the code: every `pykvm` command and option is documented in docs/, every
link points at a file that exists, and the README's commands run with the statuses and output it shows."""

from __future__ import annotations

import re
import subprocess

import pytest

from pykvm import cli, runcmd

from .helpers import ROOT
from .test_crash_support import gdb_or_skip
from .test_examples import pykvm_on_path

DOCS = ROOT / "docs"
README = ROOT / "README.md"

# README shell lines not run here, each with the reason (a part of an `a && b` line matching one
# is dropped and the rest run)
NOT_RUN = {
    r"\bpip install\b": "installs into the environment running the tests (pykvm is importable already)",
    r"\bpython3 -m pytest\b": "the test suite itself, which is running now",
}


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def _mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_subcommand_is_documented():
    text = _docs_text()
    missing = [name for name in cli.main.commands if f"`pykvm {name}" not in text]
    assert not missing, f"not in docs/: {missing}"


def test_every_run_option_is_documented_in_both_parsers():
    text = (DOCS / "cli.md").read_text()
    clicked = {o for p in cli.main.commands["run"].params for o in (*p.opts, *p.secondary_opts)
               if o.startswith("-") and o not in ("-h", "--help")}
    fast = {d for o in runcmd.RUN_OPTIONS for d in o.decls}
    assert clicked == fast                      # the click command is built from the fast path's table
    missing = sorted(o for o in fast if not _mentions(text, o))
    assert not missing, f"pykvm run options not in docs/cli.md: {missing}"


def test_every_option_of_the_other_commands_is_documented():
    text = (DOCS / "cli.md").read_text()
    missing = sorted(f"{name} {o}" for name, cmd in cli.main.commands.items() if name != "run"
                     for p in cmd.params for o in p.opts if o.startswith("--") and o != "--help"
                     and not _mentions(text, o))
    assert not missing, f"not in docs/cli.md: {missing}"


def test_every_link_points_at_something_that_exists():
    for page in [README, *sorted(DOCS.glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = target.split("#", 1)[0]
            if path:
                assert (page.parent / path).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def readme_commands() -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """The README's shell lines as (command, expected status), and the (part, reason) left out."""
    run, left_out = [], []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            command, _hash, comment = line.partition("  #")
            m = re.search(r"\bstatus (\d+)", comment)
            kept = []
            for part in command.split(" && "):
                reason = next((why for pat, why in NOT_RUN.items() if re.search(pat, part)), None)
                if reason:
                    left_out.append((part.strip(), reason))
                else:
                    kept.append(part.strip())
            if kept and kept != [""]:
                run.append((" && ".join(kept), int(m.group(1)) if m else 0))
    return run, left_out


def test_readme_commands_are_found_and_only_install_and_suite_lines_are_left_out():
    run, left_out = readme_commands()
    assert ("pykvm run hello", 0) in run                       # the set-up line, after its install part
    assert any(c.startswith("pykvm inspect ") for c, _s in run) and any(c.startswith("gdb ") for c, _s in run)
    assert {part for part, _why in left_out} == {"python3 -m pip install .", "python3 -m pip install -q -e '.[test]'",
                                                 "python3 -m pytest -q"}


@pytest.mark.kvm
@pytest.mark.gdb
def test_readme_commands_run_with_the_statuses_and_output_it_shows(tmp_path):
    gdb_or_skip()
    run, _left_out = readme_commands()
    script = ["set -u"]
    for i, (command, status) in enumerate(run):
        script += [f"echo '@@ {i}: {command.replace(chr(39), '')}'", command,
                   f"rc=$?; [ $rc -eq {status} ] || {{ echo \"@@ status $rc, expected {status}\"; exit 1; }}"]
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=pykvm_on_path(tmp_path),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-4000:]
    assert "Hello from pykvm!" in out and "verdict: OK" in out
    # what the README shows of the crash: pykvm run's reason, inspect's backtrace, gdb's frames and variable
    text = README.read_text()
    shown = re.search(r"## When a guest crashes\n(.*?)\n## ", text, re.S).group(1)
    reason = re.search(r"\(`(exception #PF.*?) \.\.\.`\)", shown, re.S).group(1).replace("\n", " ")
    assert reason in out
    backtrace = re.search(r"\(`(level3\+0x19 <- .*?)`\)", shown, re.S).group(1).replace("\n", " ").split(" <- ")
    for frame in backtrace:
        assert re.search(rf"#\d+\s+0x[0-9a-f]+ {re.escape(frame)}\n", out), frame
    gdb_lines = re.search(r"```\n(#0 .*?)```", shown, re.S).group(1).splitlines()
    for line in gdb_lines:
        if line != "...":
            assert line in out, line
