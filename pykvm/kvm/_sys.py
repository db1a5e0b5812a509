"""The one generic ioctl wrapper used by the Kvm, Vm and Vcpu objects (not KVM_RUN)."""

import errno

from .abi import ffi, lib
from .errors import KvmError
from .ioctls import IOCTL_NAMES

_ioctl = lib.ioctl
_ULONG = "unsigned long"


def ioctl(fd, request, arg=0, name=None):
    """Issue ioctl(fd, request, arg) and return its result; raise KvmError on failure.

    ``arg`` is an int (passed by value as unsigned long) or a cdata pointer. cffi
    requires every variadic argument to be a cdata of an exact type, hence the cast.
    """
    if not isinstance(arg, ffi.CData):
        arg = ffi.cast(_ULONG, arg)
    while True:
        ret = _ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = ffi.errno
        # A signal used to kick vCPU threads may land on any thread; these ioctls are
        # safe to repeat, so an interruption is not an error for the caller.
        if err != errno.EINTR:
            raise KvmError(err, name or IOCTL_NAMES.get(request, f"ioctl {request:#x}"))


class FdOwner:
    """Base of the objects wrapping a KVM file descriptor: `with` closes it."""

    def close(self):
        """Release the descriptor (subclasses)."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
