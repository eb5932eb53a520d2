"""RandAugment in tf.data, on the host (to be replaced by the on-device version).

Each op follows the semantics of timm 0.4.12 (which follows PIL): the same op list, magnitude
ranges and rounding, written with plain TensorFlow ops. Every random draw comes from the
per-example key, so an image depends only on (seed, epoch, example index).
"""

import dataclasses
import math
from typing import Callable, Optional

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # timm fills geometric ops with the ImageNet mean in 0..255
TRANSLATE_PCT = 0.45
# timm _RAND_INCREASING_TRANSFORMS, in its order.
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
  """A parsed ``rand-...`` string: ``num_ops`` ops per image at ``magnitude`` +- ``magnitude_std``."""
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  prob: float = 0.5


def parse_policy(policy: str) -> Optional[RandAugmentPolicy]:
  """timm's ``rand-m9-mstd0.5-inc1`` syntax; '' means no RandAugment."""
  if not policy:
    return None
  parts = policy.split("-")
  if parts[0] != "rand":
    raise ValueError(f"data.randaugment={policy!r}: only RandAugment policies ('rand-m9-mstd0.5-"
                     "inc1') are supported, or '' for none.")
  fields, increasing = {}, False
  for part in parts[1:]:
    key = next((k for k in ("mstd", "inc", "m", "n") if part.startswith(k)), None)
    try:
      value = float(part[len(key):]) if key else None
    except ValueError:
      value = None
    if value is None:
      raise ValueError(f"data.randaugment={policy!r}: cannot read {part!r}; known parts are "
                       "m<magnitude>, n<ops>, mstd<std>, inc<0|1> (e.g. 'rand-m9-mstd0.5-inc1').")
    if key == "inc":
      increasing = bool(value)
    else:
      fields[key] = value
  if not increasing:
    raise ValueError(f"data.randaugment={policy!r}: only the increasing op set (inc1) is "
                     "implemented; add '-inc1'.")
  return RandAugmentPolicy(num_ops=int(fields.get("n", 2)), magnitude=fields.get("m", 10.0),
                           magnitude_std=fields.get("mstd", 0.0))


# --- Colour ops (uint8 in, uint8 out, as PIL computes them) --------------------------------------


def _grey(image: tf.Tensor) -> tf.Tensor:
  """PIL's 'L' conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (H, W, 1) int32."""
  rgb = tf.cast(image, tf.int32)
  grey = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768
  return tf.bitwise.right_shift(grey, 16)[..., None]


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL's Image.blend: degenerate + factor * (image - degenerate), clipped and truncated."""
  d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(d + factor * (x - d), 0.0, 255.0), tf.uint8)


def _per_channel_lut(image: tf.Tensor, make_lut: Callable) -> tf.Tensor:
  """Applies ``make_lut(channel values) -> 256 int32`` to each channel separately."""
  channels = []
  for c in range(3):
    values = tf.cast(image[..., c], tf.int32)
    channels.append(tf.gather(make_lut(values), values))
  return tf.cast(tf.clip_by_value(tf.stack(channels, -1), 0, 255), tf.uint8)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretch each channel to 0..255 (PIL ImageOps.autocontrast, cutoff 0)."""
  def lut(values):
    lo = tf.cast(tf.reduce_min(values), tf.float32)
    hi = tf.cast(tf.reduce_max(values), tf.float32)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.cast(tf.range(256, dtype=tf.float32) * scale - lo * scale, tf.int32)
    return tf.where(hi > lo, stretched, tf.range(256))
  return _per_channel_lut(image, lut)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation per channel (PIL ImageOps.equalize)."""
  def lut(values):
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(values))  # count of the last non-empty bin
    step = (tf.reduce_sum(hist) - last) // 255
    mapped = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    return tf.where(step > 0, mapped, tf.range(256))
  return _per_channel_lut(image, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keep the top ``bits`` bits (0 bits: black)."""
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Invert pixels >= threshold (threshold 256: no change)."""
  return tf.where(tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32), image, 255 - image)


