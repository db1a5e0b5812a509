"""The content hash behind pykvm's cache keys and cache-entry digests, cheap to load.

Importing hashlib loads OpenSSL, ~2 ms of every `pykvm run`; its blake2b is CPython's own
`_blake2` module, which loads in ~0.1 ms, so it is taken from there directly.
"""

from __future__ import annotations

try:
    from _blake2 import blake2b as _blake2b
except ImportError:  # an interpreter built without its own BLAKE2: hashlib's (OpenSSL's) then
    from hashlib import blake2b as _blake2b


def new():
    """An incremental hasher (update(), hexdigest()) with a 32-byte BLAKE2b digest."""
    return _blake2b(digest_size=32)


def hexdigest(data: bytes) -> str:
    """The 64-hex-digit BLAKE2b-256 digest of data."""
    return _blake2b(data, digest_size=32).hexdigest()
