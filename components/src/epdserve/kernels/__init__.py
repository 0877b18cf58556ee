"""Hand-written kernels for hot paths that torch's own ops serve poorly (see cpu.c)."""
