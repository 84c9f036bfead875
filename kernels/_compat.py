"""Compatibility shims applied before numba-cuda is imported.

numba-cuda 0.30.4 registers an overload for numpy.row_stack, which numpy 2.5 removed, so its first kernel
compile fails with "module 'numpy' has no attribute 'row_stack'" (seen with the pinned toolchain). row_stack was an
alias of vstack; restoring the alias (only where it is missing) lets users with numpy >= 2.5 run the CUDA kernels.
"""
import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
