"""bus layer of pykvm (see DESIGN.md)."""
