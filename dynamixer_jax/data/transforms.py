"""Per-example transforms of the host pipeline, in TensorFlow: decode, crop, resize.

Each follows what the official code runs (timm 0.4.12 and torchvision on PIL images). Every random
draw comes from a per-example stateless key, so an image depends only on (seed, epoch, example
index) and a resumed run sees the same images.
"""

import math
from typing import Optional

import ml_collections
import tensorflow as tf

from dynamixer_jax import preprocessing
from dynamixer_jax.data import tf_randaugment

RRC_SCALE = (0.08, 1.0)  # timm's RandomResizedCrop defaults
RRC_RATIO = (3 / 4, 4 / 3)
parse_policy = tf_randaugment.parse_policy


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP -> uint8 (H, W, 3): grayscale is replicated, alpha dropped."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resize(image: tf.Tensor, height, width, method: str = "bicubic",
           key: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Antialiased resize (like PIL) rounded back to uint8; method 'random' picks bilinear or
  bicubic from ``key``, as timm's random train interpolation does."""
  def run(name):
    out = tf.image.resize(image, tf.stack([height, width]), method=name, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  if method == "random":
    bicubic = tf.random.stateless_uniform([], key) < 0.5
    return tf.cond(bicubic, lambda: run("bicubic"), lambda: run("bilinear"))
  return run(method)


def random_resized_crop_box(key: tf.Tensor, height, width, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """timm's box: area uniform in ``scale``, log-uniform aspect ratio, first of 10 draws that
  fits, else a center crop with the ratio clamped. Returns (top, left, h, w) int32."""
  h_img, w_img = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  k_area, k_ratio, k_pos = tf.unstack(tf.random.experimental.stateless_split(key, 3))
  area = h_img * w_img * tf.random.stateless_uniform([attempts], k_area, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([attempts], k_ratio, math.log(ratio[0]),
                                              math.log(ratio[1])))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = h[first], w[first]
  u = tf.random.stateless_uniform([2], k_pos)
  top = tf.minimum(tf.floor(u[0] * (h_img - h + 1)), h_img - h)
  left = tf.minimum(tf.floor(u[1] * (w_img - w + 1)), w_img - w)
  # Fallback: the whole image, cut to the nearest allowed ratio, centred.
  in_ratio = w_img / h_img
  fw = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  fh = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)
  ok = tf.reduce_any(fits)
  box = [tf.where(ok, top, tf.floor((h_img - fh) / 2)), tf.where(ok, left, tf.floor((w_img - fw) / 2)),
         tf.where(ok, h, fh), tf.where(ok, w, fw)]
  return tuple(tf.cast(v, tf.int32) for v in box)


def preprocess_train(image: tf.Tensor, key: tf.Tensor, data: ml_collections.ConfigDict,
                     encoded: bool = False) -> tf.Tensor:
  """Random crop, horizontal flip, then RandAugment (timm's order) of one image.

  ``image`` is uint8 (H, W, 3), or encoded bytes when ``encoded``. ``key`` is a stateless seed
  (int64, shape [2]) unique to (seed, epoch, example); all randomness comes from it.
  """
  if encoded:
    image = decode_image(image)
  crop_key, flip_key, aug_key, interp_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 4))
  size = data.image_size
  method = data.train_interpolation
  if data.train_crop == "random_resized":
    shape = tf.shape(image)
    top, left, h, w = random_resized_crop_box(crop_key, shape[0], shape[1], RRC_SCALE, RRC_RATIO)
    image = resize(image[top:top + h, left:left + w], size, size, method, interp_key)
  else:
    image = resize(image, size, size, method, interp_key)
    image = tf.pad(image, [[data.pad, data.pad], [data.pad, data.pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_key)
  if data.hflip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
  policy = parse_policy(data.randaugment)
  if policy is not None:
    image = tf_randaugment.rand_augment(tf.ensure_shape(image, [size, size, 3]), aug_key, policy)
  return tf.ensure_shape(image, [size, size, 3])


def preprocess_eval(image: tf.Tensor, prep: preprocessing.EvalPreprocessing,
                    encoded: bool = False) -> tf.Tensor:
  """The eval geometry of ``prep``: resize the shorter side to ``prep.resize`` and center-crop
  ``prep.image_size`` ('center'), or resize straight to the size ('resize', the official CIFAR
  transfer script). ``image`` is uint8 (H, W, 3), or encoded bytes when ``encoded``."""
  if encoded:
    image = decode_image(image)
  size, method = prep.image_size, prep.interpolation
  if prep.crop == "resize":
    return tf.ensure_shape(resize(image, size, size, method), [size, size, 3])
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  hw = tf.maximum(tf.cast(tf.round(hw * prep.resize / tf.reduce_min(hw)), tf.int32), size)
  image = resize(image, hw[0], hw[1], method)
  top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
  return tf.ensure_shape(tf.slice(image, [top, left, 0], [size, size, 3]), [size, size, 3])
