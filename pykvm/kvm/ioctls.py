"""KVM ioctl request numbers, encoded like <asm-generic/ioctl.h> from the cffi struct sizes.

Nothing here is a pasted hex number: a wrong struct declaration in abi.py would give a
wrong request number, and the ABI cross-check test compares both against the C headers.
"""

from .abi import ffi

# <asm-generic/ioctl.h> layout (x86): nr 8 bits, type 8 bits, size 14 bits, dir 2 bits.
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction, type_, nr, size):
    """Encode an ioctl request number from its direction, type, number and argument size."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _size(ctype):
    # Accept an int (already a size) or a C type name such as "struct kvm_regs".
    return ctype if isinstance(ctype, int) else ffi.sizeof(ctype)


def _IO(type_, nr):
    """Request number of an ioctl without a pointer argument."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, ctype):
    """Request number of an ioctl where the kernel writes *ctype to userspace."""
    return _IOC(_IOC_READ, type_, nr, _size(ctype))


def _IOW(type_, nr, ctype):
    """Request number of an ioctl where the kernel reads *ctype from userspace."""
    return _IOC(_IOC_WRITE, type_, nr, _size(ctype))


def _IOWR(type_, nr, ctype):
    """Request number of an ioctl that both reads and writes *ctype."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(ctype))


KVMIO = 0xAE

# For structs ending in a flexible array the size encoded is that of the fixed header
# (sizeof(struct kvm_cpuid2) == 8), exactly as in the C macros.

# /dev/kvm (system) ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)  # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, "struct kvm_cpuid2")

# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, "struct kvm_userspace_memory_region")
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, "struct kvm_dirty_log")
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, "struct kvm_clear_dirty_log")
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, "struct kvm_irq_level")
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, "struct kvm_coalesced_mmio_zone")
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, "struct kvm_coalesced_mmio_zone")
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6a, "struct kvm_irq_routing")
KVM_IRQFD = _IOW(KVMIO, 0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, "struct kvm_ioeventfd")
KVM_SET_CLOCK = _IOW(KVMIO, 0x7b, "struct kvm_clock_data")
KVM_GET_CLOCK = _IOR(KVMIO, 0x7c, "struct kvm_clock_data")
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xa5, "struct kvm_msi")

# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, "struct kvm_interrupt")
KVM_GET_REGS = _IOR(KVMIO, 0x81, "struct kvm_regs")
KVM_SET_REGS = _IOW(KVMIO, 0x82, "struct kvm_regs")
KVM_GET_SREGS = _IOR(KVMIO, 0x83, "struct kvm_sregs")
KVM_SET_SREGS = _IOW(KVMIO, 0x84, "struct kvm_sregs")
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, "struct kvm_translation")
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, "struct kvm_msrs")
KVM_SET_MSRS = _IOW(KVMIO, 0x89, "struct kvm_msrs")
KVM_GET_FPU = _IOR(KVMIO, 0x8c, "struct kvm_fpu")
KVM_SET_FPU = _IOW(KVMIO, 0x8d, "struct kvm_fpu")
KVM_GET_LAPIC = _IOR(KVMIO, 0x8e, "struct kvm_lapic_state")
KVM_SET_LAPIC = _IOW(KVMIO, 0x8f, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, "struct kvm_mp_state")
KVM_NMI = _IO(KVMIO, 0x9a)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9b, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9f, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xa0, "struct kvm_vcpu_events")
KVM_GET_XCRS = _IOR(KVMIO, 0xa6, "struct kvm_xcrs")
KVM_SET_XCRS = _IOW(KVMIO, 0xa7, "struct kvm_xcrs")
KVM_GET_XSAVE = _IOR(KVMIO, 0xa4, "struct kvm_xsave")
KVM_SET_XSAVE = _IOW(KVMIO, 0xa5, "struct kvm_xsave")

# system, VM and vCPU (per capability)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, "struct kvm_enable_cap")
KVM_GET_STATS_FD = _IO(KVMIO, 0xce)

# request number -> name, for error messages
IOCTL_NAMES = {v: k for k, v in list(globals().items())
               if k.startswith("KVM_") and isinstance(v, int)}
