"""TOML parsed once and cached: a cached document is exactly tomllib's, a damaged entry is parsed again."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.startup import cachefile, digest, tomlcache
from pykvm.devices import description

TEXT = 'name = "serial"\nsummary = "x"\n[[registers]]\nname = "a"\noffset = 0x10\nratio = 1.5\nflag = true\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_BUILD_DIR", str(tmp_path))
    return tmp_path


def path_of(text: str) -> str:
    return tomlcache.entry_path(digest.hexdigest(text.encode()))


def test_a_cached_document_is_tomllibs(cache):
    assert tomlcache.loads(TEXT) == tomllib.loads(TEXT)     # parsed and stored
    entry = cachefile.loads(open(path_of(TEXT), "rb").read())
    assert entry == {"text": digest.hexdigest(TEXT.encode()), "data": tomllib.loads(TEXT)}
    assert tomlcache.loads(TEXT) == tomllib.loads(TEXT)     # read back


def test_a_valid_looking_entry_with_other_data_is_not_trusted(cache):
    tomlcache.loads(TEXT)
    path = path_of(TEXT)
    raw = open(path, "rb").read()
    at = raw.index(b"serial")
    open(path, "wb").write(raw[:at] + b"evil!!" + raw[at + 6:])      # the digest no longer matches
    assert tomlcache.loads(TEXT)["name"] == "serial"
    assert cachefile.loads(open(path, "rb").read())["data"]["name"] == "serial"   # rewritten


@pytest.mark.parametrize("make_entry", [
    lambda h: {"text": "0" * 64, "data": {"name": "evil"}},            # intact, but for another text
    lambda h: {"data": {"name": "evil"}},
    lambda h: {"text": h, "data": ["evil"]},                            # the right text, the wrong shape
    lambda h: {"text": h, "data": {"name": "evil"}, "extra": 1},
    lambda h: [h, {"name": "evil"}],
])
def test_an_intact_entry_of_another_text_or_shape_is_not_used(cache, make_entry):
    path = path_of(TEXT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(cachefile.dumps(make_entry(digest.hexdigest(TEXT.encode()))))
    assert tomlcache.loads(TEXT) == tomllib.loads(TEXT)
    assert cachefile.loads(open(path, "rb").read())["data"] == tomllib.loads(TEXT)   # rewritten


def test_invalid_toml_is_an_error_cached_or_not(cache):
    with pytest.raises(tomlcache.TomlError):
        tomlcache.loads("name = ")
    with pytest.raises(description.DescriptionError, match="not valid TOML"):
        description.parse("name = ", "x.toml")


def test_dates_are_parsed_each_time_not_cached(cache):
    text = "when = 1979-05-27T07:32:00Z\n"
    assert tomlcache.loads(text) == tomllib.loads(text)
    assert not (cache / "toml").exists() or not list((cache / "toml").iterdir())


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_mutated_entry_gives_tomllibs_result(tmp_path_factory, data):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYKVM_BUILD_DIR", str(tmp_path_factory.mktemp("c")))
        _mutate_and_read(data)


def _mutate_and_read(data) -> None:
    tomlcache.loads(TEXT)
    path = path_of(TEXT)
    raw = bytearray(open(path, "rb").read())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    open(path, "wb").write(raw)
    assert tomlcache.loads(TEXT) == tomllib.loads(TEXT)


def test_every_shipped_description_reads_the_same_through_the_cache(cache):
    for p in sorted(Path(description.HERE).glob("*.toml")):
        text = p.read_text()
        assert tomlcache.loads(text) == tomllib.loads(text) == tomlcache.loads(text)
