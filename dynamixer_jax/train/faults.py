"""Test-only fault injection, so that tests can crash a run at a named point without timing luck.

``DYNAMIXER_FAULTS`` holds comma-separated ``point@step`` entries (``point@step+`` for that step
and every later one), e.g. ``save_pause@4`` or ``save_enospc@6+``. Points:

- ``save_pause``: the checkpoint save of that step, after its temporary directory exists and
  before anything is committed, creates ``<workdir>/fault_paused_at_<step>`` and blocks: the test
  waits for the file and kills the process.
- ``save_enospc``: the checkpoint save of that step fails with ``OSError(ENOSPC)`` (a full disk).
- ``eval_pause``: the evaluation of that step creates ``<workdir>/fault_paused_at_<step>`` and
  waits until the run is told to stop (the test sends the signal), so a signal lands mid-eval.
- ``eval_oom``: the evaluation of that step fails as a device out of memory does.

Unset (always, outside tests), ``checkpoint_item`` returns None and nothing here runs: the
production checkpointer carries no hook. Set, it is one extra item of every checkpoint step,
written with orbax's public handler interface.
"""

import errno
import os
import time
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp

ENV = "DYNAMIXER_FAULTS"
ITEM = "fault"  # the extra checkpoint item that carries the hook when faults are set


def _parse(text: str) -> dict[str, tuple[int, bool]]:
  faults = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    point, _, step = item.partition("@")
    if not step:
      raise ValueError(f"{ENV}={text!r}: write point@step or point@step+, e.g. save_pause@4.")
    faults[point] = (int(step.rstrip("+")), step.endswith("+"))
  return faults


def active(point: str, step: int) -> bool:
  """Whether ``point`` should fail at ``step`` in this process."""
  text = os.environ.get(ENV)
  if not text:
    return False
  fault = _parse(text).get(point)
  if fault is None:
    return False
  first, onwards = fault
  return step == first or (onwards and step >= first)


def pause_until(point: str, step: int, marker_dir: str, done: Callable[[], bool]) -> None:
  """At ``point@step``: leave the marker file, then wait until ``done()`` (a signal arrived)."""
  if not active(point, step):
    return
  with open(os.path.join(marker_dir, f"fault_paused_at_{step}"), "w") as f:
    f.write(point)
  while not done():
    time.sleep(0.05)


def raise_out_of_memory(point: str, step: int) -> None:
  """At ``point@step``: the error XLA raises when a buffer does not fit in device memory."""
  if active(point, step):
    import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    raise jax.errors.JaxRuntimeError(
        f"RESOURCE_EXHAUSTED: Out of memory allocating 29522657360 bytes (injected by {ENV})")


class _FaultyItemHandler(ocp.JsonCheckpointHandler):
  """A JSON item ``{"step": N}`` whose save fails or blocks where ``DYNAMIXER_FAULTS`` says.

  It runs inside the step's save, after orbax created the temporary step directory and before
  the step is committed: a fault here is a fault in the middle of a save.
  """

  def __init__(self, marker_dir: str):
    super().__init__()
    self._marker_dir = marker_dir

  async def async_save(self, directory, item=None, args=None):
    step = (args.item if args is not None else item)["step"]
    if active("save_enospc", step):
      raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV})")
    if active("save_pause", step):
      # orbax may create the step's temporary directories in another thread, after this call
      # starts (seen once under load): the marker means they exist.
      deadline = time.monotonic() + 60
      while not os.path.isdir(str(directory)) and time.monotonic() < deadline:
        time.sleep(0.02)
      with open(os.path.join(self._marker_dir, f"fault_paused_at_{step}"), "w") as f:
        f.write(str(directory))
      while True:  # until the test kills the process
        time.sleep(0.1)
    return await super().async_save(directory, args=args)


def checkpoint_item(marker_dir: str) -> Optional[tuple[Any, Any]]:
  """``(handler, args for step -> JsonSave)`` of the fault item, or None outside tests."""
  if not os.environ.get(ENV):
    return None
  _parse(os.environ[ENV])  # a malformed value fails at once
  return _FaultyItemHandler(marker_dir), lambda step: ocp.args.JsonSave({"step": step})
