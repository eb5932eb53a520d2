"""Our weights on disk: find a checkpoint, read only its weights, load any source, save.

A train.py workdir, its ``checkpoints/`` folder, one step folder, a folder written by
``python -m dynamixer_jax.convert``, an official DynaMixer ``.pth`` or an MLP-Mixer ``.npz`` all
load with ``load``. Only the weights are read from our checkpoints (a partial restore of the
``state`` item, never the optimizer state), so a checkpoint loads without knowing the optimizer
that wrote it.
"""

import os
import re
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dynamixer_jax.weights import metadata as metadata_lib
from dynamixer_jax.weights import official, trees

Variables = dict[str, Any]
OFFICIAL_TORCH = (".pth", ".pth.tar", ".pt", ".tar")
OFFICIAL_NPZ = (".npz",)
STATE, METADATA = "state", "metadata"  # the two items of every step folder


def is_step_dir(path: str) -> bool:
  """A finished step folder: both items and orbax's commit marker."""
  return (os.path.isdir(os.path.join(path, STATE)) and os.path.isdir(os.path.join(path, METADATA))
          and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")))


def find_step_dir(path: str) -> str:
  """The newest step folder under a workdir, a checkpoints folder, or ``path`` itself."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}: expected a train.py workdir, its "
                            "checkpoints/ folder, a step folder, a .pth or a .npz.")
  if is_step_dir(path):
    return path
  for folder in (path, os.path.join(path, "checkpoints")):
    if not os.path.isdir(folder):
      continue
    steps = [int(n) for n in os.listdir(folder)
             if re.fullmatch(r"\d+", n) and is_step_dir(os.path.join(folder, n))]
    if steps:
      return os.path.join(folder, str(max(steps)))
  raise FileNotFoundError(f"{path!r} holds no finished checkpoint (no <step>/state and "
                          "<step>/metadata folders, here or under checkpoints/).")


def _step_checkpointer() -> ocp.Checkpointer:
  """Reads one step folder as orbax wrote it (both items), so orbax finds its own metadata."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
  registry.add(METADATA, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def read_params(step_dir: str, use_ema: bool = True) -> tuple[Any, str]:
  """``(params as numpy, 'ema_params' or 'params')``: a partial restore of the 'state' item."""
  checkpointer = _step_checkpointer()
  tree = checkpointer.metadata(step_dir).item_metadata[STATE]
  tree = getattr(tree, "tree", tree)
  if not hasattr(tree, "keys") or "params" not in tree:
    raise ValueError(f"{step_dir}/{STATE} does not hold a train state with 'params' (found "
                     f"{sorted(tree) if hasattr(tree, 'keys') else type(tree).__name__}).")
  which = "ema_params" if use_ema and tree.get("ema_params") else "params"
  wanted = {which: tree[which]}
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted)
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(step_dir, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)}))
  return restored[STATE][which], which


def load(path: str, use_ema: bool = True, num_classes: Optional[int] = None, seed: int = 0,
         **overrides: Any) -> tuple[nn.Module, Variables, dict[str, Any]]:
  """Any supported weights as ``(model, variables, metadata)``; EMA weights when present.

  ``num_classes`` other than the source's replaces the head with a fresh one (seeded by
  ``seed``); ``overrides`` go to the model (``dtype``, ``drop_path_rate``).
  """
  path = os.fspath(path)
  if path.endswith(OFFICIAL_TORCH):
    model, variables = official.load_torch_dynamixer(path, use_ema=use_ema, **overrides)
    metadata = metadata_lib.for_official(model, path)
  elif path.endswith(OFFICIAL_NPZ):
    model, variables = official.load_mixer_npz(path, **overrides)
    metadata = metadata_lib.for_official(model, path)
  else:
    step_dir = find_step_dir(path)
    metadata = metadata_lib.read(step_dir)
    params, which = read_params(step_dir, use_ema)
    model = metadata_lib.build_model(metadata, **overrides)
    flat = {p: np.asarray(v, np.float32)
            for p, v in flax.traverse_util.flatten_dict(params).items()}
    model, variables = trees.assemble(model, flat, f"The checkpoint {step_dir}")
    metadata = dict(metadata, source=f"{step_dir} ({which})")
  if num_classes is not None and num_classes != model.num_classes:
    model, variables = trees.reset_head(model, variables, num_classes, seed)
    metadata = dict(metadata, num_classes=num_classes, class_names=[],
                    model=dict(metadata["model"], kwargs=metadata_lib.model_kwargs(model)),
                    description=metadata_lib.describe(model))
  return model, variables, metadata


def save(directory: str, variables: Variables, metadata: dict[str, Any]) -> str:
  """Write weights in train.py's checkpoint layout (step 0, no optimizer state) and wait for the
  write; returns the step folder. Raises ``OSError`` if it could not be written."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new output folder "
                          "or delete it.")
  params = jax.tree.map(jnp.asarray, trees.unfreeze(variables)["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params}
  with ocp.CheckpointManager(directory, item_names=(STATE, METADATA),
                             options=ocp.CheckpointManagerOptions(create=True)) as manager:
    manager.save(0, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(metadata)}))
    manager.wait_until_finished()
  step_dir = os.path.join(directory, "0")
  if not is_step_dir(step_dir):
    raise OSError(f"The weights could not be written to {directory} (see the error above).")
  return step_dir
