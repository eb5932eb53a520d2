"""The train state and the jitted steps: pure functions of the state and a global batch.

Nothing here imports TensorFlow, tfds or clu (accelerator images often lack them), so the
benchmark times exactly the step that ``train.py`` runs.
"""

from typing import Any, Callable, Iterable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dynamixer_jax import models
from dynamixer_jax.augment import device
from dynamixer_jax.train import optim, sharding

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when the EMA is off


def compute_dtype(name: str) -> Any:
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  return models.create_model(config.model.name, num_classes=num_classes,
                             dtype=compute_dtype(config.dtype), **kwargs)


normalize = device.normalize  # uint8 pixels -> normalised float32, for eval and inference


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int,
                       key: jax.Array, use_ema: bool) -> TrainState:
  """A fresh state, computed in one jit: run op by op, the init compiled each of its ~300
  operations on its own (16 s of a 21 s tiny benchmark on CPU). A jit's outputs are distinct
  buffers, so the EMA copy of the parameters survives a step that donates the whole state."""

  def init(key: jax.Array) -> TrainState:
    images = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
    params = model.init(key, images)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None)

  return jax.jit(init)(key)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    config: ml_collections.ConfigDict, num_classes: int,
                    mesh: Optional[Mesh] = None) -> Callable:
  """``(state, batch) -> (state, metrics)``: forward, backward, optimizer and EMA update.

  With ``config.grad_accum_steps = k > 1`` the global batch is processed as k micro-batches in
  sequence (``lax.scan``) and their mean gradient makes one update: the update of the full
  batch (tested) with about 1/k of the activation memory. Micro-batch ``i`` takes every k-th
  example, so each device keeps working on its own rows; stochastic-depth masks are drawn per
  micro-batch. ``mesh``: the batch's mesh, so that per-image augmentation runs on each device's
  own rows (``augment.device``); None on one device.
  """
  train_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  augment_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  accum = config.get("grad_accum_steps", 1)

  def loss_fn(params, images, targets, key):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, targets).mean(), logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, images, targets, key):
    def split(x):  # (B, ...) -> (k, B/k, ...); micro-batch i holds rows i, i+k, i+2k, ...
      return jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)

    def micro_step(grad_sum, micro):
      index, images, targets = micro
      (loss, logits), grads = grad_fn(params, images, targets, jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, grad_sum, grads), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (losses, logits) = jax.lax.scan(
        micro_step, zeros, (jnp.arange(accum), split(images), split(targets)))
    logits = jnp.moveaxis(logits, 0, 1).reshape(images.shape[0], -1)  # back to batch order
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    return (jnp.mean(losses), logits), grads

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    key = jax.random.fold_in(train_key, state.step)
    # The crop's resize (when the host shipped it on a canvas), flip, RandAugment, mixup /
    # cutmix, normalisation, random erasing: timm's order, on the whole global batch (so
    # accumulation does not change the augmentation); smoothing is folded into the soft targets.
    images, targets = device.augment_batch(
        jax.random.fold_in(augment_key, state.step),
        device.train_size_images(batch, config.data.image_size), batch["label"], num_classes,
        config, mesh)

    if accum > 1:
      (loss, logits), grads = accumulated(state.params, images, targets, key)
    else:
      (loss, logits), grads = grad_fn(state.params, images, targets, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = optim.ema_update(ema, params, config.ema_decay)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                   accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  return train_step


def make_eval_step(model: nn.Module, config: ml_collections.ConfigDict,
                   num_classes: int) -> Callable:
  """``(state, batch) -> sums``: correct top-1/top-5 and loss of the raw and EMA weights,
  counting only rows whose ``mask`` is set (padding rows count nothing)."""
  k = min(5, num_classes)

  def counts(params, images, labels, mask):
    logits = model.apply({"params": params}, images, train=False).astype(jnp.float32)
    top_k = jax.lax.top_k(logits, k)[1]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return dict(top1=jnp.sum((top_k[:, 0] == labels) * mask),
                top5=jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
                loss=jnp.sum(loss * mask))

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    images = normalize(batch["image"], config.mean, config.std)
    mask = batch["mask"].astype(jnp.float32)
    sums = {"count": jnp.sum(mask)}
    for prefix, params in (("", state.params), ("ema_", state.ema_params)):
      if params is not None:
        sums.update({prefix + n: v for n, v in
                     counts(params, images, batch["label"], mask).items()})
    return sums

  return eval_step


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