def solarize_add(image: tf.Tensor, add, threshold: int = 128) -> tf.Tensor:
  """Add ``add`` to pixels below 128, saturating at 255."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(add, tf.int32), 255), x), tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  return _blend(tf.tile(_grey(image), [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float32)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with PIL's SMOOTH filter (3x3, centre 5, sum 13; border pixels kept)."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(tf.clip_by_value(tf.round(smooth), 0, 255), [[1, 1], [1, 1], [0, 0]])
  inside = tf.pad(tf.ones(tf.shape(smooth)[:2] - 2), [[1, 1], [1, 1]])[..., None] > 0
  return _blend(tf.where(inside, smooth, x), image, factor)


# --- Geometric ops: PIL affine matrices (output -> input, pixel corners at integers) -------------


def affine(image: tf.Tensor, matrix, fill=FILL) -> tf.Tensor:
  """PIL ``Image.transform(AFFINE, matrix)`` with a constant RGB fill, bilinear."""
  a, b, c, d, e, f = [tf.cast(m, tf.float32) for m in matrix]
  # PIL samples at pixel centres (x + 0.5); tf at integer indices.
  c = c + 0.5 * (a + b) - 0.5
  f = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  x = tf.cast(image, tf.float32)
  x = tf.concat([x, tf.ones_like(x[..., :1])], -1)  # the 4th channel says how much is inside
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  out = out[..., :3] + (1.0 - out[..., 3:]) * tf.constant(fill, tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Counter-clockwise about the centre, as PIL's Image.rotate."""
  h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  angle = -tf.cast(degrees, tf.float32) * math.pi / 180
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = w / 2, h / 2
  return affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def shear_x(image: tf.Tensor, factor) -> tf.Tensor:
  return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, factor) -> tf.Tensor:
  return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0])


def translate_x_rel(image: tf.Tensor, pct) -> tf.Tensor:
  return affine(image, [1.0, 0.0, pct * tf.cast(tf.shape(image)[1], tf.float32), 0.0, 1.0, 0.0])


def translate_y_rel(image: tf.Tensor, pct) -> tf.Tensor:
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pct * tf.cast(tf.shape(image)[0], tf.float32)])


# --- RandAugment ---------------------------------------------------------------------------------


def apply_op(name: str, image: tf.Tensor, magnitude, sign) -> tf.Tensor:
  """One op of the increasing set at ``magnitude`` in [0, 10]; ``sign`` is +1 or -1."""
  level = tf.cast(magnitude, tf.float32) / MAX_LEVEL
  enhance = 1.0 + sign * level * 0.9
  ops = {
      "AutoContrast": lambda: auto_contrast(image),
      "Equalize": lambda: equalize(image),
      "Invert": lambda: invert(image),
      "Rotate": lambda: rotate(image, sign * level * 30.0),
      "PosterizeIncreasing": lambda: posterize(image, 4 - tf.cast(level * 4, tf.int32)),
      "SolarizeIncreasing": lambda: solarize(image, 256 - tf.cast(level * 256, tf.int32)),
      "SolarizeAdd": lambda: solarize_add(image, tf.cast(level * 110, tf.int32)),
      "ColorIncreasing": lambda: color(image, enhance),
      "ContrastIncreasing": lambda: contrast(image, enhance),
      "BrightnessIncreasing": lambda: brightness(image, enhance),
      "SharpnessIncreasing": lambda: sharpness(image, enhance),
      "ShearX": lambda: shear_x(image, sign * level * 0.3),
      "ShearY": lambda: shear_y(image, sign * level * 0.3),
      "TranslateXRel": lambda: translate_x_rel(image, sign * level * TRANSLATE_PCT),
      "TranslateYRel": lambda: translate_y_rel(image, sign * level * TRANSLATE_PCT),
  }
  return tf.ensure_shape(ops[name](), image.shape)


def draw_magnitude(key: tf.Tensor, policy: RandAugmentPolicy) -> tf.Tensor:
  """timm: gauss(magnitude, std), clipped to [0, 10], drawn anew for every op application."""
  noise = tf.random.stateless_normal([], key) * policy.magnitude_std
  return tf.clip_by_value(policy.magnitude + noise, 0.0, MAX_LEVEL)


def rand_augment(image: tf.Tensor, key: tf.Tensor, policy: RandAugmentPolicy) -> tf.Tensor:
  """``num_ops`` ops drawn uniformly with replacement (timm's default), each applied with
  probability 0.5 at a noisy magnitude, with a random sign for the signed ops."""
  for op_key in tf.unstack(tf.random.experimental.stateless_split(key, policy.num_ops)):
    k_draw, k_mag = tf.unstack(tf.random.experimental.stateless_split(op_key, 2))
    u = tf.random.stateless_uniform([3], k_draw)
    index = tf.minimum(tf.cast(u[0] * len(OPS), tf.int32), len(OPS) - 1)
    sign = tf.where(u[2] > 0.5, -1.0, 1.0)  # timm negates when random() > 0.5
    magnitude = draw_magnitude(k_mag, policy)
    branches = [lambda name=name, x=image: apply_op(name, x, magnitude, sign) for name in OPS]
    image = tf.cond(u[1] <= policy.prob, lambda b=branches: tf.switch_case(index, b),
                    lambda x=image: x)
  return image
