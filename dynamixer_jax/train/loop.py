"""Training and evaluation: ``train_and_evaluate(config, workdir)`` is the one entry point.

It reads top to bottom as three parts: ``_setup`` (config, devices, data, model, optimizer),
``_restore_or_init`` (the newest good checkpoint, ``init_from`` weights, or a fresh state) and
``_run`` (the loop and its periodic actions: logging, evaluation, checkpoints). The state and the
jitted steps live in ``steps.py``. Randomness is stateless (the step's key is
``fold_in(seed key, step)``, the data order is keyed by seed, epoch and index), so a resumed run
continues the same streams.
"""

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from dynamixer_jax import preprocessing
from dynamixer_jax.data import pipeline, sources
from dynamixer_jax.train import (checkpointing, compile_cache, configlib, console, events,
                                 faults, optim, preemption, sharding, workdir_lock)
from dynamixer_jax.train.steps import (TrainState, build_model, create_train_state, evaluate,
                                       make_eval_step, make_train_step)
from dynamixer_jax.weights import metadata as metadata_lib
from dynamixer_jax.weights import store, trees


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class _Run:
  """Everything the loop needs, decided once before the first step."""
  config: ml_collections.ConfigDict
  workdir: str
  info: sources.DatasetInfo
  mesh: Any
  model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  state_sharding: Any
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  metadata: dict[str, Any]

  @property
  def local_batch(self) -> int:
    return sharding.per_process_batch(self.config.batch_size, self.mesh)

  @property
  def local_eval_batch(self) -> int:
    return sharding.per_process_batch(self.config.eval_batch_size, self.mesh)

  def make_state(self, key: jax.Array) -> TrainState:
    return create_train_state(self.model, self.tx, self.config.data.image_size, key,
                              self.config.ema_decay > 0)

  def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
    return pipeline.eval_batches(self.config.data, batch_size=self.local_eval_batch,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  configlib.validate(config)
  sharding.initialize_distributed(config.distributed)  # before anything touches a device
  compile_cache.use(config.compilation_cache_dir, workdir)  # before anything compiles
  info = sources.dataset_info(config.data)  # a missing dataset stops here, early
  mesh = sharding.mesh_from_config(config)
  configlib.check_devices(config, mesh.devices.size)
  useful_eval_batch = -(-info.num_eval_examples // mesh.devices.size) * mesh.devices.size
  if config.eval_batch_size > useful_eval_batch:
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} is larger than the "
                     f"{info.num_eval_examples} examples of the eval split "
                     f"{config.data.eval_split!r}: use at most {useful_eval_batch} (the split, "
                     f"rounded up to a multiple of the {mesh.devices.size} devices).")
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{info.num_train_examples} training examples of {config.data.name!r}.")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else configlib.total_epochs(config) * steps_per_epoch)
  model = build_model(config, info.num_classes)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch)
  metadata = metadata_lib.for_model(
      model, class_names=info.class_names,
      preprocessing_record=preprocessing.EvalPreprocessing.from_config(config),
      dataset=config.data.name, config_json=config.to_json_best_effort())
  run = _Run(config=config, workdir=workdir, info=info, mesh=mesh, model=model, tx=tx,
             schedule=schedule, state_sharding=None, steps_per_epoch=steps_per_epoch,
             total_steps=total_steps,
             eval_every=max(1, round(config.eval_every_epochs * steps_per_epoch)),
             metadata=metadata)
  abstract_state = jax.eval_shape(run.make_state, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.partition_rules,
                                            config.fsdp_min_size)
  return dataclasses.replace(run, state_sharding=state_sharding)


# --------------------------------------------------------------------------- restore or init


def _restore_or_init(run: _Run, checkpointer: checkpointing.Checkpointer
                     ) -> tuple[TrainState, dict[str, Any]]:
  """The newest good checkpoint of the workdir (and its metadata), else ``init_from``'s weights,
  else a fresh state."""
  _check_same_run(checkpointer, run.config)  # before anything compiles: a refusal is quick
  init_key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 0)
  state = jax.jit(run.make_state, out_shardings=run.state_sharding)(init_key)
  restored = checkpointer.restore_newest_good(checkpointing.abstract(state),
                                              force=run.config.force_resume)
  if restored is not None:
    logging.info("Resumed from step %d in %s", int(restored[0].step), checkpointer.directory)
    return restored
  if run.config.init_from:
    return init_from(run.config.init_from, state), {}
  return state, {}


