"""What a run prints: one line per log step, one per evaluation, a summary at the end.

Library logs (orbax's per-save chatter, JAX's backend probing, absl internals) stay out of the
console unless ``verbose`` (train.py's ``--verbosity=1``); their warnings and errors still show,
without the tracebacks of background threads (our own error says what failed and what to do).
Every metric also goes to TensorBoard, which keeps what the console leaves out.
"""

import logging as std_logging
import os
import time
from typing import Optional

from absl import logging

PACKAGE = "dynamixer_jax"


class _OursOrImportant(std_logging.Filter):
  """Passes our own records, and other libraries' warnings and errors (without tracebacks)."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def filter(self, record: std_logging.LogRecord) -> bool:
    ours = f"{os.sep}{PACKAGE}{os.sep}" in record.pathname or record.pathname.endswith("train.py")
    if ours or self.verbose:
      return True
    if not os.environ.get("DYNAMIXER_TRACEBACK"):
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


class _Short(std_logging.Formatter):
  """``HH:MM:SS message``; warnings and errors say so."""

  def format(self, record: std_logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < std_logging.WARNING else f"{record.levelname}: "
    text = f"{stamp} {level}{record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def configure(verbose: bool = False) -> None:
  """Route absl's console output through the filter and the short format (idempotent)."""
  handler = logging.get_absl_handler()
  handler.filters = [f for f in handler.filters if not isinstance(f, _OursOrImportant)]
  handler.addFilter(_OursOrImportant(verbose))
  if not verbose:
    handler.setFormatter(_Short())
  # Python warnings from libraries (deprecations) are for their authors, not for a training run.
  std_logging.captureWarnings(True)
  std_logging.getLogger("py.warnings").setLevel(
      std_logging.WARNING if verbose else std_logging.ERROR)


class Progress:
  """The console line every N steps: loss, lr, images/s and the time left."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total, self.batch = total_steps, global_batch
    self.last_step, self.last_time = start_step, time.time()

  def line(self, step: int, metrics: dict[str, float]) -> str:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    return (f"step {step}/{self.total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
            f"{rate * self.batch:.1f} img/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")


def eval_line(step: int, results: dict[str, float]) -> str:
  """``step N eval: top-1 ...`` with the raw and (when present) the EMA weights."""
  parts = [f"top-1 {100 * results['eval_top1']:.2f} %", f"top-5 {100 * results['eval_top5']:.2f} %",
           f"loss {results['eval_loss']:.4f}"]
  if "eval_ema_top1" in results:
    parts.append(f"EMA top-1 {100 * results['eval_ema_top1']:.2f} %")
  return f"step {step} eval ({int(results['eval_count'])} images): " + "  ".join(parts)


def summary(model: str, steps: int, results: Optional[dict[str, float]], checkpoint: str,
            workdir: str) -> str:
  """The last lines of a finished run: final accuracy, where the weights are, how to look."""
  lines = [f"Finished: {model}, {steps} steps."]
  if results:
    ema = (f", EMA weights {100 * results['eval_ema_top1']:.2f} %"
           if "eval_ema_top1" in results else "")
    lines.append(f"  final top-1: raw weights {100 * results['eval_top1']:.2f} %{ema}")
  lines.append(f"  checkpoint: {checkpoint}")
  lines.append(f"  curves:     tensorboard --logdir {workdir}")
  return "\n".join(lines)
