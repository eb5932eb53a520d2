"""Optimizer and learning-rate schedule from the config, with the official recipe's semantics.

The official schedule (timm 0.4.12 ``CosineLRScheduler``, ``t_in_epochs=True``) changes the
learning rate once per epoch: linear warmup from ``warmup_lr`` over ``warmup_epochs``, then a
cosine to ``min_lr`` whose phase is measured from epoch 0 (not from the end of warmup), then
``cooldown_epochs`` at ``min_lr``. ``per_epoch=False`` evaluates the same curve at fractional
epochs instead, a smoother variant.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]
OPTIMIZERS = ("adamw", "sgd")  # config.optim.name
SCHEDULES = ("cosine", "constant")  # config.schedule.name


def learning_rate_at_epoch(epoch: Any, *, lr: float, num_epochs: int, warmup_epochs: float,
                           warmup_lr: float, min_lr: float) -> jax.Array:
  """The official cosine-with-warmup curve at a (possibly fractional) epoch."""
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + epoch * (lr - warmup_lr) / max(warmup_epochs, 1e-9)
  cosine = min_lr + 0.5 * (lr - min_lr) * (1 + jnp.cos(math.pi * epoch / num_epochs))
  value = jnp.where(epoch < warmup_epochs, warm, cosine)
  return jnp.where(epoch >= num_epochs, min_lr, value)  # the cooldown epochs


def create_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
  """``step -> learning rate`` for ``config.schedule`` and ``config.optim.lr``."""
  s = config.schedule
  if s.name == "constant":
    return optax.constant_schedule(config.optim.lr)
  if s.name != "cosine":
    raise ValueError(f"config.schedule.name={s.name!r} is not supported; use one of {SCHEDULES}.")

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    if s.per_epoch:
      epoch = jnp.floor(epoch)
    return learning_rate_at_epoch(epoch, lr=config.optim.lr, num_epochs=config.num_epochs,
                                  warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                                  min_lr=s.min_lr)

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for weights with ndim >= 2: biases and LayerNorm scales are not decayed (as timm)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> tuple[optax.GradientTransformation, Schedule]:
  """The optimizer of ``config.optim`` with the schedule of ``config.schedule``."""
  o = config.optim
  schedule = create_schedule(config, steps_per_epoch)
  mask = weight_decay_mask if o.decay_matrices_only else None
  if o.name == "adamw":
    # optax, like torch.optim.AdamW, multiplies the decay by the learning rate.
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=mask)
  elif o.name == "sgd":
    # torch.optim.SGD adds weight_decay * param to the gradient before momentum.
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  else:
    raise ValueError(f"config.optim.name={o.name!r} is not supported; use one of {OPTIMIZERS}.")
  # Always in the chain (an infinite norm when off: the identity), so that clipping can be
  # switched on when resuming a run that diverged: the optimizer state keeps its structure.
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm or float("inf")), tx)
  if o.get("backbone_lr_mult", 1.0) != 1.0:
    # Scaling the final update equals a lower lr for those params (momentum and decay included),
    # as the official transfer script's parameter groups do.
    tx = optax.chain(tx, optax.masked(optax.scale(o.backbone_lr_mult), backbone_mask))
  return tx, schedule


def backbone_mask(params: Any) -> Any:
  """True for every weight but the classifier head."""
  return {k: jax.tree.map(lambda _: k != "head", v) for k, v in params.items()}


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """One step of an exponential moving average of the weights (timm ModelEma, no warmup)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