def _check_same_run(checkpointer: checkpointing.Checkpointer,
                    config: ml_collections.ConfigDict) -> None:
  """Refuse to resume a workdir whose run had another model, dataset, seed, batch or optimizer."""
  for step in reversed(checkpointer.all_steps()):
    try:
      saved = json.loads(checkpointer.metadata(step)["config"])
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable: restore_newest_good reports it and falls back
    diffs = configlib.resume_differences(saved, config)
    if diffs and not config.force_resume:
      raise ValueError(
          f"The workdir {os.path.dirname(checkpointer.directory)} holds a run (step {step}) "
          "with another configuration:\n  " + "\n  ".join(diffs) + "\nUse a fresh --workdir "
          "for a new run, or pass --config.force_resume=True to continue this one anyway (the "
          "mesh, epochs and eval/log/checkpoint cadence may change without it).")
    for diff in diffs:
      logging.warning("force_resume: resuming despite %s", diff)
    for diff in configlib.resume_differences(saved, config, configlib.RECOVERY_FIELDS, ()):
      logging.warning("Resuming with a changed recovery setting: %s (recorded in the next "
                      "checkpoint's config).", diff)
    return


def init_from(path: str, state: TrainState) -> TrainState:
  """``state`` with the weights of ``path`` (any source ``weights.load`` reads), EMA too.

  Every weight whose path and shape match is loaded; the others (a head for another class count)
  keep their fresh initialisation, and each of them is logged, as is every unused source key.
  """
  _, variables, source = store.load(path, use_ema=True)
  loaded = flax.traverse_util.flatten_dict(variables["params"])
  target = flax.traverse_util.flatten_dict(state.params)
  difference = trees.compare(trees.shapes(variables["params"]), trees.shapes(state.params))
  params = flax.traverse_util.unflatten_dict({
      p: (v if p in difference.missing or p in difference.mismatched
          else jax.device_put(jnp.asarray(loaded[p], v.dtype), v.sharding))
      for p, v in target.items()})
  kept = len(difference.missing) + len(difference.mismatched)
  logging.info("Initialised %d of %d weights from %s.", len(target) - kept, len(target),
               source.get("source", path))
  name = "/".join
  for p, shape in sorted(difference.missing.items()):
    logging.warning("init_from: not in the source, freshly initialised: %s %s", name(p), shape)
  for p, (had, want) in sorted(difference.mismatched.items()):
    logging.warning("init_from: shape differs, freshly initialised: %s %s (source %s)",
                    name(p), want, had)
  for p in sorted(difference.unexpected):
    logging.warning("init_from: source weight not used by the model: %s", name(p))
  ema = params if state.ema_params is not None else None
  return state.replace(params=params, ema_params=ema)


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       handle_signals: bool = True,
                       exit_on_second_interrupt: bool = False) -> TrainState:
  """Train ``config`` in ``workdir``, resuming from its newest checkpoint if there is one.

  With ``handle_signals``, SIGTERM and Ctrl-C stop the run at the next step boundary after
  saving it (``preemption.Preempted``), and the previous handlers are back when this returns or
  raises; ``exit_on_second_interrupt`` (train.py) makes a second Ctrl-C end the process at once.
  """
  run = _setup(config, workdir)
  with workdir_lock.WorkdirLock(workdir, jax.process_index()), \
       checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=config.keep_checkpoints,
                                  max_failures=config.max_checkpoint_failures) as checkpointer:
    state, restored_metadata = _restore_or_init(run, checkpointer)
    watcher = (preemption.PreemptionWatcher(exit_on_second_interrupt) if handle_signals
               else None)
    return _Loop(run, checkpointer, watcher).run(state, restored_metadata)


