"""The gdb remote stub: a debugger front end on a running Machine.

stub (the session: packets in, stop replies out, breakpoints), rsp (the remote serial
protocol's framing and packet parsing), registers (gdb's x86-64 register file and its
mapping to KVM's structures), hwdebug (debug registers for hardware breakpoints and
watchpoints). Only `pykvm run --gdb` loads it.
"""
