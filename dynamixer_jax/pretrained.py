"""Weights from any source as ``(model, variables, metadata)``: our checkpoints and official files.

A train.py workdir, its ``checkpoints/`` folder, one step folder, a folder written by
``python -m dynamixer_jax.convert``, an official DynaMixer ``.pth`` or an MLP-Mixer ``.npz``.
Only the weights are read from our checkpoints (never the optimizer state), so a checkpoint
loads without knowing the optimizer that wrote it.
"""

import json
import math
import os
import re
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamixer_jax import convert, models

Variables = dict[str, Any]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_class_names() -> list[str]:
  """The 1,000 ImageNet-1k class names in label order (shipped as ``imagenet_classes.txt``).

  Taken from the human-readable list that tensorflow-datasets ships (Apache-2.0,
  ``tensorflow_datasets/datasets/siscore/labels.py``), in the order of the sorted WordNet ids.
  """
  with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


# --------------------------------------------------------------------------- finding the step


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "metadata"))


def find_step_dir(path: str) -> str:
  """The newest step folder under a workdir, a checkpoints folder, or ``path`` itself."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}: expected a train.py workdir, its "
                            "checkpoints/ folder, a step folder, a .pth or a .npz.")
  if _is_step_dir(path):
    return path
  for folder in (path, os.path.join(path, "checkpoints")):
    if not os.path.isdir(folder):
      continue
    steps = [int(n) for n in os.listdir(folder)
             if re.fullmatch(r"\d+", n) and _is_step_dir(os.path.join(folder, n))
             and os.path.exists(os.path.join(folder, n, "_CHECKPOINT_METADATA"))]
    if steps:
      return os.path.join(folder, str(max(steps)))
  raise FileNotFoundError(f"{path!r} holds no finished checkpoint (no <step>/state and "
                          "<step>/metadata folders, here or under checkpoints/).")


def read_metadata(step_dir: str) -> dict[str, Any]:
  with open(os.path.join(step_dir, "metadata", "metadata")) as f:
    return json.load(f)


def read_params(step_dir: str, use_ema: bool = True) -> tuple[Any, str]:
  """``(params as numpy, 'ema_params' or 'params')``: a partial restore of the 'state' item."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(step_dir, "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path)
  tree = getattr(tree, "item_metadata", tree)  # a StepMetadata in newer orbax
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"{path} does not hold a train state with 'params' (found "
                     f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}).")
  which = "ema_params" if use_ema and tree.get("ema_params") else "params"
  wanted = {which: tree[which]}
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted)
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return restored[which], which


# --------------------------------------------------------------------------- loading


def default_metadata(model: nn.Module, name: str, source: str) -> dict[str, Any]:
  """Metadata for official weights: ImageNet classes and the official eval preprocessing.

  DynaMixer (timm): bicubic, ImageNet mean/std, shorter side to floor(size / crop_pct) with
  crop_pct 0.9 (S, M) or 0.875 (L), center crop. MLP-Mixer (vit_jax): pixels to [-1, 1]
  (mean = std = 0.5) and a plain resize to the model's size.
  """
  kwargs = _model_kwargs(model)
  size = kwargs.get("image_size") or 224
  if isinstance(model, models.MlpMixer):
    prep = dict(image_size=size, resize=size, interpolation="bicubic", crop="resize",
                mean=[0.5] * 3, std=[0.5] * 3)
  else:
    crop_pct = 0.875 if name == "dynamixer_l" else 0.9
    prep = dict(image_size=size, resize=int(math.floor(size / crop_pct)),
                interpolation="bicubic", crop="center", mean=list(IMAGENET_MEAN),
                std=list(IMAGENET_STD))
  classes = kwargs.get("num_classes", 0)
  return dict(model=dict(name=name, kwargs=kwargs), num_classes=classes,
              class_names=imagenet_class_names() if classes == 1000 else [],
              preprocessing=prep, dataset="imagenet2012" if classes == 1000 else "", source=source)


