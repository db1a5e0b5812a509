"""Errors meant for people, each with its own process exit status.

Exit statuses of `pykvm run` (also in docs/cli.md):
  0        the guest powered off cleanly
  odd      the guest's own exit code through the debug-exit port: (value << 1) | 1
  even     pykvm's verdicts below
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_KVM_UNAVAILABLE = 4
EXIT_BAD_IMAGE = 6
EXIT_IMAGE_DOES_NOT_FIT = 8
EXIT_DEVICE_CONFIG = 10
EXIT_UNKNOWN_GUEST = 12
EXIT_TOOLCHAIN = 14
EXIT_GUEST_CRASH = 16
EXIT_TIMEOUT = 18
EXIT_VMM_ERROR = 20
EXIT_BAD_MEMORY_SIZE = 22
EXIT_BAD_CORE = 24
EXIT_BAD_STATE = 26
EXIT_OUTPUT_UNWRITABLE = 28
EXIT_SANDBOX = 30               # a blocked system call stopped the VMM, or the sandbox could not be set up
EXIT_BAD_NUMA = 32               # a --numa-node/--numa/--numa-distance spec that cannot describe a machine
EXIT_BAD_TOPOLOGY = 34           # a `pykvm up` topology file that does not validate
EXIT_UNSAFE_CACHE = 36           # the cache directory (or one above it) is not yours alone: another user could write it


class PykvmError(Exception):
    """An error with a one-line message for the user and a distinct exit status."""

    exit_status = EXIT_VMM_ERROR


class UsageError(PykvmError):
    """A bad option value."""

    exit_status = EXIT_USAGE


class BadImageError(PykvmError):
    """The kernel file is not something pykvm can boot (truncated, not x86, unknown format)."""

    exit_status = EXIT_BAD_IMAGE


class ImageDoesNotFitError(PykvmError):
    """The kernel (or initrd) does not fit in guest RAM or collides with the firmware area."""

    exit_status = EXIT_IMAGE_DOES_NOT_FIT


class DeviceConfigError(PykvmError):
    """Devices that cannot be wired as asked (overlapping ranges, unknown options)."""

    exit_status = EXIT_DEVICE_CONFIG


class UnknownGuestError(PykvmError):
    """A bundled guest name that does not exist."""

    exit_status = EXIT_UNKNOWN_GUEST


class ToolchainError(PykvmError):
    """gcc/binutils/make missing or a firmware/guest build failed."""

    exit_status = EXIT_TOOLCHAIN


class MemorySizeError(PykvmError):
    """A guest memory size that is not usable (zero, not a page multiple, too small)."""

    exit_status = EXIT_BAD_MEMORY_SIZE


class BadCoreError(PykvmError):
    """A file given to `pykvm inspect` that is not a readable pykvm core."""

    exit_status = EXIT_BAD_CORE


class BadStateError(PykvmError):
    """A saved-VM file that is corrupt (bad magic, checksum, truncated) or incompatible (format version, devices)."""

    exit_status = EXIT_BAD_STATE


class OutputPathError(PykvmError):
    """A place pykvm was told to write (--serial FILE, --crash-dir) that it cannot open or write."""

    exit_status = EXIT_OUTPUT_UNWRITABLE


class SandboxError(PykvmError):
    """The seccomp sandbox could not be set up (libseccomp missing, crash directory unusable)."""

    exit_status = EXIT_SANDBOX


class NumaSpecError(PykvmError):
    """A vNUMA spec that cannot describe a machine (overlapping cpus, sizes that do not add up, a vCPU in no node)."""

    exit_status = EXIT_BAD_NUMA


class TopologyError(PykvmError):
    """A topology file for `pykvm up` that does not validate."""

    exit_status = EXIT_BAD_TOPOLOGY


class UnsafeCacheError(PykvmError):
    """A cache directory pykvm would read back from that another user can write, or that it cannot create."""

    exit_status = EXIT_UNSAFE_CACHE
