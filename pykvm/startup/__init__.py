"""Start-up machinery: what makes `pykvm run` cheap to start and safe to confine.

digest (content hashes), ffigen (pre-parsed cffi modules), generated (where generated
modules live: the wheel or the source tree, never the cache), prebuild (the bindings a
wheel ships), safedir (directories no other user can write), seccomp_program (the filter,
compiled each run), lateimport (modules held in memory for after the sandbox), artifacts
(firmware and guest builds in the cache). Nothing here knows about VMs; everything above
may use it.
"""
