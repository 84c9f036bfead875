"""CPU kernels (Numba njit)."""
ALGORITHMS = {}
