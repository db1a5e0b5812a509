"""The /dev/kvm system file descriptor."""

import errno
import os
import stat

from . import ioctls
from ._sys import FdOwner, ioctl
from .abi import ffi
from .constants import KVM_API_VERSION
from .errors import KvmError, KvmUnavailable
from .vm import Vm


class Kvm(FdOwner):
    """An open /dev/kvm: capability queries, CPUID/MSR lists, and VM creation."""

    def __init__(self, fd, path="/dev/kvm"):
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path="/dev/kvm"):
        """Open the KVM device, raising KvmUnavailable with advice when it cannot be used."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable.missing(path) from None
        except PermissionError:
            raise KvmUnavailable.permission(path) from None
        except IsADirectoryError:
            raise KvmUnavailable.not_a_device(path) from None
        except OSError as e:
            # ENXIO/ENODEV: the node exists but no driver registered the minor number.
            if e.errno in (errno.ENXIO, errno.ENODEV):
                raise KvmUnavailable.no_module(path) from None
            raise
        kvm = cls(fd, path)
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise KvmUnavailable.not_a_device(path)
            try:
                version = kvm.api_version()
            except KvmError as e:
                raise KvmUnavailable.not_kvm(path, e.errno) from None
            if version != KVM_API_VERSION:
                raise KvmUnavailable.api_version(path, version)
        except BaseException:
            kvm.close()
            raise
        return kvm

    def close(self):
        """Close the file descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return f"<Kvm fd={self.fd} path={self.path!r}>"

    def api_version(self):
        """KVM_GET_API_VERSION (always 12 on a supported kernel)."""
        return ioctl(self.fd, ioctls.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the system fd: 0 if absent, else a cap-specific value."""
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self):
        """Size in bytes of the per-vCPU mmap area (kvm_run plus the PIO and MMIO pages)."""
        return ioctl(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries=256):
        """KVM_GET_SUPPORTED_CPUID as a 'struct kvm_cpuid2 *' whose nent is the real count."""
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            try:
                ioctl(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
                return cpuid
            except KvmError as e:
                # E2BIG: the buffer was too small; the kernel does not say how big to go.
                if e.errno != errno.E2BIG or max_entries >= 1 << 16:
                    raise
                max_entries *= 2

    def msr_index_list(self):
        """KVM_GET_MSR_INDEX_LIST: the MSR indices KVM saves and restores."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0})
        try:
            ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, probe, "KVM_GET_MSR_INDEX_LIST")
        except KvmError as e:
            # E2BIG is the expected answer to a zero-length query: nmsrs now holds the count.
            if e.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, msr_list, "KVM_GET_MSR_INDEX_LIST")
        return list(msr_list.indices[0:msr_list.nmsrs])

    def create_vm(self, vm_type=0):
        """KVM_CREATE_VM: a new VM with no memory and no vCPUs."""
        fd = ioctl(self.fd, ioctls.KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
        return Vm(self, fd)
