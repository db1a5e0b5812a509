"""Sizes as people write them: the plain-string parser reads exactly what its documented pattern does."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import errors
from pykvm.units import parse_size

_PATTERN = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.I)   # what units.py used to compile
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _by_pattern(text: str):
    """The size the pattern gives (None: refused); its case-folded non-ASCII unit letters are refused too."""
    m = _PATTERN.match(text)
    if not m or not (m.group(2) + (m.group(3) or "")).isascii():
        return None    # e.g. KELVIN SIGN for K: the pattern matched it and the unit table then had no entry
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _parsed(text: str):
    try:
        return parse_size(text)
    except errors.MemorySizeError:
        return None


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(alphabet="0123456789 \t\n\xa0\u2003\x1f\u0663KMGTkmgtiIbBx.\u212a\u0131-+", max_size=12),
                 st.builds(lambda n, sp, u, b, tail: f"{sp}{n}{sp}{u}{b}{tail}", st.integers(0, 10**12),
                           st.sampled_from(["", " ", "\t", "\u2003"]), st.sampled_from(list("KMGTkmgt") + ["", "x"]),
                           st.sampled_from(["", "B", "b", "iB", "IB", "ib", "i", "iBB", " B"]),
                           st.sampled_from(["", " ", "\n", " \n ", "\x00"])),
                 st.text(max_size=10)))
def test_parse_size_reads_as_the_pattern_does(text):
    assert _parsed(text) == _by_pattern(text)


@pytest.mark.parametrize("text,size", [("128M", 128 << 20), ("1G", 1 << 30), ("65536K", 64 << 20), ("64", 64 << 20),
                                       (" 2 GiB ", 2 << 30), ("1t", 1 << 40), ("3MB", 3 << 20), ("5 b", 5 << 20)])
def test_sizes_people_write(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "1 M B", "1MiBB", "1X", "1\u212a", "0x10M"])
def test_not_sizes_are_a_memory_size_error(text):
    with pytest.raises(errors.MemorySizeError):
        parse_size(text)
