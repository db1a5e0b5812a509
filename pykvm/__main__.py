"""`python -m pykvm` runs the CLI."""

from .cli import entry

entry()
