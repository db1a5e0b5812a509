"""TOML documents parsed once: tomllib's result kept in the cache directory, keyed by the text's hash.

Every `pykvm run` checks the device descriptions of the devices it builds (TOML files that
change only with pykvm itself); importing tomllib and parsing them cost ~4 ms a run. An entry
(pykvm/startup/cachefile.py's format, which loads without json or re) holds the text's hash and the
data, under a digest of both; it is used only when it is intact and names this text. Anything
else is parsed again and the entry rewritten. Callers validate the data exactly as they would
tomllib's (the cache saves the parsing, never the checking).
"""

from __future__ import annotations

import os

from .. import paths
from . import cachefile, digest


class TomlError(ValueError):
    """The text is not valid TOML (tomllib's message)."""


def entry_path(text_hash: str) -> str:
    """Where the cache entry of a text with this digest lives."""
    return os.path.join(paths.cache_root(), "toml", f"{text_hash[:40]}.entry")


def read_entry(path: str, text_hash: str):
    """The cached data for the text with this hash, or None when absent or not exactly what was stored."""
    entry = cachefile.read(path)
    if type(entry) is dict and entry.keys() == {"text", "data"} and entry["text"] == text_hash \
            and type(entry["data"]) is dict:
        return entry["data"]
    return None


def loads(text: str) -> dict:
    """tomllib.loads(text), from the cache when a valid entry is there; TomlError when not valid TOML."""
    text_hash = digest.hexdigest(text.encode("utf-8", "surrogatepass"))
    path = entry_path(text_hash)
    data = read_entry(path, text_hash)
    if data is not None:
        return data
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TomlError(str(e)) from None
    try:
        cachefile.write(path, {"text": text_hash, "data": data})
    except (TypeError, ValueError):
        pass          # dates and times have no form in the cache: such a document is parsed every time
    return data
