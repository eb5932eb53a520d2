"""The metadata format: the small JSON that makes a checkpoint usable without its config.

Every step of a ``train.py`` run and every ``convert`` output holds, beside the arrays, the model
(family, registered name if it is one, constructor arguments), its classes, its eval
preprocessing (``preprocessing.EvalPreprocessing``) and, for runs, the config. ``read`` is the
one reader of it; ``for_model`` and ``for_official`` the two writers.
"""

import json
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn

from dynamixer_jax import models, preprocessing

FILENAME = os.path.join("metadata", "metadata")  # inside a step folder (orbax's JSON item)
FAMILIES = {"dynamixer": models.DynaMixer, "mixer": models.MlpMixer}
# Constructor arguments that do not change which architecture a model is.
_NOT_ARCHITECTURE = ("num_classes", "drop_path_rate", "remat", "dtype")


def imagenet_class_names() -> list[str]:
  """The 1,000 ImageNet-1k class names in label order (shipped as ``imagenet_classes.txt``).

  Taken from the human-readable list that tensorflow-datasets ships (Apache-2.0,
  ``tensorflow_datasets/datasets/siscore/labels.py``), in the order of the sorted WordNet ids.
  """
  with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def model_kwargs(model: nn.Module) -> dict[str, Any]:
  """The constructor arguments of ``model`` that describe its weights (JSON-friendly)."""
  out = {}
  for field in model.__dataclass_fields__:
    if field in ("parent", "name", "dtype"):
      continue
    value = getattr(model, field)
    out[field] = [list(e) for e in value] if field == "entries" else value
  return out


def family(model: nn.Module) -> str:
  return next(name for name, cls in FAMILIES.items() if isinstance(model, cls))


def registered_name(model: nn.Module) -> Optional[str]:
  """The registered name whose architecture ``model`` has (any class count), else None."""
  arch = lambda m: {k: v for k, v in model_kwargs(m).items() if k not in _NOT_ARCHITECTURE}
  for name in models.list_models():
    candidate = models.create_model(name)
    if type(candidate) is type(model) and arch(candidate) == arch(model):
      return name
  return None


def describe(model: nn.Module) -> str:
  """What to call a model in logs and CLI output: its registered name only when it is that
  model, e.g. 'dynamixer_s', else e.g. 'dynamixer (custom: 2 entries, 32 px)'."""
  name = registered_name(model)
  if name:
    return name
  if isinstance(model, models.DynaMixer):
    return f"dynamixer (custom: {len(model.entries)} entries, {model.image_size} px)"
  size = f", {model.image_size} px" if model.image_size else ""
  return (f"mixer (custom: patch {model.patch_size}, {model.num_blocks} blocks, width "
          f"{model.hidden_dim}{size})")


def for_model(model: nn.Module, *, class_names: Sequence[str],
              preprocessing_record: preprocessing.EvalPreprocessing, dataset: str = "",
              config_json: Optional[str] = None, source: Optional[str] = None) -> dict[str, Any]:
  """The metadata of weights for ``model``."""
  kwargs = model_kwargs(model)
  return dict(
      model=dict(family=family(model), name=registered_name(model), kwargs=kwargs),
      description=describe(model), num_classes=kwargs.get("num_classes", 0),
      class_names=list(class_names), preprocessing=preprocessing_record.to_dict(),
      dataset=dataset, **({"config": config_json} if config_json is not None else {}),
      **({"source": source} if source is not None else {}))


def for_official(model: nn.Module, source: str) -> dict[str, Any]:
  """Metadata for official weights: ImageNet classes and the official eval preprocessing.

  DynaMixer (timm): bicubic, ImageNet mean/std, shorter side to floor(size / crop_pct) with
  crop_pct 0.9 (S, M) or 0.875 (L), center crop. MLP-Mixer (vit_jax): pixels to [-1, 1]
  (mean = std = 0.5) and a plain resize to the model's size.
  """
  size = model.image_size or 224
  if isinstance(model, models.MlpMixer):
    prep = preprocessing.EvalPreprocessing(image_size=size, resize=size, crop="resize",
                                           mean=(0.5,) * 3, std=(0.5,) * 3)
  else:
    crop_pct = 0.875 if registered_name(model) == "dynamixer_l" else 0.9
    prep = preprocessing.EvalPreprocessing(image_size=size, resize=math.floor(size / crop_pct))
  classes = model.num_classes
  imagenet = classes == 1000
  return for_model(model, class_names=imagenet_class_names() if imagenet else [],
                   preprocessing_record=prep, dataset="imagenet2012" if imagenet else "",
                   source=source)


def read(step_dir: str) -> dict[str, Any]:
  """The metadata of one step folder (no array is read)."""
  path = os.path.join(step_dir, FILENAME)
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"The metadata {path} cannot be read ({type(e).__name__}: {e}).") from None
  if not isinstance(metadata, dict):
    raise ValueError(f"The metadata {path} is not a JSON object.")
  return metadata


def build_model(metadata: dict[str, Any], **overrides: Any) -> nn.Module:
  """The model a checkpoint's metadata describes; ``overrides`` (e.g. ``dtype``) replace
  constructor arguments."""
  described = metadata.get("model")
  if not (isinstance(described, dict) and isinstance(described.get("kwargs"), dict)):
    raise ValueError("The checkpoint's metadata does not describe a model (no 'model' with "
                     "'kwargs'); it was not written by train.py or convert.")
  kwargs = dict(described["kwargs"], **overrides)
  if "family" in described:
    cls = FAMILIES[described["family"]]
    if "entries" in kwargs:
      kwargs["entries"] = tuple(models.Entry(*e) for e in kwargs["entries"])
    return cls(**kwargs)
  return models.create_model(described["name"], **kwargs)  # written before 'family' existed


def eval_preprocessing(metadata: dict[str, Any]) -> preprocessing.EvalPreprocessing:
  return preprocessing.EvalPreprocessing.from_dict(metadata["preprocessing"])


def class_names(metadata: dict[str, Any]) -> list[str]:
  """The checkpoint's class names; ImageNet names for unnamed 1000-class weights; else indices."""
  names, count = list(metadata.get("class_names") or []), metadata["num_classes"]
  if len(names) == count:
    return names
  if count == 1000:
    return imagenet_class_names()
  return [f"class {i}" for i in range(count)]