def load(path: str, use_ema: bool = True, num_classes: Optional[int] = None, seed: int = 0,
         **overrides: Any) -> tuple[nn.Module, Variables, dict[str, Any]]:
  """Any supported weights as ``(model, variables, metadata)``; EMA weights when present.

  ``num_classes`` other than the checkpoint's replaces the head with a fresh one (seeded by
  ``seed``); ``overrides`` go to the model (``dtype``, ``drop_path_rate``).
  """
  path = os.fspath(path)
  if path.endswith((".pth", ".pth.tar", ".pt", ".tar")):
    model, variables = convert.load_torch_dynamixer(path, use_ema=use_ema, **overrides)
    metadata = default_metadata(model, registered_name(model), path)
  elif path.endswith(".npz"):
    model, variables = convert.load_mixer_npz(path, **overrides)
    metadata = default_metadata(model, registered_name(model), path)
  else:
    step_dir = find_step_dir(path)
    metadata = read_metadata(step_dir)
    params, which = read_params(step_dir, use_ema)
    kwargs = dict(metadata["model"]["kwargs"], **overrides)
    model = models.create_model(metadata["model"]["name"], **kwargs)
    flat = {p: np.asarray(v, np.float32)
            for p, v in flax.traverse_util.flatten_dict(params).items()}
    model, variables = convert._finish(model, flat, metadata["num_classes"], None, seed)  # pylint: disable=protected-access
    metadata = dict(metadata, source=f"{step_dir} ({which})")
  if num_classes is not None and num_classes != metadata["num_classes"]:
    model, variables = reset_head(model, variables, num_classes, seed)
    metadata = dict(metadata, num_classes=num_classes, class_names=[],
                    model=dict(metadata["model"], kwargs=_model_kwargs(model)))
  return model, variables, metadata


def reset_head(model: nn.Module, variables: Variables, num_classes: int,
               seed: int = 0) -> tuple[nn.Module, Variables]:
  """A new ``num_classes`` head, as the model's own init makes it; every other weight kept."""
  flat = {p: np.asarray(v) for p, v in
          flax.traverse_util.flatten_dict(convert._unfreeze(variables)["params"]).items()}  # pylint: disable=protected-access
  return convert._finish(model, flat, model.num_classes, num_classes, seed)  # pylint: disable=protected-access


def registered_name(model: nn.Module) -> str:
  """The registered name whose architecture ``model`` has, else its family's base name."""
  skip = ("num_classes", "drop_path_rate")
  arch = {k: v for k, v in _model_kwargs(model).items() if k not in skip}
  for name in models.list_models():
    candidate = models.create_model(name)
    if type(candidate) is type(model) and arch == {
        k: v for k, v in _model_kwargs(candidate).items() if k not in skip}:
      return name
  return "mixer_b16" if isinstance(model, models.MlpMixer) else "dynamixer_s"


def _model_kwargs(model: nn.Module) -> dict[str, Any]:
  """The constructor arguments of ``model`` that describe the weights (JSON-friendly)."""
  out = {}
  for field in model.__dataclass_fields__:
    if field in ("parent", "name", "dtype"):
      continue
    value = getattr(model, field)
    if field == "entries":
      value = [list(e) for e in value]
    out[field] = value
  return out


# --------------------------------------------------------------------------- saving


def save(directory: str, variables: Variables, metadata: dict[str, Any]) -> str:
  """Write weights in train.py's checkpoint layout (step 0, no optimizer state); its step dir."""
  from dynamixer_jax import checkpointing  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new output folder "
                          "or delete it.")
  params = jax.tree.map(jnp.asarray, convert._unfreeze(variables)["params"])  # pylint: disable=protected-access
  checkpointer = checkpointing.Checkpointer(directory, keep=1)
  checkpointer.save_now(0, {"step": jnp.zeros((), jnp.int32), "params": params}, metadata)
  checkpointer.close()
  return os.path.join(directory, "0")
