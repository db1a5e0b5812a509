"""pykvm: a userspace virtual machine monitor for x86-64 Linux, driving /dev/kvm directly."""

__version__ = "0.1.0"
