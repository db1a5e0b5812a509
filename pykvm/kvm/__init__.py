"""KVM bindings: cffi declarations of linux/kvm.h and thin objects for the KVM fds.

Layers above use ``Kvm.open()`` -> ``Kvm.create_vm()`` -> ``Vm.create_vcpu()``; see
abi.py (structs), ioctls.py (request numbers), constants.py (KVM_* values), exits.py
(kvm_run's exit fields as struct layouts), routing.py (GSI routes).
"""

from .abi import ffi
from .errors import KvmError, KvmUnavailable
from .system import Kvm
from .vcpu import RUN_OFFSETS, Vcpu, regs_to_dict, sregs_to_dict
from .routing import GsiRouting, irqchip_route, msi_address, msi_route
from .vm import Vm

__all__ = [
    "Kvm", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "ffi",
    "RUN_OFFSETS", "regs_to_dict", "sregs_to_dict", "irqchip_route", "msi_route",
    "GsiRouting", "msi_address",
]
