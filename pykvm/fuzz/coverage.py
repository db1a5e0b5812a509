"""The coverage map the guest writes: AFL's SysV shared memory, or a private page set without AFL.

Either way it becomes guest RAM at PYKVM_FUZZ_MAP_ADDR through its own memslot, so the guest's
trace-pc callback writes AFL's map directly: no copy per run.
"""

from __future__ import annotations

import mmap

from .. import abi
from ..errors import UsageError

MAP_SLOT = 300             # above RAM (0..15), hot-add (16..63), windows (64..) and bus transfer pages (200..)
_CDEF = """
void *shmat(int shmid, const void *shmaddr, int shmflg);
int shmdt(const void *shmaddr);
int shmctl(int shmid, int cmd, void *buf);
"""
IPC_STAT = 2
SHMID_DS_SIZE = 112        # struct shmid_ds on x86-64; shm_segsz is its first field after ipc_perm (48 bytes)
SEGSZ_OFFSET = 48


class CoverageMap:
    """PYKVM_FUZZ_MAP_SIZE bytes of coverage at a host address."""

    def __init__(self, shm_id: int | None = None):
        self.size = abi.PYKVM_FUZZ_MAP_SIZE
        self._ffi = self._lib = self._mm = None
        if shm_id is None:
            self._mm = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            from ..memory.region import buffer_address

            self.host_addr = buffer_address(self._mm)
            self.view = memoryview(self._mm)
            return
        from ..startup import ffigen

        ffi = self._ffi = ffigen.load("shm", _CDEF)
        lib = self._lib = ffi.dlopen(None)
        ds = ffi.new("char[]", SHMID_DS_SIZE)
        if lib.shmctl(shm_id, IPC_STAT, ds) != 0:
            raise UsageError(f"__AFL_SHM_ID={shm_id}: no such shared memory segment (errno {ffi.errno})")
        segsz = int.from_bytes(ffi.buffer(ds)[SEGSZ_OFFSET:SEGSZ_OFFSET + 8], "little")
        if segsz < self.size:
            raise UsageError(f"AFL's coverage map is {segsz} bytes; pykvm fuzz needs {self.size} "
                             f"(AFL_MAP_SIZE of at least {self.size})")
        addr = lib.shmat(shm_id, ffi.NULL, 0)
        if int(ffi.cast("intptr_t", addr)) == -1:
            raise UsageError(f"cannot attach AFL's coverage map (shm id {shm_id}, errno {ffi.errno})")
        self._addr = addr
        self.host_addr = int(ffi.cast("uintptr_t", addr))
        self.view = memoryview(ffi.buffer(addr, self.size))

    def map_into(self, vm) -> None:
        """Make the map guest RAM at PYKVM_FUZZ_MAP_ADDR (the KVM VM fd object `vm`)."""
        vm.set_user_memory_region(MAP_SLOT, abi.PYKVM_FUZZ_MAP_ADDR, self.size, self.host_addr)

    def clear(self) -> None:
        """Zero the map (AFL clears its own before each run; a reproducer run clears here)."""
        self.view[:] = bytes(self.size)

    def edges(self) -> int:
        """How many map entries are non-zero."""
        return self.size - bytes(self.view).count(0)

    def close(self) -> None:
        """Unmap a private map."""
        self.view.release()
        if self._mm is not None:
            self._mm.close()
        # AFL's segment stays attached until the process exits: shmdt is not in the sandbox's policy
