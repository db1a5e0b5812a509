"""One exit-status table, three places: pykvm/errors.py, docs/cli.md's table and `pykvm --help`."""

from __future__ import annotations

import re

from pykvm import errors

from .helpers import ROOT, pykvm

INTERRUPTED = 130   # Ctrl-C: the shell's convention, not an error class


def from_errors() -> set[int]:
    return {v for k, v in vars(errors).items() if k.startswith("EXIT_")} | {INTERRUPTED}


def docs_table() -> dict[int, str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    table = text.split("## Exit statuses", 1)[1].split("\n\n", 2)[1]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.*) \|$", table, re.M)}


def help_statuses() -> set[int]:
    r = pykvm("--help")
    assert r.returncode == 0
    block = r.stdout.decode().split("Exit statuses", 1)[1].split("\n\n", 1)[0]
    return {int(m) for line in block.splitlines()[1:] for m in re.findall(r"(?:^|\s{2,})(\d{1,3})\s+(?=\S)", line)}


def test_every_status_in_errors_is_in_the_docs_and_help():
    assert set(docs_table()) == from_errors()
    assert help_statuses() == from_errors()


def test_every_error_class_has_a_documented_distinct_status():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PykvmError)
               and c is not errors.PykvmError]
    statuses = [c.exit_status for c in classes]
    assert len(statuses) == len(set(statuses))
    assert set(statuses) <= set(docs_table())
