"""Train a model: python train.py --config=configs/dynamixer_s.py [--workdir=DIR].

Typed config arguments go after a colon (configs/cifar_finetune.py:model=dynamixer_s) and any
field can be overridden with --config.field=value. A workdir that holds checkpoints resumes.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(logging.logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the console; its warnings and errors still show,
  without the tracebacks of its background threads (our own error says what failed and why)."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    if not os.environ.get("DYNAMIXER_TRACEBACK"):
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help answers without loading jax and tensorflow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data runs on the host; the GPU is JAX's
  from dynamixer_jax import checkpointing, preemption, train_lib  # pylint: disable=g-import-not-at-top

  logging.get_absl_handler().addFilter(_QuietLibraries())
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  logging.info("Workdir: %s", os.path.abspath(workdir))
  try:
    train_lib.train_and_evaluate(_CONFIG.value, workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_code)
  except USER_ERRORS + (checkpointing.CheckpointWriteError,) as e:
    if os.environ.get("DYNAMIXER_TRACEBACK"):
      raise
    # What went wrong and what to do, without a traceback through our code and XLA's.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"\ntrain.py stopped: {e}\n(DYNAMIXER_TRACEBACK=1 shows the traceback.)",
          file=sys.stderr)
    sys.exit(1)


# The errors our code raises for bad configs, data, checkpoints and non-finite losses: each
# message already names the field or file and the fix.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, PermissionError)


if __name__ == "__main__":
  app.run(main)
