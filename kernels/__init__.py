"""Triton kernels (installed as archer_mcore.kernels); a torch reference beside each."""
