"""The train crop's antialiased resize, on the device: TensorFlow's resampler, in JAX.

The host decodes only the RandomResizedCrop window, which has a different size for every image;
to batch them it ships each crop in the top-left corner of a fixed canvas
(``data.device_resize_canvas`` pixels a side) with its size, and the train step resizes it here.
On the host the resize took about three quarters of the time of decoding and resizing a crop
(README "What it costs"), so moving it here lets one host core feed several times more images.

The weights are those of ``tf.image.resize(..., antialias=True)`` (TensorFlow's
ScaleAndTranslate: a triangle or Keys-cubic kernel, a = -0.5, widened by the downscale factor
and renormalised over the pixels inside the crop), computed per image from its traced size as a
dense (output, canvas) matrix that is zero outside the crop; the resize is then two matmuls in
full float32. The result equals the host's resize of the same crop up to float rounding (tested:
at most 1 level apart).
"""

import jax
import jax.numpy as jnp


def _triangle(x: jax.Array) -> jax.Array:
  return jnp.maximum(0.0, 1.0 - x)


def _keys_cubic(x: jax.Array) -> jax.Array:
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(in_size: jax.Array, out_size: int, canvas: int,
                   bicubic: jax.Array) -> jax.Array:
  """(out_size, canvas) float32: row o holds the weights of input pixels 0..canvas-1 for output
  pixel o, zero from ``in_size`` on (the padding)."""
  scale = jnp.float32(out_size) / in_size.astype(jnp.float32)
  inv_scale = 1.0 / scale
  kernel_scale = jnp.maximum(inv_scale, 1.0)  # antialiasing widens the kernel when shrinking
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale
  position = jnp.arange(canvas, dtype=jnp.float32) + 0.5
  distance = jnp.abs((position[None, :] - sample[:, None]) * (1.0 / kernel_scale))
  weights = jnp.where(bicubic, _keys_cubic(distance), _triangle(distance))
  weights = jnp.where(jnp.arange(canvas)[None, :] < in_size, weights, 0.0)
  total = jnp.sum(weights, axis=1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)  # a row with no pixel stays zero


def resize_crops(images: jax.Array, crop_sizes: jax.Array, bicubic: jax.Array,
                 size: int) -> jax.Array:
  """uint8 canvases (N, C, C, 3) holding crops of (height, width) ``crop_sizes`` (N, 2) at their
  top left -> uint8 (N, size, size, 3), bicubic where ``bicubic`` (N,) else bilinear, rounded as
  the host rounds."""
  canvas = images.shape[1]
  if images.shape[2] != canvas or images.dtype != jnp.uint8:
    raise ValueError(f"resize_crops takes square uint8 canvases (N, C, C, 3), got "
                     f"{images.dtype} {images.shape}.")

  def one(image, crop_size, cubic):
    rows = resize_weights(crop_size[0], size, canvas, cubic)
    cols = resize_weights(crop_size[1], size, canvas, cubic)
    pixels = image.astype(jnp.float32)
    # Width first, then height, as TensorFlow's op; full float32 (not TF32/bf16 passes on
    # GPU/TPU): the pixels must round as the host's do.
    wide = jnp.einsum("hwc,pw->hpc", pixels, cols, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("hpc,oh->opc", wide, rows, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

  return jax.vmap(one)(images, crop_sizes, bicubic)
