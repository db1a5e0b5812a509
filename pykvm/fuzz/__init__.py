"""Snapshot fuzzing: a guest kernel as an AFL++ forkserver target (`pykvm fuzz`)."""