class _Loop:
  """The train loop and its periodic actions: log, evaluate, save; and how it stops."""

  def __init__(self, run: _Run, checkpointer: checkpointing.Checkpointer,
               watcher: Optional[preemption.PreemptionWatcher]):
    self.run_, self.checkpointer, self.watcher = run, checkpointer, watcher
    config = run.config
    self.train_step = jax.jit(make_train_step(run.model, run.tx, run.schedule, config,
                                              run.info.num_classes, run.mesh),
                              donate_argnums=0, out_shardings=(run.state_sharding, None))
    self.eval_step = jax.jit(make_eval_step(run.model, config, run.info.num_classes))
    self.writer: Optional[metric_writers.MetricWriter] = None  # opened by run()
    self.results: Optional[dict[str, float]] = None

  def stopping(self) -> bool:
    return self.watcher is not None and self.watcher.signal is not None

  def evaluate(self, state: TrainState, step: int) -> bool:
    """Evaluate, log and write the results of ``step``; False if a signal interrupted it."""
    config = self.run_.config
    # On several processes every one must finish the pass (its steps are collective); the stop
    # then comes at the agreed step.
    abort = self.stopping if jax.process_count() == 1 else (lambda: False)
    faults.pause_until("eval_pause", step, self.run_.workdir, abort)
    with _out_of_memory_message("the evaluation step", "eval_batch_size",
                                config.eval_batch_size, step, self.checkpointer):
      faults.raise_out_of_memory("eval_oom", step)
      results = evaluate(self.eval_step, state, self.run_.eval_batches(), self.run_.mesh,
                         abort=abort)
    if results is None:
      logging.warning("The evaluation of step %d was interrupted; it runs first when the run "
                      "resumes.", step)
      return False
    self.results = results
    self.writer.write_scalars(step, results)
    logging.info(console.eval_line(step, results))
    return True

  def save_and_wait(self, step: int, state: TrainState, metrics_buffer, pending_eval: bool):
    metrics_buffer.check()  # never save a state that went non-finite
    self.checkpointer.save_now(step, state, dict(self.run_.metadata, pending_eval=pending_eval))
    self.writer.flush()

  def run(self, state: TrainState, restored_metadata: dict[str, Any]) -> TrainState:
    run, config = self.run_, self.run_.config
    start_step = int(state.step)
    if start_step > 0 and jax.process_index() == 0:
      # The steps after the checkpoint were logged by the run that stopped: drop them first.
      events.purge_after(run.workdir, start_step)
    self.writer = _metric_writer(run.workdir)
    if start_step == 0:
      self.writer.write_hparams(_flat(config.to_dict()))
    name = run.metadata["description"]
    if restored_metadata.get("pending_eval"):
      logging.info("Running the evaluation of step %d first: the previous run stopped before "
                   "it was done.", start_step)
      if not self.evaluate(state, start_step):
        raise preemption.Preempted(self.watcher.signal, start_step, self.checkpointer.directory)
      self.checkpointer.mark_evaluated(start_step)
    if start_step >= run.total_steps:
      logging.info("Nothing to train: the checkpoint is at step %d of %d.", start_step,
                   run.total_steps)
      return self._finish(state, start_step, name)
    batches = pipeline.train_batches(
        config.data, batch_size=run.local_batch, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    progress = console.Progress(run.total_steps, config.batch_size, start_step)
    logging.info("Training %s on %s: %d steps (%d per epoch), global batch %d, %d device%s.",
                 name, config.data.name, run.total_steps, run.steps_per_epoch, config.batch_size,
                 run.mesh.devices.size, "" if run.mesh.devices.size == 1 else "s")
    metrics_buffer = _MetricsBuffer(self.checkpointer, start_step)
    previous = None
    with self.watcher or contextlib.nullcontext():
      for step in range(start_step + 1, run.total_steps + 1):
        with _out_of_memory_message("the train step", "batch_size", config.batch_size, step,
                                    self.checkpointer):
          state, metrics = self.train_step(state, sharding.to_global(next(batches), run.mesh))
          metrics_buffer.add(step, metrics)
          # At most one step in flight behind this one: a stop request is answered at the next
          # step, not after a queue of dispatched ones.
          jax.block_until_ready(previous)
        previous = metrics
        last = step == run.total_steps
        stop = self.watcher is not None and self.watcher.should_stop(step)
        if step % config.log_every_steps == 0 or last or stop:
          summary = metrics_buffer.summary()
          self.writer.write_scalars(step, summary)
          logging.info(progress.line(step, summary))
        eval_due = step % run.eval_every == 0 or last
        if last and not stop:  # saved before the final evaluation, which may fail or stop
          self.save_and_wait(step, state, metrics_buffer, pending_eval=True)
        if eval_due and not stop:
          stop = not self.evaluate(state, step)
          if last and not stop:
            self.checkpointer.mark_evaluated(step)
        if stop:
          logging.warning("Stopping: saving step %d.", step)
          if not last:
            self.save_and_wait(step, state, metrics_buffer, pending_eval=eval_due)
          raise preemption.Preempted(self.watcher.signal, step, self.checkpointer.directory)
        if not last and step % config.checkpoint_every_steps == 0:
          metrics_buffer.check()
          self.checkpointer.save(step, state, run.metadata)
    return self._finish(state, run.total_steps, name)

  def _finish(self, state: TrainState, steps: int, name: str) -> TrainState:
    self.writer.close()
    logging.info(console.summary(name, steps, self.results, self.checkpointer.directory,
                                 self.run_.workdir))
    return state


@contextlib.contextmanager
def _out_of_memory_message(what: str, field: str, value: int, step: int,
                           checkpointer: checkpointing.Checkpointer):
  """A device out-of-memory error as one message: the batch size, what to change, what is safe."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    advice = (f"lower config.{field}" if field == "eval_batch_size" else
              f"lower config.{field}, raise config.grad_accum_steps, or set "
              "config.model.remat=True")
    raise DeviceOutOfMemory(
        f"The device ran out of memory in {what} at step {step} with config.{field}={value} "
        f"({str(e).splitlines()[0][:160]}). To fit, {advice}; the newest checkpoint is step "
        f"{checkpointer.latest_step()} in {checkpointer.directory} (rerun to resume from it)."
    ) from None


class DeviceOutOfMemory(ValueError):
  """A step did not fit in device memory (a user error: the batch size is the user's)."""


def _metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard summaries from process 0 only (the console has its own lines)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


class _MetricsBuffer:
  """Step metrics, fetched from the device only at log and checkpoint steps (no sync per step)
  and checked in step order, so a NaN is reported at the step where it first appeared."""

  def __init__(self, checkpointer: checkpointing.Checkpointer, start_step: int = 0):
    self._checkpointer = checkpointer
    self._start_step = start_step
    self._on_device: list[tuple[int, Any]] = []
    self._on_host: list[dict[str, float]] = []
    self.last_finite: Optional[tuple[int, dict[str, float]]] = None

  def add(self, step: int, metrics: Any) -> None:
    self._on_device.append((step, metrics))

  def check(self) -> None:
    """Raise ``FloatingPointError`` at the first step whose loss or gradient is not finite."""
    fetched = jax.device_get([m for _, m in self._on_device])
    for (step, _), values in zip(self._on_device, fetched):
      values = {k: float(v) for k, v in values.items()}
      if not all(np.isfinite(v) for v in values.values()):
        last = ("none (the first step of this run)" if self.last_finite is None
                else f"step {self.last_finite[0]}: {_fmt(self.last_finite[1])}")
        self._checkpointer.wait()
        newest = self._checkpointer.latest_step()
        if newest is None:
          where = ("There is no checkpoint yet: lower --config.optim.lr or set "
                   "--config.optim.grad_clip_norm and rerun (it starts from scratch).")
        else:
          where = (f"The newest good checkpoint is step {newest} in "
                   f"{self._checkpointer.directory}: lower --config.optim.lr or set "
                   "--config.optim.grad_clip_norm and rerun to resume from it (both may change "
                   "on a resume).")
        if 0 < self._start_step and step - self._start_step <= 10:
          where += (f" This is within {step - self._start_step} steps of resuming from step "
                    f"{self._start_step}: that checkpoint itself may be bad. To resume from the "
                    f"one before it, move {self._checkpointer.directory}/{self._start_step} "
                    "aside (e.g. into checkpoints.corrupt/) and rerun.")
        raise FloatingPointError(
            f"Non-finite training metrics at step {step}: {_fmt(values)}. Last finite metrics: "
            f"{last}. Nothing from step {step} on was saved. {where}")
      self.last_finite = (step, values)
      self._on_host.append(values)
    self._on_device = []

  def summary(self) -> dict[str, float]:
    """The mean of every metric since the last summary."""
    self.check()
    if not self._on_host:
      return {}
    summary = {k: float(np.mean([m[k] for m in self._on_host])) for k in self._on_host[0]}
    self._on_host = []
    return summary


def _fmt(metrics: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
