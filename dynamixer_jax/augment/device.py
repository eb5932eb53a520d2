"""The per-image and batch augmentation of a train step, on the device, in timm's order.

The host ships the crop as uint8, resized to the train size or on a canvas for
``train_size_images`` to resize (``augment.resize``); inside the jitted step each image is then
flipped (p 0.5) and RandAugmented on its uint8 pixels, the batch is mixed (mixup / cutmix per
chunk, on pixel values, rounded as timm's uint8 collate), normalised, and randomly erased.

Keys: per image ``fold_in(step key, position in the global batch)``, per chunk ``fold_in(step
key, chunk)``. The position is global, so a batch is augmented the same on any mesh and after a
resume. RandAugment runs per image with ``lax.map`` on CPU (only the drawn op runs) and with
``vmap`` on GPU/TPU (every op runs, the drawn one is kept; no data-dependent control flow); the
two give the same bits (``randaugment.rand_augment_batch``). With a mesh, ``lax.map`` runs
inside ``shard_map`` so that each device maps over its own rows.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from dynamixer_jax.augment import mixing, randaugment, resize

BATCHINGS = ("auto",) + randaugment.BATCHING  # config.augment.randaugment_batching

# Sub-keys of a step's augmentation key.
_FLIP, _RANDAUGMENT, _MIX, _ERASE = range(4)


def resolve_batching(setting: str) -> str:
  """'auto': 'map' on CPU (a real branch per image is cheapest), 'vmap' on GPU/TPU."""
  if setting == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return setting


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """Pixels (uint8 or float, 0..255) -> float32 normalised with per-channel mean/std given for
  pixels in 0..1."""
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def example_keys(key: jax.Array, num: int) -> jax.Array:
  """One key per position of the global batch: ``fold_in(key, i)``."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))


def flip(keys: jax.Array, images: jax.Array) -> jax.Array:
  """Horizontal flip of each image with probability 0.5 (timm's RandomHorizontalFlip)."""
  flipped = jax.vmap(lambda k: jax.random.uniform(k) < 0.5)(keys)
  return jnp.where(flipped[:, None, None, None], images[:, :, ::-1], images)


def rand_augment(keys: jax.Array, images: jax.Array, policy: randaugment.RandAugmentPolicy,
                 fill, interpolation: str, batching: str,
                 mesh: Optional[Mesh] = None) -> jax.Array:
  """RandAugment of each uint8 image with its key; ``batching`` 'map' or 'vmap'."""
  run = lambda k, x: randaugment.rand_augment_batch(k, x, policy, fill, interpolation, batching)
  if mesh is None or batching == "vmap" or mesh.devices.size == 1:
    return run(keys, images)  # vmap: elementwise over the batch, any sharding works
  rows = P(mesh.axis_names)
  # check_vma=False: the op table mixes per-device and constant values (e.g. identity matrices).
  return jax.shard_map(run, mesh=mesh, in_specs=(rows, rows), out_specs=rows,
                       check_vma=False)(keys, images)


def interpolation_of(train_interpolation: str) -> str:
  """RandAugment's resampler follows the train interpolation, as timm passes it on."""
  return train_interpolation if train_interpolation in randaugment.INTERPOLATIONS else "random"


def train_size_images(batch: dict[str, jax.Array], size: int) -> jax.Array:
  """The batch's uint8 images at the train size: crops the host shipped on a canvas (with
  'crop_size' and 'bicubic', ``data.device_resize_canvas``) are resized here, the rest are
  already at it."""
  if "crop_size" not in batch:
    return batch["image"]
  return resize.resize_crops(batch["image"], batch["crop_size"], batch["bicubic"], size)


def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
                  config: ml_collections.ConfigDict,
                  mesh: Optional[Mesh] = None) -> tuple[jax.Array, jax.Array]:
  """uint8 crops of the global batch -> (normalised float32 images, soft targets).

  ``config``: the run's config (``augment``, ``mean``/``std``, ``label_smoothing``,
  ``data.train_interpolation``). ``key`` should already depend on the step.
  """
  aug = config.augment
  keys = lambda part: example_keys(jax.random.fold_in(key, part), images.shape[0])
  if aug.hflip:
    images = flip(keys(_FLIP), images)
  policy = randaugment.parse_policy(aug.randaugment)
  if policy is not None:
    images = rand_augment(keys(_RANDAUGMENT), images, policy,
                          randaugment.fill_from_mean(config.mean),
                          interpolation_of(config.data.train_interpolation),
                          resolve_batching(aug.randaugment_batching), mesh)
  images, targets, _ = mixing.mix_batch(jax.random.fold_in(key, _MIX), images.astype(jnp.float32),
                                        labels, num_classes, config.label_smoothing, aug,
                                        round_pixels=True)
  images = normalize(images, config.mean, config.std)
  images, _ = mixing.random_erase(jax.random.fold_in(key, _ERASE), images, aug.erase_prob,
                                  aug.erase_mode)
  return images, targets
