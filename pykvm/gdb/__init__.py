"""The gdb remote stub: a debugger front end on a running Machine.

stub (GdbStub: puts the parts together; guest memory by virtual address), endpoint (who may
connect: 0600 unix sockets, TCP peers of the VM's owner only), session (one connection's
packets, dispatched through one table), stops (vCPU threads and the server agreeing on who
runs; W/X at the end), vcpuregs (g/G/p/P on KVM's structures), breakpoints (Z/z, bounded),
rsp (the remote serial protocol's framing and packet parsing), registers (gdb's x86-64
register file), hwdebug (debug registers). Only `pykvm run --gdb` loads it.
"""
