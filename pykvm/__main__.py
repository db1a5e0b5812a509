"""`python -m pykvm` runs the CLI."""

from .cli import main

main()
