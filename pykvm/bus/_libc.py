"""The few libc calls the bus needs that Python's mmap module lacks: fixed-address mmap and a full fence."""

from __future__ import annotations

from ..startup import ffigen

ffi = ffigen.load("buslibc", """
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int pthread_spin_trylock(int *lock);
""")
lib = ffi.dlopen(None)

MAP_FAILED = 2**64 - 1  # (void *)-1 as an integer

# pthread_spin_trylock executes a locked read-modify-write whether or not it succeeds (glibc's
# x86 versions: lock cmpxchg or xchg), which orders every earlier store before every later
# load: the store-load fence the ring signalling rule needs. The word is private and never
# unlocked, so the call never blocks and never changes anything anyone reads.
_fence_word = ffi.new("int *")
_trylock = lib.pthread_spin_trylock


def full_fence() -> None:
    """A store-load memory barrier (x86 locked instruction)."""
    _trylock(_fence_word)
