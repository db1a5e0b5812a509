"""Host services offered on the partition bus, one module each."""
