"""The `pykvm` command (bin/pykvm and `python -m pykvm`): a plain `run` without click, the rest through click.

The dispatcher sits above both front ends so neither imports the other's caller: cli.py builds
its click options from runcmd's table, and runcmd never needs click.
"""

import sys


def entry() -> None:
    """Run `pykvm ...` from sys.argv: runcmd's fast path when it surely applies, else the click CLI."""
    from .runcmd import fast_run

    if not fast_run(sys.argv[1:]):
        from .cli import entry as click_entry

        click_entry()


if __name__ == "__main__":
    entry()
