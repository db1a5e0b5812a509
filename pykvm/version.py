"""pykvm's version, a leaf every layer may read (boot info, state files, `pykvm --version`)."""

__version__ = "0.1.0"   # as pyproject.toml's [project] version
