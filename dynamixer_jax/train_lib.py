"""Training and evaluation: ``train_and_evaluate(config, workdir)`` is the one entry point.

The state and the jitted steps live in ``steps.py``; this module adds what needs the host:
evaluation over a padded split, and the loop with its periodic actions (logging, evaluation,
checkpoints). Randomness is stateless (the step's key is ``fold_in(seed key, step)``, the data
order is keyed by seed, epoch and index), so a resumed run continues the same streams.
"""

import json
import os
import time
from typing import Any, Callable, Iterable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from dynamixer_jax import (checkpointing, configlib, input_pipeline, models, optim, preemption,
                          sharding)
from dynamixer_jax.steps import (TrainState, build_model, create_train_state, make_eval_step,
                                 make_train_step)


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


# --------------------------------------------------------------------------- the loop


def _checkpoint_metadata(config, info: input_pipeline.DatasetInfo) -> dict[str, Any]:
  """What a user of the checkpoint needs: the model, its classes and its preprocessing."""
  kwargs = models.model_kwargs(config.model.name,
                               **{k: v for k, v in config.model.items() if k != "name"})
  kwargs["num_classes"] = info.num_classes
  kwargs.pop("dtype", None)  # a property of the run, not of the weights
  return dict(
      model=dict(name=config.model.name, kwargs=kwargs),
      num_classes=info.num_classes, class_names=list(info.class_names),
      preprocessing=dict(image_size=config.data.image_size, resize=config.data.eval_resize,
                         interpolation="bicubic", crop="center", mean=list(config.mean),
                         std=list(config.std)),
      dataset=config.data.name, config=config.to_json_best_effort())


class _Progress:
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Train ``config`` in ``workdir``, resuming from its newest checkpoint if there is one."""
  configlib.validate(config)
  sharding.initialize_distributed(config.distributed)  # before anything touches a device
  info = input_pipeline.dataset_info(config.data)  # a missing dataset stops here, early
  mesh = sharding.mesh_from_config(config)
  local_batch = sharding.per_process_batch(config.batch_size, mesh)
  local_eval_batch = sharding.per_process_batch(config.eval_batch_size, mesh, "eval_batch_size")
  if (config.batch_size // mesh.devices.size) % config.grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must divide the batch of "
                     f"each device ({config.batch_size} / {mesh.devices.size} devices); pick a "
                     "divisor of it, or a larger batch_size.")
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{info.num_train_examples} training examples of {config.data.name!r}.")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else configlib.total_epochs(config) * steps_per_epoch)
  eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))

  model = build_model(config, info.num_classes)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch)
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  make_state = lambda key: create_train_state(model, tx, config.data.image_size, key,
                                              config.ema_decay > 0)
  state_sharding = sharding.state_shardings(jax.eval_shape(make_state, init_key), mesh,
                                            config.partition_rules, config.fsdp_min_size)
  state = jax.jit(make_state, out_shardings=state_sharding)(init_key)

  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=config.keep_checkpoints,
                                  max_failures=config.max_checkpoint_failures) as checkpointer:
    _check_same_run(checkpointer, config)
    restored = checkpointer.restore_newest_good(checkpointing.abstract(state))
    if restored is not None:
      state = restored[0]
      logging.info("Resumed from step %d in %s", int(state.step), checkpointer.directory)
    elif config.get("init_from"):
      state = init_from(config.init_from, state)
    start_step = int(state.step)
    metadata = _checkpoint_metadata(config, info)

    train_step = jax.jit(make_train_step(model, tx, schedule, config, info.num_classes),
                         donate_argnums=0, out_shardings=(state_sharding, None))
    eval_step = jax.jit(make_eval_step(model, config, info.num_classes))
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
      writer.write_hparams(_flat(config.to_dict()))
    batches = input_pipeline.train_batches(
        config.data, batch_size=local_batch, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    progress = _Progress(total_steps, config.batch_size, start_step)
    logging.info("Training %s on %s: %d steps (%d per epoch), global batch %d, %d devices.",
                 config.model.name, config.data.name, total_steps, steps_per_epoch,
                 config.batch_size, mesh.devices.size)

    metrics_buffer = _MetricsBuffer(checkpointer)
    with preemption.PreemptionWatcher() as watcher:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, sharding.to_global(next(batches), mesh))
        metrics_buffer.add(step, metrics)
        last = step == total_steps
        stop = watcher.should_stop(step)
        if step % config.log_every_steps == 0 or last or stop:
          summary = metrics_buffer.summary()
          writer.write_scalars(step, summary)
          logging.info(progress.line(step, summary))
        if (step % eval_every == 0 or last) and not stop:
          results = evaluate(eval_step, state, input_pipeline.eval_batches(
              config.data, batch_size=local_eval_batch, process_index=jax.process_index(),
              process_count=jax.process_count()), mesh, abort=lambda: watcher.signal is not None)
          if results is not None:
            writer.write_scalars(step, results)
            logging.info("step %d eval: %s", step,
                         "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if last or stop:  # these cannot be retried later: write and wait
          metrics_buffer.check()  # never save a state that went non-finite
          checkpointer.save_now(step, state, metadata)
          if stop:
            writer.flush()
            raise preemption.Preempted(watcher.signal, step, checkpointer.directory)
        elif step % config.checkpoint_every_steps == 0:
          metrics_buffer.check()
          checkpointer.save(step, state, metadata)
    writer.flush()
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


def init_from(path: str, state: TrainState) -> TrainState:
  """``state`` with the weights of ``path`` (any source ``pretrained.load`` reads), EMA too.

  Every weight whose path and shape match is loaded; the others (a head for another class count)
  keep their fresh initialisation, and each of them is logged, as is every unused source key.
  """
  from dynamixer_jax import pretrained  # pylint: disable=g-import-not-at-top
  _, variables, source = pretrained.load(path, use_ema=True)
  loaded = flax.traverse_util.flatten_dict(variables["params"])
  target = flax.traverse_util.flatten_dict(state.params)
  name = "/".join
  kept = [f"{name(p)} {tuple(v.shape)}" + (f" (source {tuple(loaded[p].shape)})" if p in loaded
                                             else " (not in source)")
          for p, v in target.items() if p not in loaded or loaded[p].shape != v.shape]
  unused = sorted(name(p) for p in loaded if p not in target)
  params = flax.traverse_util.unflatten_dict({
      p: (jax.device_put(jnp.asarray(loaded[p], v.dtype), v.sharding)
          if p in loaded and loaded[p].shape == v.shape else v) for p, v in target.items()})
  logging.info("Initialised %d of %d weights from %s.", len(target) - len(kept), len(target),
               source.get("source", path))
  for line in kept:
    logging.warning("init_from: not loaded, freshly initialised: %s", line)
  for key in unused:
    logging.warning("init_from: source weight not used by the model: %s", key)
  ema = params if state.ema_params is not None else None
  return state.replace(params=params, ema_params=ema)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
