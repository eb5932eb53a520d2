"""DynaMixer and MLP-Mixer in JAX/Flax: models, official-weight converters and training."""

__version__ = "0.1.0"
