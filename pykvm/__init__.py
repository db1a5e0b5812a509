"""pykvm: a userspace virtual machine monitor for x86-64 Linux, driving /dev/kvm directly.

The Python API (pykvm/api.py): VM, Outcome, ExpectError, Timeout, EOF, VMError, parse_size.
They load on first use, so `import pykvm` stays cheap for the command line.
"""

from .version import __version__

_API = ("VM", "Outcome", "ExpectError", "Timeout", "EOF", "VMError", "parse_size")
__all__ = ["__version__", *_API]


def __getattr__(name):
    """`pykvm.VM` and friends, imported from pykvm.api when first asked for."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pykvm' has no attribute {name!r}")
