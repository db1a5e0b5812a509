"""Exceptions of the KVM binding layer."""

import os

from .constants import KVM_API_VERSION


class KvmError(OSError):
    """A KVM ioctl failed; ``str()`` reads "KVM_CREATE_VM failed: Operation not permitted"."""

    def __init__(self, err, ioctl, detail=None):
        super().__init__(err, os.strerror(err))
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self):
        text = f"{self.ioctl} failed: {self.strerror}"
        return f"{text} ({self.detail})" if self.detail else text

    def __reduce__(self):
        # OSError pickles through its args; keep the ioctl name across processes.
        return (type(self), (self.errno, self.ioctl, self.detail))


class KvmUnavailable(Exception):
    """KVM cannot be used on this host; the message says what to do about it.

    ``reason`` is one of: "missing", "permission", "not-a-device", "not-kvm",
    "no-module", "api-version".
    """

    def __init__(self, message, reason, path="/dev/kvm"):
        super().__init__(message)
        self.reason = reason
        self.path = path

    @classmethod
    def missing(cls, path):
        """The device node does not exist."""
        return cls(
            f"{path} does not exist: KVM is not available on this host. Enable "
            "virtualization (VT-x/AMD-V) in the firmware, load the module "
            "(`modprobe kvm_intel` or `modprobe kvm_amd`), or on a cloud VM enable "
            "nested virtualization.",
            "missing", path)

    @classmethod
    def permission(cls, path):
        """The device node exists but this user may not open it read-write."""
        return cls(
            f"{path}: permission denied. Add your user to the kvm group "
            "(`sudo usermod -aG kvm $USER`, then log in again) or run "
            f"`sudo setfacl -m u:$USER:rw {path}`.",
            "permission", path)

    @classmethod
    def not_a_device(cls, path):
        """The path is not a character device."""
        return cls(f"{path} is not a character device, so it cannot be KVM; "
                   "pass the path of the KVM device (normally /dev/kvm).",
                   "not-a-device", path)

    @classmethod
    def not_kvm(cls, path, err):
        """The device does not answer KVM_GET_API_VERSION."""
        return cls(f"{path} is not a KVM device (KVM_GET_API_VERSION failed: "
                   f"{os.strerror(err)}); pass the path of the KVM device.",
                   "not-kvm", path)

    @classmethod
    def no_module(cls, path):
        """The node exists but no driver is behind it."""
        return cls(f"{path} exists but no KVM driver is loaded: load it with "
                   "`modprobe kvm_intel` or `modprobe kvm_amd` and check `dmesg` "
                   "for why it did not load (virtualization disabled in firmware?).",
                   "no-module", path)

    @classmethod
    def api_version(cls, path, version):
        """The kernel speaks a KVM API this code was not written for."""
        return cls(f"{path}: KVM API version {version}, expected {KVM_API_VERSION}; "
                   "this kernel's KVM is not supported.",
                   "api-version", path)
