"""Checkpoints that resume by themselves: orbax, keep the newest N, JSON metadata beside each.

Each step directory holds ``state`` (the train state, saved shard by shard and restorable onto
any mesh) and ``metadata`` (a small JSON: model name and arguments, classes, preprocessing),
so a checkpoint can be used without knowing the config that made it.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every call to ``save`` (asynchronously) and restores the newest step."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "metadata"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    """Start writing ``state`` at ``step``; returns before the write ends (see ``wait``)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)), force=True)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """The state at ``step`` (default: newest), laid out as ``abstract_state``'s shardings."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
    return restored["state"], restored["metadata"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def read_metadata(directory: str, step: Optional[int] = None) -> dict[str, Any]:
  """The JSON metadata of a checkpoint directory, without reading any array."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "metadata"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory!r}.")
  return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every leaf: what ``restore`` needs to place arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
