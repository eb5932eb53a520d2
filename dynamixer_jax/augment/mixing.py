"""Mixup / cutmix with smoothed soft targets, and random erasing: the batch-level augmentation.

timm does these in its collate function and GPU prefetcher; here they run inside the jitted train
step. Mixup and cutmix draw one lambda per chunk of ``chunk_size`` examples (the official per-GPU
batch), keyed by (step, chunk), and erasing is keyed by (step, example): so results do not
depend on how many devices share the batch. Imports no TensorFlow.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

ERASE_MODES = ("pixel", "const", "rand")  # config.augment.erase_mode (checked by configlib)


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's targets: off = smoothing / K, on = 1 - smoothing + off."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array):
  """timm's rand_bbox: a (1 - lam) sized box around a uniform centre, clipped to the image.

  Returns (top, bottom, left, right) and lambda corrected to the clipped area (correct_lam).
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  lam = 1.0 - (bottom - top) * (right - left) / (height * width)
  return (top, bottom, left, right), lam


def _mix_chunk(key: jax.Array, images: jax.Array, targets: jax.Array,
               cfg: ml_collections.ConfigDict, round_pixels: bool):
  """One chunk: pair example i with C-1-i; one lambda and (for cutmix) one box for all."""
  k_do, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
  use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
  if cfg.mixup_alpha <= 0:
    use_cutmix = jnp.array(True)
  elif cfg.cutmix_alpha <= 0:
    use_cutmix = jnp.array(False)
  lam_mixup = jax.random.beta(k_mixup, max(cfg.mixup_alpha, 1e-3), max(cfg.mixup_alpha, 1e-3))
  lam_cutmix = jax.random.beta(k_cutmix, max(cfg.cutmix_alpha, 1e-3), max(cfg.cutmix_alpha, 1e-3))
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
  lam = jnp.where(jax.random.uniform(k_do) < cfg.mix_prob, lam, 1.0)
  height, width = images.shape[1:3]
  (top, bottom, left, right), box_lam = cutmix_box(k_box, height, width, lam)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  flipped = images[::-1]
  cut = jnp.where(inside[None, :, :, None], flipped, images)
  blend = images * lam + flipped * (1.0 - lam)
  if round_pixels:  # timm's FastCollateMixup blends uint8 images and rounds (np.rint)
    blend = jnp.round(blend)
  images = jnp.where(use_cutmix, cut, blend)
  lam = jnp.where(use_cutmix & (lam < 1.0), box_lam, lam)
  return images, targets * lam + targets[::-1] * (1.0 - lam), lam


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
              smoothing: float, cfg: ml_collections.ConfigDict, round_pixels: bool = False):
  """Mixup or cutmix per chunk ('batch' mode per chunk) -> (images, soft targets, lambdas).

  ``key`` should already depend on the step; chunk c uses ``fold_in(key, c)``. With both alphas
  0 the images are untouched and the targets are the smoothed one-hot labels. ``round_pixels``:
  the images are pixel values (0..255) and a mixup blend is rounded, as timm's uint8 collate.
  """
  targets = smoothed_one_hot(labels, num_classes, smoothing)
  n = images.shape[0]
  if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
    return images, targets, jnp.ones((1,), jnp.float32)
  chunk = min(cfg.chunk_size, n)
  if n % chunk:
    raise ValueError(f"The batch of {n} examples does not split into chunks of "
                     f"augment.chunk_size={cfg.chunk_size}; make the global batch a multiple of it.")
  chunks = n // chunk
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(chunks))
  split = lambda x: x.reshape((chunks, chunk) + x.shape[1:])
  images, targets, lam = jax.vmap(lambda k, x, t: _mix_chunk(k, x, t, cfg, round_pixels))(
      keys, split(images), split(targets))
  return images.reshape((n,) + images.shape[2:]), targets.reshape(n, num_classes), lam


def erase_box(key: jax.Array, height: int, width: int, scale=(0.02, 1 / 3),
              ratio=(0.3, 1 / 0.3), attempts: int = 10):
  """timm's RandomErasing box: uniform area, log-uniform ratio, first of 10 draws that fits.

  Returns (top, left, h, w); h = w = 0 when no draw fits (nothing is erased, as in timm).
  """
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits)
  h, w = jnp.where(fits.any(), h[first], 0), jnp.where(fits.any(), w[first], 0)
  top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
  return top, left, h, w


def random_erase(key: jax.Array, images: jax.Array, prob: float, mode: str = "pixel"):
  """Per image, with probability ``prob``, one box replaced by N(0, 1) noise ('pixel': per pixel
  and channel; 'rand': one colour per box) or zeros ('const'). Images are normalised floats.

  Returns (images, the erased mask of shape (N, H, W)). Example i uses ``fold_in(key, i)``.
  """
  n, height, width, channels = images.shape
  if prob <= 0:
    return images, jnp.zeros((n, height, width), bool)

  def one(index, image):
    k_do, k_box, k_noise = jax.random.split(jax.random.fold_in(key, index), 3)
    top, left, h, w = erase_box(k_box, height, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    mask &= jax.random.uniform(k_do) < prob
    shape = {"pixel": image.shape, "rand": (1, 1, channels), "const": None}[mode]
    fill = (jnp.zeros((), image.dtype) if shape is None
            else jax.random.normal(k_noise, shape, image.dtype))
    return jnp.where(mask[..., None], fill, image), mask

  return jax.vmap(one)(jnp.arange(n), images)
