"""Augmentation on the device, inside the jitted train step (JAX only, no TensorFlow).

Every draw folds (seed, step, position in the global batch) into its key, so a batch is the same
on any mesh and after a resume.
"""
