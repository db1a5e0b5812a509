"""Start-up machinery: what makes `pykvm run` cheap to start and safe to confine.

digest (cache keys), ffigen (pre-parsed cffi modules), cachefile and tomlcache (checked
cache entries for device descriptions), seccomp_program (the compiled filter), lateimport
(modules held in memory for after the sandbox), artifacts (firmware and guest builds).
Nothing here knows about VMs; everything above may use it.
"""
