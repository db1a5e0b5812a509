"""TOML documents parsed once: tomllib's result kept as JSON in the cache directory, keyed by the text's hash.

Every `pykvm run` checks the device descriptions of the devices it builds (TOML files that
change only with pykvm itself); importing tomllib and parsing them cost ~4 ms a run. A cache
entry holds the text's hash and a digest of the data and is used only when both match;
anything else is parsed again and the entry rewritten. Callers validate the data exactly as
they would tomllib's (the cache saves the parsing, never the checking).
"""

from __future__ import annotations

import json
import os

from . import digest, paths

FORMAT = 1


class TomlError(ValueError):
    """The text is not valid TOML (tomllib's message)."""


def _digest(data) -> str:
    return digest.hexdigest(json.dumps([FORMAT, data], sort_keys=True).encode())


def entry_path(text_hash: str) -> str:
    """Where the cache entry of a text with this digest lives."""
    return os.path.join(paths.cache_root(), "toml", f"{text_hash[:40]}.json")


def read_entry(path: str, text_hash: str):
    """The cached data for the text with this hash, or None when absent or not exactly what was stored."""
    try:
        with open(path, "rb") as f:
            entry = json.loads(f.read(1 << 20))
        if (isinstance(entry, dict) and entry.get("text") == text_hash and isinstance(entry.get("data"), dict)
                and entry.get("digest") == _digest(entry["data"])):
            return entry["data"]
    except (OSError, ValueError, RecursionError):
        pass
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
    _store(path, text_hash, data)
    return data


def _store(path: str, text_hash: str, data: dict) -> None:
    try:
        text = json.dumps({"text": text_hash, "data": data, "digest": _digest(data)})
    except (TypeError, ValueError):
        return        # dates and times have no JSON form: such a document is parsed every time
    if json.loads(text)["data"] != data:
        return        # a value JSON would not give back as it was (a NaN): parse every time
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:   # an unwritable cache costs speed, not correctness
        try:
            os.unlink(tmp)
        except OSError:
            pass
