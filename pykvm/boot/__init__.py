"""boot layer of pykvm (see DESIGN.md)."""
