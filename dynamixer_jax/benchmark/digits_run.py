"""The device check's real-data run: the quickstart model and recipe on scikit-learn's digits, in
bfloat16, for a fixed number of steps, with no TensorFlow (accelerator images often have none).

The digits are upsampled to the model's 32 px once on the device (bicubic) and shifted by the
recipe's random pad-and-crop on the host; the step is ``train.py``'s own jitted train step (with
its EMA) and the held-out 360 digits are scored by its eval step. The schedule of the recipe is
compressed into the steps run, so that a short run still warms up, peaks and decays.
"""

import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dynamixer_jax import preprocessing, recipes
from dynamixer_jax.train import optim, sharding, steps


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
  out = jax.image.resize(images.astype(np.float32), (len(images), size, size, 3), "bicubic")
  return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)


def _shifted(rng: np.random.Generator, images: np.ndarray, pad: int) -> np.ndarray:
  """The recipe's train crop: pad by ``pad`` (edge pixels) and crop back at a random offset."""
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  size = images.shape[1]
  dy, dx = rng.integers(0, 2 * pad + 1, 2)
  return padded[:, dy:dy + size, dx:dx + size]


def run(num_steps: int, dtype: str = "bfloat16", log_every: int = 20,
        model: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """``num_steps`` train steps; returns the loss curve, held-out top-1 (raw, EMA), seconds.
  ``model``: fields that replace the recipe's model (a smaller one for a smoke test)."""
  config = recipes.load("quickstart")
  with config.unlocked():
    config.dtype = dtype
    config.model.update(model or {})
  (train_x, train_y), (test_x, test_y) = preprocessing.digits_splits()
  size, batch = config.data.image_size, config.batch_size
  train_x, test_x = _upsample(train_x, size), _upsample(test_x, size)
  model = steps.build_model(config, num_classes=10)
  steps_per_epoch = math.ceil(num_steps / config.num_epochs)  # the recipe's epochs, compressed
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=steps_per_epoch)
  state = steps.create_train_state(model, tx, size, jax.random.PRNGKey(config.seed),
                                   use_ema=config.ema_decay > 0)
  train_step = jax.jit(steps.make_train_step(model, tx, schedule, config, 10), donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(model, config, 10))
  rng = np.random.default_rng(config.seed)
  curve, start, order = [], time.perf_counter(), np.array([], np.int64)
  for step in range(1, num_steps + 1):
    if len(order) < batch:
      order = np.concatenate([order, rng.permutation(len(train_x))])
    rows, order = order[:batch], order[batch:]
    images = _shifted(rng, train_x[rows], config.data.pad)
    state, metrics = train_step(state, {"image": images, "label": train_y[rows]})
    if step % log_every == 0 or step == num_steps:
      curve.append((step, float(metrics["loss"])))
  seconds = time.perf_counter() - start
  # The held-out split in padded, masked batches, scored by train.py's own evaluation.
  padded = math.ceil(len(test_x) / batch) * batch
  rows, mask = np.arange(padded) % len(test_x), np.arange(padded) < len(test_x)
  batches = ({"image": test_x[rows[i:i + batch]], "label": test_y[rows[i:i + batch]],
              "mask": mask[i:i + batch]} for i in range(0, padded, batch))
  results = steps.evaluate(eval_step, state, batches, sharding.create_mesh({"data": 1}))
  ema = results.get("eval_ema_top1")
  return dict(steps=num_steps, dtype=dtype, loss_curve=curve, seconds=seconds,
              top1=100 * results["eval_top1"], ema_top1=None if ema is None else 100 * ema)
