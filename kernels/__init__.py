"""cnnfast.kernels: hand-written Numba kernels (cpu/, cuda/) and the contract they share (contract.py).

Installed as ``cnnfast.kernels`` (setup.cfg maps this folder there); nothing here imports ``cnnfast``
above it. Kernels compute into arrays they are given; validation and allocation happen in cnnfast.api.
"""
