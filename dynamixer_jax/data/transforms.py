"""Per-example transforms of the host pipeline, in TensorFlow: decode (only the crop, for
JPEGs), crop, resize (the train crop's resize may move to the device: ``crop_for_the_device``).
Everything else per image runs on the device (``augment.device``).

Each follows what the official code runs (timm 0.4.12 and torchvision on PIL images). Every random
draw comes from a per-example stateless key, so an image depends only on (seed, epoch, example
index) and a resumed run sees the same images.
"""

import math
from typing import Optional

import ml_collections
import tensorflow as tf

from dynamixer_jax import preprocessing

RRC_SCALE = (0.08, 1.0)  # timm's RandomResizedCrop defaults
RRC_RATIO = (3 / 4, 4 / 3)


# libjpeg's accurate integer DCT, which PIL (and so timm and torchvision) decodes with. TF's
# default ("", the fast integer DCT) moved 59-69 % of the pixels of china.jpg and flower.jpg by up
# to 14 levels; with this one the decoded pixels equal PIL's exactly (tested).
JPEG_DCT = "INTEGER_ACCURATE"


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP -> uint8 (H, W, 3): grayscale is replicated, alpha dropped; JPEGs
  decode to PIL's pixels."""
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=JPEG_DCT),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def is_bicubic(method: str, key: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Whether a train image is resized bicubic: method 'random' draws it from ``key`` (timm's
  random train interpolation: bilinear or bicubic, even odds)."""
  if method == "random":
    return tf.random.stateless_uniform([], key) < 0.5
  return tf.constant(method == "bicubic")


def resize(image: tf.Tensor, height, width, method: str = "bicubic",
           key: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Antialiased resize (like PIL) rounded back to uint8; method 'random' picks bilinear or
  bicubic from ``key`` (``is_bicubic``)."""
  def run(name):
    out = tf.image.resize(image, tf.stack([height, width]), method=name, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  if method == "random":
    return tf.cond(is_bicubic(method, key), lambda: run("bicubic"), lambda: run("bilinear"))
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


def _crop_window(image: tf.Tensor, key: tf.Tensor, encoded: bool) -> tf.Tensor:
  """timm's RandomResizedCrop window of one image, decoding only that window when it can.

  A JPEG's size is read from its header (no decode) and only the window is decoded
  (``decode_and_crop_jpeg``): the same box as ``random_resized_crop_box`` on the decoded image,
  and the same pixels (tested). Other formats (and pixels) are decoded whole, then cropped.
  """
  def full():
    pixels = decode_image(image) if encoded else image
    shape = tf.shape(pixels)
    top, left, h, w = random_resized_crop_box(key, shape[0], shape[1], RRC_SCALE, RRC_RATIO)
    return pixels[top:top + h, left:left + w]

  if not encoded:
    return full()

  def window():
    shape = tf.image.extract_jpeg_shape(image)
    top, left, h, w = random_resized_crop_box(key, shape[0], shape[1], RRC_SCALE, RRC_RATIO)
    # One more pixel on every side (where the image has it), cut off after decoding: libjpeg
    # upsamples subsampled chroma (4:2:0, most photos) from neighbouring pixels, and treats the
    # edge of a decoded window as the image's edge, which moves the border pixels by up to ~15
    # levels. With the margin the window equals decode-then-crop exactly (tested).
    pad_top, pad_left = tf.minimum(top, 1), tf.minimum(left, 1)
    box = tf.stack([top - pad_top, left - pad_left,
                    tf.minimum(h + 1 + pad_top, shape[0] - top + pad_top),
                    tf.minimum(w + 1 + pad_left, shape[1] - left + pad_left)])
    decoded = tf.image.decode_and_crop_jpeg(image, box, channels=3, dct_method=JPEG_DCT)
    return decoded[pad_top:pad_top + h, pad_left:pad_left + w]

  cropped = tf.cond(tf.io.is_jpeg(image), window, full)
  cropped.set_shape([None, None, 3])
  return cropped


def crop_for_the_device(crop: tf.Tensor, size: int, canvas: int, method: str,
                        key: tf.Tensor) -> dict[str, tf.Tensor]:
  """A crop whose sides fit ``canvas`` is shipped as it is, with its size and interpolation, and
  resized on the device (``augment.resize``; the batch pads it to the canvas). A larger one is
  resized here, as without a canvas, and travels as a crop of the train size (which the device's
  resize leaves unchanged, exactly)."""
  shape = tf.shape(crop)
  fits = (shape[0] <= canvas) & (shape[1] <= canvas)
  image = tf.cond(fits, lambda: crop, lambda: resize(crop, size, size, method, key))
  return {"image": image, "crop_size": tf.where(fits, shape[:2], tf.constant([size, size])),
          "bicubic": is_bicubic(method, key)}


def preprocess_train(image: tf.Tensor, key: tf.Tensor, data: ml_collections.ConfigDict,
                     encoded: bool = False) -> dict[str, tf.Tensor]:
  """The host's part of a train image: the random crop, as uint8, resized to the train size
  here or (``data.device_resize_canvas``) on the device.

  ``image`` is uint8 (H, W, 3), or encoded bytes when ``encoded``. ``key`` is a stateless seed
  (int64, shape [2]) unique to (seed, epoch, example); all randomness comes from it. Returns
  {'image'}: the crop at the train size, or with a canvas {'image': the crop, 'crop_size',
  'bicubic'} for ``augment.resize``. Flip, RandAugment and the rest run on the device
  (``augment.device``).
  """
  crop_key, interp_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  size, method, canvas = data.image_size, data.train_interpolation, preprocessing.train_canvas(data)
  if data.train_crop == "random_resized":
    crop = _crop_window(image, crop_key, encoded)
    if canvas:
      return crop_for_the_device(crop, size, canvas, method, interp_key)
    image = resize(crop, size, size, method, interp_key)
  else:  # the official CIFAR transfer recipe: Resize(size), RandomCrop(size, padding=pad)
    image = resize(decode_image(image) if encoded else image, size, size, method, interp_key)
    image = tf.pad(image, [[data.pad, data.pad], [data.pad, data.pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_key)
  return {"image": tf.ensure_shape(image, [size, size, 3])}


def eval_geometry(height, width, prep: preprocessing.EvalPreprocessing):
  """torchvision's ``Resize(prep.resize)`` + ``CenterCrop(prep.image_size)`` as numbers:
  (resized height, resized width, crop top, crop left).

  The shorter side becomes ``prep.resize`` and the longer ``int(resize * long / short)``
  (truncated); the crop starts at ``int(round((side - size) / 2))``, Python's round (half to
  even), which ``tf.round`` also does.
  """
  h, w = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
  short, size = tf.minimum(h, w), tf.constant(prep.image_size, tf.int64)
  resize = tf.constant(prep.resize, tf.int64)
  new_h = tf.where(h <= w, resize, resize * h // short)
  new_w = tf.where(h <= w, resize * w // short, resize)
  new_h, new_w = tf.maximum(new_h, size), tf.maximum(new_w, size)
  offset = lambda side: tf.cast(tf.round(tf.cast(side - size, tf.float64) / 2.0), tf.int64)
  return tuple(tf.cast(v, tf.int32) for v in (new_h, new_w, offset(new_h), offset(new_w)))


def preprocess_eval(image: tf.Tensor, prep: preprocessing.EvalPreprocessing,
                    encoded: bool = False) -> tf.Tensor:
  """The eval geometry of ``prep``: torchvision's resize of the shorter side and center crop
  ('center', ``eval_geometry``), or a resize straight to the size ('resize', the official CIFAR
  transfer script). ``image`` is uint8 (H, W, 3), or encoded bytes when ``encoded``."""
  if encoded:
    image = decode_image(image)
  size, method = prep.image_size, prep.interpolation
  if prep.crop == "resize":
    return tf.ensure_shape(resize(image, size, size, method), [size, size, 3])
  shape = tf.shape(image)
  new_h, new_w, top, left = eval_geometry(shape[0], shape[1], prep)
  image = resize(image, new_h, new_w, method)
  return tf.ensure_shape(tf.slice(image, [top, left, 0], [size, size, 3]), [size, size, 3])
