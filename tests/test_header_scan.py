"""The ABI header's plain-string scans (run on every start, so without `re`) agree with the patterns they replace."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.startup import ffigen
from pykvm.paths import ABI_HEADER


def _header_text() -> str:
    with open(ABI_HEADER) as f:
        return f.read()


_DEFINE = re.compile(r"^\s*#\s*define\s+(PYKVM_\w+)\s+\S", re.M)        # what abi.py used to findall
_DIRECTIVE = re.compile(r"^\s*#\s*(if|ifdef|ifndef|else|elif|endif|include|error|pragma)\b")   # ffigen's
_GUARD = re.compile(r"^\s*#\s*define\s+\w+_H\s*$")


def _cdef_by_pattern(text: str) -> str:
    return "\n".join("" if _DIRECTIVE.match(line) or _GUARD.match(line) else line for line in text.splitlines())


# Pieces headers are made of, and the characters where the patterns' classes and str methods could part
# ways: Unicode whitespace (some of it a line break to splitlines but not to ^), Unicode letters and digits.
FRAGMENTS = ["#", "# ", "define", "define ", "#define ", "PYKVM_", "PYKVM_A", "_H", "ABI_H", " ", "\t", "\n", "\r\n",
             "\n\n", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\u3000", "1", "0x10", "é", "٣", "Ⅻ", "(", "/*",
             "*/", "if", "ifdef", "ifndef", "else", "elif", "endif", "include", "error", "pragma", "x", "_", "<", "!"]
SPACE = st.sampled_from(["", "", " ", "  ", "\t", "\n", "\xa0", "\x1f", "\u3000", "\x0b", "\x85"])
DIRECTIVE = st.sampled_from(["define"] * 12 + ["defin", "definex", "if", "ifdef", "ifndef", "ifx", "if_", "ifé",
                             "else", "elif", "endif", "include", "error", "pragma", "undef", ""])
NAME = st.sampled_from(["PYKVM_A"] * 6 + ["PYKVM_B"] * 6 + ["PYKVM_ABI_H", "PYKVM_", "PYKVM_é", "PYKVM_٣", "PYKVM_A-B", "_H", "A_H", "__H",
                        "X_H", "PYKVM_X(y)", "pykvm_a", "FOO", ""])
VALUE = st.sampled_from(["", "", "", "1", "1", "0x4d", "(1 << 3)", "/* c */", "#", "é"])
LINE = st.builds(lambda *parts: "".join(parts), SPACE, st.sampled_from(["#", "#", "#", "", "x#"]), SPACE, DIRECTIVE,
                 SPACE, NAME, SPACE, VALUE, SPACE)
EOL = st.sampled_from(["\n", "\n", "\r\n", "\n\n", "\x1c", "\u2028", ""])
headers = st.one_of(st.lists(st.tuples(LINE, EOL).map("".join), max_size=8).map("".join),
                    st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join), st.text(max_size=40))


def test_the_real_header_gives_the_patterns_names_and_cdef():
    text = _header_text()
    assert abi.define_names(text) == _DEFINE.findall(text)
    assert len(abi.constants) > 100 and all(n in abi.define_names(text) for n in abi.constants)
    assert ffigen.header_cdef(text) == _cdef_by_pattern(text)


def test_every_line_of_the_real_header_alone_and_rearranged():
    lines = _header_text().splitlines(keepends=True)
    for text in lines + ["".join(reversed(lines)), "".join(lines[1::2]), "".join(line.strip() for line in lines)]:
        assert abi.define_names(text) == _DEFINE.findall(text)
        assert ffigen.header_cdef(text) == _cdef_by_pattern(text)


@settings(max_examples=1500, deadline=None)
@given(headers)
@example("#define PYKVM_A\n#define PYKVM_B 1\n")      # the first match ends at the second line's '#'
@example("#define PYKVM_A\n\n  x #define PYKVM_B 1")
@example("#\n define\n PYKVM_A\n 1\n#define PYKVM_B 2")
def test_define_names_are_the_patterns_findall(text):
    assert abi.define_names(text) == _DEFINE.findall(text)


@settings(max_examples=1500, deadline=None)
@given(headers)
@example("#define _H\n#define A_H\n #  define PYKVM_ABI_H \n#ifé\n#if_x\n#if(1)\n#endif\n")
def test_header_cdef_drops_exactly_the_patterns_lines(text):
    assert ffigen.header_cdef(text) == _cdef_by_pattern(text)
