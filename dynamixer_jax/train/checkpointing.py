"""Checkpoints that resume by themselves and survive crashes, corruption and full disks.

Each step directory holds ``state`` (the train state, saved shard by shard and restorable onto
any mesh) and ``metadata`` (a small JSON: model name and arguments, classes, preprocessing, the
run's config), so a checkpoint can be used without knowing the config that made it.

Guarantees (README "Failures and recovery"):
- Atomic steps: orbax writes a step into a temporary directory and renames it when complete, so
  a process killed mid-save leaves the previous steps intact; unfinished ones are ignored.
- A failed write (no space, no permission) is logged and counted, not raised: training goes on
  and the next interval retries. ``max_failures`` failures in a row stop the run. The partial
  directory of a failed step is left to orbax, which removes it at the next start (other
  writers of that step may still be running when the failure is seen).
- ``restore_newest_good`` skips (and moves aside) a step that cannot be read, and refuses a
  checkpoint of another model with the differing weight names and shapes.
"""

import json
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from dynamixer_jax.train import faults, integrity
from dynamixer_jax.weights import metadata as metadata_lib
from dynamixer_jax.weights import store, trees


class CheckpointWriteError(RuntimeError):
  """Checkpoints could not be written (several times in a row, or the one that had to be)."""


class _OnlyOurSteps:
  """orbax's standard step names, minus numbered folders that are not checkpoints (no ``state``
  or ``metadata`` item: a user's ``999/notes.txt``): orbax neither restores nor deletes those."""

  def __init__(self):
    self._standard = ocp.step.standard_name_format()

  def __getattr__(self, name):
    return getattr(self._standard, name)

  @staticmethod
  def is_checkpoint(path) -> bool:
    return any(os.path.isdir(os.path.join(os.fspath(path), item))
               for item in (store.STATE, store.METADATA))

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path):
    return (m for m in self._standard.find_all(base_path) if self.is_checkpoint(m.path))

  def find_step(self, base_path, step: int):
    found = self._standard.find_step(base_path, step)
    if not self.is_checkpoint(found.path):
      raise ValueError(f"{found.path} is not a checkpoint (no {store.STATE}/ or "
                       f"{store.METADATA}/ inside).")
    return found


# orbax saves an array that several devices hold whole (replicated parameters) "replica-parallel":
# each replica writes a slice. Cutting the slices compiles one small program per array shape:
# 176 programs, 6.5 of the 20 CPU-seconds of a 2-step run of the tests' tiny model on 8 devices,
# paid again by every new process. Below this many bytes per replica an array is written whole
# by one replica (orbax's own knob); large arrays keep the parallel write.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _write_small_arrays_whole() -> None:
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
    return
  try:
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        # Keep the default handler's per-array metadata store, so the files written stay the same.
        array_metadata_store=getattr(current, "_array_metadata_store", None))
  except TypeError:  # an orbax without the knob: its default stays
    return
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class NoReadableCheckpoint(ValueError):
  """Checkpoints exist but none can be used; refused rather than silently starting over."""


