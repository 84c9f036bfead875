"""cnnfast: hand-written Numba convolution kernels for the CPU and NVIDIA GPUs."""
__version__ = "0.1.0"
