"""Triton kernels for the CUDA path (attention, MoE)."""