class Checkpointer:
  """Saves every call to ``save`` (asynchronously) and restores the newest readable step."""

  def __init__(self, directory: str, keep: int = 3, max_failures: int = 3):
    self.directory = os.path.abspath(directory)
    self.max_failures = max_failures
    self.failures = 0  # failed writes in a row
    self._pending: Optional[int] = None  # the step being written in the background
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True,
                                           step_name_format=_OnlyOurSteps())
    self._warn_about_foreign_folders()
    _write_small_arrays_whole()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add(store.STATE, args, ocp.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(store.METADATA, args, ocp.JsonCheckpointHandler)
    # Tests only (DYNAMIXER_FAULTS set): one more item, whose save fails or blocks on cue.
    self._fault = faults.checkpoint_item(marker_dir=os.path.dirname(self.directory))
    if self._fault is not None:
      registry.add(faults.ITEM, ocp.args.JsonSave, self._fault[0])
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)

  def _warn_about_foreign_folders(self) -> None:
    if not os.path.isdir(self.directory) or jax.process_index() > 0:
      return
    foreign = sorted(n for n in os.listdir(self.directory) if n.isdigit()
                     and not _OnlyOurSteps.is_checkpoint(os.path.join(self.directory, n)))
    if foreign:
      logging.warning("%s holds folder(s) %s that are not checkpoints (no %s/ inside); they are "
                      "left alone and never restored or deleted.", self.directory,
                      ", ".join(foreign), store.STATE)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    """Start writing ``state`` at ``step``; returns before the write ends (see ``wait``).

    A failure of this write or of the previous one is logged and counted; ``max_failures`` in
    a row raise ``CheckpointWriteError``.
    """
    self._settle()
    metadata = dict(metadata, checksums=integrity.checksums(state))  # verified at restore
    items = {store.STATE: ocp.args.StandardSave(state), store.METADATA: ocp.args.JsonSave(metadata)}
    if self._fault is not None:
      items[faults.ITEM] = self._fault[1](step)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._record_failure(step, e)
      return
    self._pending = step

  def save_now(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    """Write ``step`` and wait for it: for the last step and preemption, which cannot retry."""
    failures = self.failures
    self.save(step, state, metadata)
    self._settle()
    if self.failures > failures or step not in self.all_steps():
      raise CheckpointWriteError(
          f"The checkpoint of step {step} could not be written to {self.directory} (see the "
          f"error above). The newest good checkpoint is step {self._newest_good()}; free disk "
          "space or fix permissions, then rerun the same command to resume from it.")

  def wait(self) -> None:
    """Block until the background write is done (and account for its outcome)."""
    self._settle()

  def close(self) -> None:
    self._settle()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # already failing: finish the background writes quietly, keep the first error
      self._pending = None
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("While stopping, the checkpoint writer also failed: %s", e)

  def _settle(self) -> None:
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      if step not in self._manager.all_steps():
        raise OSError(f"step {step} is not among the committed checkpoints after its write")
    except Exception as e:  # pylint: disable=broad-except
      self._record_failure(step, e)
      return
    self.failures = 0

  def _record_failure(self, step: int, error: Exception) -> None:
    self.failures += 1
    self._manager.reload()  # forget the half-written step
    logging.error(
        "CHECKPOINT NOT SAVED: writing step %d to %s failed: %s: %s. Training goes on; the "
        "newest good checkpoint (step %s) is intact and the save is retried at the next "
        "interval (%d of %d failures in a row allowed). Free disk space or fix permissions.",
        step, self.directory, type(error).__name__, error, self._newest_good(), self.failures,
        self.max_failures)
    if self.failures >= self.max_failures:
      raise CheckpointWriteError(
          f"{self.failures} checkpoint writes in a row failed (the last: step {step} to "
          f"{self.directory}: {type(error).__name__}: {error}). Stopping rather than training "
          f"on without checkpoints. The newest good checkpoint is step {self._newest_good()}; "
          "free disk space or fix permissions, then rerun the same command to resume.")

  def _newest_good(self) -> Optional[int]:
    steps = [s for s in self._manager.all_steps() if s != self._pending]
    return max(steps) if steps else None

  # ------------------------------------------------------------------------- restoring

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """The state at ``step`` (default: newest), laid out as ``abstract_state``'s shardings."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        store.STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[store.STATE], self.metadata(step)

  def metadata(self, step: int) -> dict[str, Any]:
    return metadata_lib.read(os.path.join(self.directory, str(step)))

  def mark_evaluated(self, step: int) -> None:
    """Record in the metadata of the committed ``step`` that its evaluation is done (the one
    JSON file is replaced atomically; the arrays and their checksums are untouched)."""
    if jax.process_index() > 0:
      return
    path = os.path.join(self.directory, str(step), metadata_lib.FILENAME)
    try:
      metadata = self.metadata(step)
    except ValueError:
      return  # damaged: the next checkpoint writes it anew
    metadata["pending_eval"] = False
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(metadata, f)
    os.replace(tmp, path)

  def restore_newest_good(self, abstract_state: Any,
                          force: bool = False) -> Optional[tuple[Any, dict]]:
    """``(state, metadata)`` of the newest step that reads back intact, or None if there is none.

    A step that cannot be read (truncated, corrupted, its checksums wrong, NaN/Inf in it) is
    reported and, once an older good step is found, moved to ``<directory>.corrupt/`` so that
    later saves can reuse its number. A step whose metadata alone is damaged is restored all the
    same (its arrays cannot be verified; said in a warning). A step whose weights do not fit
    ``abstract_state`` is not corrupt but foreign: that raises ``ValueError`` naming the
    differences. When checkpoints exist but none is usable, ``NoReadableCheckpoint`` is raised
    (nothing is moved) unless ``force``: then all are moved aside and None is returned.
    """
    unusable = []
    for step in reversed(self.all_steps()):
      reason, restored = self._try_restore(abstract_state, step)
      if restored is not None:
        for bad, _ in unusable:
          self._quarantine(bad)
        return restored
      logging.error("Checkpoint step %d in %s cannot be used (%s); trying the next older one.",
                    step, self.directory, reason)
      unusable.append((step, reason))
    if not unusable:
      return None
    listing = "; ".join(f"step {step}: {reason}" for step, reason in unusable)
    if not force:
      raise NoReadableCheckpoint(
          f"None of the {len(unusable)} checkpoints in {self.directory} can be used ({listing}). "
          "Nothing was moved or overwritten. Copy them away if you want to inspect them; to start "
          "this workdir over, rerun with --config.force_resume=True (they are moved to "
          f"{self.directory}.corrupt/), or train in a new --workdir.")
    for step, _ in unusable:
      self._quarantine(step)
    logging.error("force_resume: no usable checkpoint in %s (moved to %s.corrupt: %s); starting "
                  "from scratch.", self.directory, self.directory, listing)
    return None

  def _try_restore(self, abstract_state: Any, step: int) -> tuple[str, Optional[tuple]]:
    """(why not, None) or ("", (state, metadata)) for one step."""
    try:
      metadata, metadata_error = self.metadata(step), None
    except ValueError as e:
      metadata, metadata_error = {}, e
    try:
      saved_tree = self._manager.item_metadata(step)[store.STATE]
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {str(e)[:300]}", None
    check_fits(saved_tree, abstract_state, step, self.directory)  # foreign: raises
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          store.STATE: ocp.args.StandardRestore(abstract_state)}))[store.STATE]
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {str(e)[:300]}", None
    problem = integrity.problems(restored, metadata.get("checksums"))
    if problem:
      return problem, None
    if metadata_error is not None:
      logging.warning("Step %d: %s Its arrays read back (and are finite) but cannot be checked "
                      "against their checksums; resuming from them. The metadata is written anew "
                      "with the next checkpoint.", step, metadata_error)
    return "", (restored, metadata)

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      target = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), target)
      logging.error("Moved the unusable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"dynamixer_quarantine_{step}")
    self._manager.reload()


def check_fits(saved_tree: Any, abstract_state: Any, step: int, directory: str) -> None:
  """Refuse a checkpoint whose parameters differ from the model's, naming keys and shapes."""
  params = lambda tree: tree["params"] if hasattr(tree, "keys") else tree.params
  trees.require_fit(trees.shapes(params(saved_tree)), trees.shapes(params(abstract_state)),
                    f"Checkpoint step {step} in {directory}",
                    hint="It was written by a run of another model. Use a fresh --workdir, or "
                         "start from its weights with --config.init_from=<its step folder>.")


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every leaf: what ``restore`` needs to place arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
