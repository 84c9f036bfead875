"""CUDA kernels (Numba CUDA)."""
ALGORITHMS = {}
