"""The host side of the input pipeline, in TensorFlow: sources, per-example transforms, batches.

Imports no flax, optax or model module: what it shares with the trainer lives in
``dynamixer_jax.preprocessing``. TensorFlow is imported here first, quietly (``_quiet_import``).
"""

import os
import sys
import tempfile

# What TensorFlow 2.21's C++ side prints on every import, whatever TF_CPP_MIN_LOG_LEVEL says.
_IMPORT_NOTICES = ("All log messages before absl::InitializeLog()", "oneDNN custom operations")


def _quiet_import() -> None:
  """Import TensorFlow with its start-up notices dropped; anything else it prints is kept."""
  if "tensorflow" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not any(notice in line for notice in _IMPORT_NOTICES):
          sys.stderr.write(line)


_quiet_import()
