"""Train a model: python train.py --config=configs/dynamixer_s.py [--workdir=DIR].

Typed config arguments go after a colon (configs/cifar_finetune.py:model=dynamixer_s) and any
field can be overridden with --config.field=value; --print_config lists every field and exits.
A workdir that holds checkpoints resumes.
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dynamixer_jax import cli, hugepages  # noqa: E402  (light: no jax, no TensorFlow)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py (typed arguments after a colon: "
    "configs/cifar_finetune.py:dataset=cifar10). Any field can be set with "
    "--config.<field>=<value>; --print_config lists them all with their values.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                  "Print the resolved config (every field) and exit.")
flags.mark_flags_as_required(["config"])
PROG = "train.py"


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def _check_config_path(argv: list[str]) -> None:
  """A missing config file is one line, before the config (and jax with it) is imported."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith("--config="):
      path = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None and not os.path.isfile(path.split(":")[0]):
      cli.report_user_error(PROG, FileNotFoundError(
          f"--config={path}: no such config file {path.split(':')[0]!r}; the recipes are in "
          "configs/ (e.g. --config=configs/quickstart.py)."))
      sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake (an unknown field, a bad value) as one message."""
  _check_config_path(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if os.environ.get("DYNAMIXER_TRACEBACK"):
      raise
    message = str(e).strip()
    if "Traceback (most recent call last)" in message:  # the config file raised: its last line
      message = message.splitlines()[-1].split(": ", 1)[-1]
    cli.report_user_error(PROG, ValueError(message))
    sys.exit(1)
  except (AttributeError, KeyError) as e:  # --config.<field> names no field of the config
    if os.environ.get("DYNAMIXER_TRACEBACK"):
      raise
    text = str(e.args[0] if e.args else e)
    close = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    cli.report_user_error(PROG, ValueError(
        f"{', '.join(overrides) or '--config'}: the config has no such field"
        + (f' ("{close.group(2)}"); did you mean "{close.group(1)}"?' if close else ".")
        + " --print_config lists every field."))
    sys.exit(1)
  except cli.USER_ERRORS as e:  # raised by the config file itself (e.g. a bad :argument)
    if os.environ.get("DYNAMIXER_TRACEBACK"):
      raise
    cli.report_user_error(PROG, e)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    print(config)
    return
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    cli.report_user_error(PROG, NotADirectoryError(
        f"--workdir={workdir} is a file, not a folder; give a folder (new or a run's)."))
    sys.exit(1)
  # Imported here so that --help and flag mistakes answer without loading jax and TensorFlow.
  import dynamixer_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (TensorFlow, quietly)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data runs on the host; the GPU is JAX's
  from dynamixer_jax.train import checkpointing, console, loop, preemption, workdir_lock  # pylint: disable=g-import-not-at-top
  console.configure(verbose=flags.FLAGS.verbosity >= 1)
  logging.info("Workdir: %s", os.path.abspath(workdir))
  try:
    loop.train_and_evaluate(config, workdir, exit_on_second_interrupt=True)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # before the loop took over Ctrl-C: nothing to save yet
    print("\ntrain.py: interrupted before training started; nothing was saved.", file=sys.stderr)
    sys.exit(130)
  except cli.USER_ERRORS + (checkpointing.CheckpointWriteError, workdir_lock.WorkdirInUse) as e:
    if os.environ.get("DYNAMIXER_TRACEBACK"):
      raise
    # What went wrong and what to do, without a traceback through our code and XLA's.
    print(f"\ntrain.py stopped: {e}\n(DYNAMIXER_TRACEBACK=1 shows the traceback.)",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()  # XLA:CPU's step buffers in huge pages
  app.run(main, flags_parser=_parse_flags)
