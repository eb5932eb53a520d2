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
from dynamixer_jax.train import (checkpointing, configlib, console, optim, preemption,
                                 sharding)
from dynamixer_jax.train.steps import (TrainState, build_model, create_train_state,
                                       make_eval_step, make_train_step)
from dynamixer_jax.weights import metadata as metadata_lib
from dynamixer_jax.weights import store, trees


def evaluate(eval_step: Callable, state: TrainState, batches: Iterable[dict[str, np.ndarray]],
             mesh, abort: Callable[[], bool] = lambda: False) -> Optional[dict[str, float]]:
  """Top-1/top-5 accuracy and loss over one pass of padded eval batches (None if ``abort()``
  turns True on the way: a preempted job saves its checkpoint first)."""
  totals = None
  for batch in batches:
    if abort():
      return None
    sums = eval_step(state, sharding.to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  results = {"eval_count": count}
  for name, value in totals.items():
    prefix = "eval_ema_" if name.startswith("ema_") else "eval_"
    results[prefix + name.removeprefix("ema_")] = float(value) / max(count, 1.0)
  return results


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
  info = sources.dataset_info(config.data)  # a missing dataset stops here, early
  mesh = sharding.mesh_from_config(config)
  configlib.check_devices(config, mesh.devices.size)
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


def _restore_or_init(run: _Run, checkpointer: checkpointing.Checkpointer) -> TrainState:
  """The newest good checkpoint of the workdir, else ``init_from``'s weights, else fresh."""
  _check_same_run(checkpointer, run.config)  # before anything compiles: a refusal is quick
  init_key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 0)
  state = jax.jit(run.make_state, out_shardings=run.state_sharding)(init_key)
  restored = checkpointer.restore_newest_good(checkpointing.abstract(state))
  if restored is not None:
    logging.info("Resumed from step %d in %s", int(restored[0].step), checkpointer.directory)
    return restored[0]
  if run.config.init_from:
    return init_from(run.config.init_from, state)
  return state


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
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=config.keep_checkpoints,
                                  max_failures=config.max_checkpoint_failures) as checkpointer:
    state = _restore_or_init(run, checkpointer)
    watcher = (preemption.PreemptionWatcher(exit_on_second_interrupt) if handle_signals
               else None)
    return _run(run, state, checkpointer, watcher)


def _run(run: _Run, state: TrainState, checkpointer: checkpointing.Checkpointer,
         watcher: Optional[preemption.PreemptionWatcher]) -> TrainState:
  config, start_step = run.config, int(state.step)
  train_step = jax.jit(make_train_step(run.model, run.tx, run.schedule, config,
                                       run.info.num_classes),
                       donate_argnums=0, out_shardings=(run.state_sharding, None))
  eval_step = jax.jit(make_eval_step(run.model, config, run.info.num_classes))
  writer = _metric_writer(run.workdir)
  if start_step == 0:
    writer.write_hparams(_flat(config.to_dict()))
  batches = pipeline.train_batches(
      config.data, batch_size=run.local_batch, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  progress = console.Progress(run.total_steps, config.batch_size, start_step)
  name = run.metadata["description"]
  logging.info("Training %s on %s: %d steps (%d per epoch), global batch %d, %d devices.",
               name, config.data.name, run.total_steps, run.steps_per_epoch, config.batch_size,
               run.mesh.devices.size)
  metrics_buffer = _MetricsBuffer(checkpointer)
  results, previous = None, None
  stopping = lambda: watcher is not None and watcher.signal is not None
  with watcher or contextlib.nullcontext():
    for step in range(start_step + 1, run.total_steps + 1):
      state, metrics = train_step(state, sharding.to_global(next(batches), run.mesh))
      metrics_buffer.add(step, metrics)
      # At most one step in flight behind this one: a stop request is answered at the next step,
      # not after a queue of dispatched ones.
      jax.block_until_ready(previous)
      previous = metrics
      last = step == run.total_steps
      stop = watcher is not None and watcher.should_stop(step)
      if step % config.log_every_steps == 0 or last or stop:
        summary = metrics_buffer.summary()
        writer.write_scalars(step, summary)
        logging.info(progress.line(step, summary))
      if (step % run.eval_every == 0 or last) and not stop:
        evaluated = evaluate(eval_step, state, run.eval_batches(), run.mesh, abort=stopping)
        if evaluated is not None:
          results = evaluated
          writer.write_scalars(step, results)
          logging.info(console.eval_line(step, results))
      if last or stop:  # these cannot be retried later: write and wait
        if stop:
          logging.warning("Stopping: saving step %d.", step)
        metrics_buffer.check()  # never save a state that went non-finite
        checkpointer.save_now(step, state, run.metadata)
        writer.flush()
        if stop:
          raise preemption.Preempted(watcher.signal, step, checkpointer.directory)
      elif step % config.checkpoint_every_steps == 0:
        metrics_buffer.check()
        checkpointer.save(step, state, run.metadata)
  writer.close()
  logging.info(console.summary(name, run.total_steps, results, checkpointer.directory,
                               run.workdir))
  return state


def _metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard summaries from process 0 only (the console has its own lines)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


class _MetricsBuffer:
  """Step metrics, fetched from the device only at log and checkpoint steps (no sync per step)
  and checked in step order, so a NaN is reported at the step where it first appeared."""

  def __init__(self, checkpointer: checkpointing.Checkpointer):
    self._checkpointer = checkpointer
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
        raise FloatingPointError(
            f"Non-finite training metrics at step {step}: {_fmt(values)}. Last finite metrics: "
            f"{last}. Nothing from step {step} on was saved; the newest good checkpoint is step "
            f"{self._checkpointer.latest_step()} in {self._checkpointer.directory}. Lower "
            "optim.lr or set optim.grad_clip_norm, then rerun to resume from it.")
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
