"""Layer 0: pure compute on numpy, scipy and torch: no I/O, no CLI words, no heavy adapters."""
