"""Benchmarks: ``python -m dynamixer_jax.benchmark`` (timing.py), the official PyTorch model
beside it (torch_reference.py, its own process) and forward FLOPs from XLA (flops.py).

Imports no TensorFlow: accelerator images often have none.
"""
