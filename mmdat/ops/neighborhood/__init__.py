"""2D neighborhood attention with relative position bias (NATTEN's NA2D; DAT++'s ``N`` blocks):
the gather formulation (:mod:`.reference`), the CPU op (:mod:`.cpu`: C kernels, or halo tiles
in PyTorch without a compiler) and the CUDA path (:mod:`.cuda`)."""
