"""Layer 0: pure compute (numpy, scipy, torch; no I/O, no CLI words)."""
