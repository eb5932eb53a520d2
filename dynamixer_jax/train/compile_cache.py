"""JAX's persistent compilation cache for a run: a restarted job reuses its compiled steps.

A preempted or resumed run compiles the same programs again: on a GPU the DynaMixer-S train step
took 87 s to compile (README, the device check), on the 2-core CPU the quickstart's state and
train step about 7 s of its start. With the cache on, XLA's executables (and, on GPUs, the
autotuning results) are written once and read back by every later start of the same programs.
"""

import os
from typing import Optional

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

AUTO = "auto"
WORKDIR_FOLDER = "compile_cache"
_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"  # one per cache hit
_ours: Optional[str] = None  # the folder ``use`` set last, as opposed to the user's own
_listening = False


def resolve(setting: str, workdir: str) -> Optional[str]:
  """The folder ``config.compilation_cache_dir`` asks for; None = leave JAX's own setting.

  'auto': JAX's own cache folder when the user set one (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config``), else ``<workdir>/compile_cache``, beside the checkpoints that resume the run
  (a folder only its owner writes: the cache is trusted code). '': JAX's own setting, which is
  off unless ``JAX_COMPILATION_CACHE_DIR`` is set. Anything else: that folder (local or gs://).
  """
  if setting == AUTO:
    users = jax.config.jax_compilation_cache_dir
    return users if users and users != _ours else os.path.join(workdir, WORKDIR_FOLDER)
  return setting or None


def use(setting: str, workdir: str) -> Optional[str]:
  """Point JAX's cache at ``resolve(setting, workdir)`` before anything compiles; the folder in
  use (None if none).

  A second run in the same process (a notebook) may use another folder: the cache JAX opened
  for the first is dropped so that the next compile opens the new one.
  """
  global _ours, _listening
  folder = resolve(setting, workdir)
  if folder is not None and folder != jax.config.jax_compilation_cache_dir:
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(folder)
    _ours = folder
  folder = jax.config.jax_compilation_cache_dir
  if folder:
    logging.info("XLA compilation cache: %s (a restart reuses the compiled steps)", folder)
    if not _listening:
      jax.monitoring.register_event_duration_secs_listener(_report_hit)
      _listening = True
  return folder


def _report_hit(event: str, seconds: float, **_) -> None:
  if event == _SAVED_EVENT:
    logging.info("XLA compilation cache: a compiled program read back instead of compiled "
                 "(%.0f s of compiling saved).", max(seconds, 0.0))
