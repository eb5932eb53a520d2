"""Test-only fault injection, so that tests can crash a run at a named point without timing luck.

``DYNAMIXER_FAULTS`` holds comma-separated ``point@step`` entries (``point@step+`` for that step
and every later one), e.g. ``save_pause@4`` or ``save_enospc@6+``. Points:

- ``save_pause``: the checkpoint writer, in the middle of writing that step (its temporary
  directory exists, nothing is committed), creates ``<workdir>/fault_paused_at_<step>`` and
  blocks: the test waits for the file and kills the process.
- ``save_enospc``: the checkpoint writer fails with ``OSError(ENOSPC)`` (a full disk).

Unset (always, outside tests), every check is a dictionary lookup that returns False.
"""

import os

ENV = "DYNAMIXER_FAULTS"


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
