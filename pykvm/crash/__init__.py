"""Crash layer: snapshots of dead guests, the ELF core writer, and core inspection (see DESIGN.md).

Import the submodules (core, inspect, reader, snapshot) directly: this package imports
nothing itself, so writing a core never pays for the inspector's capstone and pyelftools.
"""

_WHERE = {"CoreWriteError": "core", "write_core": "core", "build_report": "inspect", "render_text": "inspect",
          "CoreFile": "reader", "CoreFormatError": "reader", "open_core": "reader", "TRIGGERS": "snapshot",
          "CrashSnapshot": "snapshot", "VcpuState": "snapshot", "read_crash_info": "snapshot"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """The package's public names, imported from their submodule on first use."""
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'pykvm.crash' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
