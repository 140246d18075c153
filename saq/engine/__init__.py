"""Lightning pieces: the per-unit reconstruction module driven by Fabric."""
