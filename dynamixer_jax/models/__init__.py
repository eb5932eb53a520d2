"""The models of the papers, as plain Flax linen modules, and their registry.

``create_model(name, **overrides)`` builds a registered model (``list_models()``); ``overrides``
replace its constructor arguments (``num_classes``, ``drop_path_rate``, ``dtype``, ``image_size``,
...). This package imports nothing else of dynamixer_jax: it is the paper's modules only.
"""

from typing import Any, Callable

import flax.linen as nn

from dynamixer_jax.models.dynamixer import (DynaMixer, DynaMixerBlock, DynaMixerOp, Entry,
                                            TokenMixing)
from dynamixer_jax.models.mixer import MixerBlock, MlpBlock, MlpMixer

__all__ = ["DynaMixer", "DynaMixerBlock", "DynaMixerOp", "Entry", "TokenMixing", "MixerBlock",
           "MlpBlock", "MlpMixer", "create_model", "list_models", "model_kwargs"]


def _dynamixer_entries(depths, widths, segments, reduced_dim, transitions):
  return tuple(Entry(depth, width, s, reduced_dim, 3.0, t)
               for depth, width, s, t in zip(depths, widths, segments, transitions))


# The official conf_dynamixer.py lists, entry by entry (spec section 1).
_DYNAMIXERS = {
    "dynamixer_s": dict(entries=_dynamixer_entries(
        [4, 3, 8, 3], [192, 384, 384, 384], [8, 16, 16, 16], 2, [True, False, False, False])),
    "dynamixer_m": dict(entries=_dynamixer_entries(
        [4, 3, 14, 3], [256, 256, 512, 512], [8, 8, 16, 16], 2, [False, True, False, False])),
    "dynamixer_l": dict(entries=_dynamixer_entries(
        [8, 8, 16, 4], [256, 512, 512, 512], [8, 16, 16, 16], 8, [True, False, False, False])),
}

# MLP-Mixer paper, Table 1: (patch, blocks, hidden, tokens MLP, channels MLP).
_MIXERS = {
    "mixer_s32": (32, 8, 512, 256, 2048),
    "mixer_s16": (16, 8, 512, 256, 2048),
    "mixer_b32": (32, 12, 768, 384, 3072),
    "mixer_b16": (16, 12, 768, 384, 3072),
    "mixer_l32": (32, 24, 1024, 512, 4096),
    "mixer_l16": (16, 24, 1024, 512, 4096),
    "mixer_h14": (14, 32, 1280, 640, 5120),
}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}

for _name, _kwargs in _DYNAMIXERS.items():
  _DEFAULTS[_name] = dict(_kwargs, num_classes=1000, image_size=224, patch_size=7)
  _REGISTRY[_name] = DynaMixer
for _name, (_p, _n, _h, _t, _c) in _MIXERS.items():
  _DEFAULTS[_name] = dict(patch_size=_p, num_blocks=_n, hidden_dim=_h, tokens_mlp_dim=_t,
                          channels_mlp_dim=_c, num_classes=1000, image_size=224)
  _REGISTRY[_name] = MlpMixer


def list_models() -> list[str]:
  """Names accepted by ``create_model``."""
  return sorted(_REGISTRY)


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
  """The constructor arguments ``create_model(name, **overrides)`` would use."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}. Registered models: {', '.join(list_models())}.")
  cls = _REGISTRY[name]
  unknown = sorted(set(overrides) - set(cls.__dataclass_fields__) - {"parent", "name"})
  if unknown:
    valid = sorted(f for f in cls.__dataclass_fields__ if f not in ("parent", "name"))
    raise ValueError(f"{name} has no argument(s) {unknown}. Valid arguments: {valid}.")
  kwargs = dict(_DEFAULTS[name], **overrides)
  if "entries" in overrides:
    kwargs["entries"] = tuple(Entry(*e) if not isinstance(e, Entry) else e
                              for e in overrides["entries"])
  return kwargs


def create_model(name: str, **overrides: Any) -> nn.Module:
  """Build a registered model, e.g. ``create_model('dynamixer_s', num_classes=10)``.

  Weights are loaded elsewhere: ``dynamixer_jax.weights.load(path)`` returns the model, its
  variables and its metadata.
  """
  kwargs = model_kwargs(name, **overrides)  # an unknown name or argument: a clear error
  return _REGISTRY[name](**kwargs)
