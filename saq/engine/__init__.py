"""Lightning pieces: the per-unit reconstruction module, its Trainer and callbacks."""
