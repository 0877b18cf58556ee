"""Run-time helpers shared by every layer (no dependencies inside the package)."""
