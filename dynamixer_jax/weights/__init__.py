"""Weights in and out: official DynaMixer ``.pth`` and MLP-Mixer ``.npz`` files, and our own.

``load(path) -> (model, variables, metadata)`` reads any supported source; ``save`` writes our
checkpoint layout; ``official`` converts between the official layouts and ours; ``metadata`` is
the JSON beside every checkpoint; ``trees`` compares and assembles parameter trees.
"""

from dynamixer_jax.weights.official import (adapt_mixer_resolution, load_mixer_npz,
                                            load_torch_dynamixer, to_torch_state_dict)
from dynamixer_jax.weights.store import find_step_dir, load, save

__all__ = ["adapt_mixer_resolution", "find_step_dir", "load", "load_mixer_npz",
           "load_torch_dynamixer", "save", "to_torch_state_dict"]
