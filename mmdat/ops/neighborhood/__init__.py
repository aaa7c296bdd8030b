"""2D neighborhood attention with relative position bias (NATTEN's NA2D; DAT++'s ``N`` blocks):
the gather formulation (:mod:`.reference`), the CPU op (:mod:`.cpu`: C kernels, or halo tiles
in PyTorch without a compiler), the CUDA path (:mod:`.cuda`) and NATTEN's ops where it is
installed and agrees (:mod:`.natten`)."""
