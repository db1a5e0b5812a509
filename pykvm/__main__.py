"""`python -m pykvm` runs the CLI."""

from .runcmd import entry

entry()
