"""Saved VMs: the state file `pykvm ctl save` writes and `pykvm restore` continues from.

state (the format: a JSON header under a digest, then memory runs, with each part's
capture and apply).
"""
