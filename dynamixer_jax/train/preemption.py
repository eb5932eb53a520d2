"""Stop at a step boundary when the job is told to stop (SIGTERM, SIGINT), on every host alike.

A scheduler that preempts a job sends SIGTERM and waits a grace period before SIGKILL. The
handler only records the signal; the training loop asks ``should_stop(step)`` after each step,
saves a checkpoint at that step and exits. On several processes, JAX's preemption service
(started by ``jax.distributed.initialize``; it listens for SIGTERM itself) makes every process
answer True at the same step, so they all save the same one.
"""

import os
import signal
import sys
from typing import Optional

import jax
from absl import logging


class PreemptionWatcher:
  """Records SIGTERM/SIGINT; a second SIGINT interrupts at once (the usual Ctrl-C twice).

  ``exit_on_second_interrupt`` (train.py): the second Ctrl-C ends the process with one line and
  status 130, without waiting for anything (checkpoints are atomic: a half-written one is never
  used). Otherwise (a notebook, where exiting would kill the kernel) it raises KeyboardInterrupt.
  """

  def __init__(self, exit_on_second_interrupt: bool = False):
    self.signal: Optional[int] = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    self._exit_on_second = exit_on_second_interrupt

  def __enter__(self) -> "PreemptionWatcher":
    # On several processes JAX's own SIGTERM listener must stay installed: it is what tells the
    # other hosts. SIGINT is forwarded to it as a SIGTERM.
    signals = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      if self._exit_on_second:
        sys.stderr.write("\nInterrupted again: exiting now, without the checkpoint of this step "
                         "(the previous checkpoints are intact).\n")
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("Received %s: stopping after this step and saving it (press Ctrl-C again to "
                    "stop at once, without saving).", signal.Signals(signum).name)
    if self._multiprocess and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """True at the step where this process (and every other one) must save and stop."""
    if not self._multiprocess:
      return self.signal is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(step):
      self.signal = self.signal or signal.SIGTERM
      return True
    return False


class Preempted(Exception):
  """Training stopped on a signal after saving its checkpoint; rerunning resumes it."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step = signum, step
    super().__init__(f"Stopped by {signal.Signals(signum).name} after step {step}: saved, "
                     f"exiting. The checkpoint is in {directory}; rerun the same command to "
                     "resume.")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # what the signal itself would have given: not "finished"
