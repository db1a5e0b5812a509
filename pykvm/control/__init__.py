"""The management interface: `pykvm ctl` and the unix socket a running VM serves it on.

server (the socket, one JSON request a line, run on the machine's main thread), commands
(the command table and its handlers), client (what `pykvm ctl` sends). Only a run with
--control, and `pykvm ctl`, load it.
"""
