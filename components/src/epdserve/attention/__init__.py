"""The attention and KV-cache layer: paged KV storage and attention over packed sequence chunks,
model-agnostic (models build on it; kernels sit below it)."""
