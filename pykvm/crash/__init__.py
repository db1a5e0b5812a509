"""Crash layer: snapshots of dead guests, the ELF core writer, and core inspection (see DESIGN.md)."""

from .core import CoreWriteError, write_core
from .inspect import build_report, render_text
from .reader import CoreFile, CoreFormatError, open_core
from .snapshot import TRIGGERS, CrashSnapshot, VcpuState, read_crash_info

__all__ = ["TRIGGERS", "CoreFile", "CoreFormatError", "CoreWriteError", "CrashSnapshot", "VcpuState",
           "build_report", "open_core", "read_crash_info", "render_text", "write_core"]
