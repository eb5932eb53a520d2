"""Pieces both model families use: input checks, stochastic depth, PyTorch-style initialisers."""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def drop_path(x: jax.Array, rate: float, uniform: Optional[jax.Array]) -> jax.Array:
  """Stochastic depth: drops a whole residual branch per example, scaling survivors by 1/keep.

  ``uniform`` holds one U[0, 1) draw per example, None where nothing drops (evaluation).
  """
  if rate == 0.0 or uniform is None:
    return x
  keep = 1.0 - rate
  scale = jnp.where(uniform < keep, 1.0 / keep, 0.0).astype(x.dtype)
  return x * scale.reshape(-1, *(1,) * (x.ndim - 1))


def drop_path_draws(module: nn.Module, shape: Sequence[int], train: bool,
                    rate: float) -> Optional[jax.Array]:
  """The U[0, 1) draws of ``drop_path`` from the ``'dropout'`` rng, None where nothing can drop.

  A model draws them for all its blocks at once (``(blocks, 2, batch)``): one random-number
  program instead of one per residual branch (34 in DynaMixer-S), which took its train
  step's compile on a 2-core CPU from 27.4 to 23.0 s in bfloat16 (README, device check).
  """
  if not train or rate == 0.0:
    return None
  return jax.random.uniform(module.make_rng("dropout"), tuple(shape))


def branch_draws(module: nn.Module, given: Optional[jax.Array], batch: int, train: bool,
                 rate: float) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """A block's draws for its two residual branches: the network's ``given`` (2, batch) draws,
  else (a block used on its own, in training) its own from the ``'dropout'`` rng."""
  if given is None or not train:
    given = drop_path_draws(module, (2, batch), train, rate)
  return (None, None) if given is None else (given[0], given[1])


def exact_gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU(): x/2 * (1 + erf(x/sqrt(2))), torch's own formula. ``jax.nn.gelu(x,
  approximate=False)`` computes the same function through erfc, which XLA:CPU expands into both of
  its branches and an exp: 194 of the 2,260 ms of a DynaMixer-S train step (b8, 2-core EPYC)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def drop_path_rates(rate: float, num_blocks: int) -> Sequence[float]:
  """Linear stochastic-depth schedule from 0 (first block) to ``rate`` (last block)."""
  return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def stochastic_depth_per_block(module: nn.Module, num_blocks: int, batch: int, train: bool,
                               rate: float) -> list[tuple[float, Optional[jax.Array]]]:
  """Each block's (rate, (2, batch) draws or None): the linear schedule, and the draws of all
  blocks made at once (``drop_path_draws``)."""
  draws = drop_path_draws(module, (num_blocks, 2, batch), train, rate)
  return list(zip(drop_path_rates(rate, num_blocks),
                  [None] * num_blocks if draws is None else list(draws)))


def torch_linear_kernel_init(stddev: float = 0.02) -> nn.initializers.Initializer:
  """timm's trunc_normal_(std=0.02): cut at +-2 absolute, i.e. +-100 sigma, a plain normal."""
  return nn.initializers.truncated_normal(stddev=stddev, lower=-2.0 / stddev, upper=2.0 / stddev)


def torch_conv_kernel_init() -> nn.initializers.Initializer:
  """PyTorch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Conv2d bias init: U(+-1/sqrt(fan_in))."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_images(images: jax.Array, patch_size: int, in_channels: int,
                  image_size: Optional[int], model: str) -> None:
  """Fail with a message a person can act on instead of an XLA shape error."""
  if images.ndim != 4:
    raise ValueError(f"{model} expects images of shape (batch, height, width, channels) (NHWC); "
                     f"got shape {tuple(images.shape)}.")
  _, h, w, c = images.shape
  if c != in_channels:
    raise ValueError(f"{model} expects {in_channels} channels last (NHWC); got {c} channels in "
                     f"shape {tuple(images.shape)}. Convert grayscale/RGBA images to RGB, or "
                     "transpose NCHW input with x.transpose(0, 2, 3, 1).")
  if image_size is not None and (h, w) != (image_size, image_size):
    raise ValueError(f"{model} was built for {image_size}x{image_size} images; got {h}x{w}. "
                     f"Resize to {image_size}x{image_size}, or build the model with "
                     f"image_size={h} if the architecture allows it.")
  if h % patch_size or w % patch_size:
    raise ValueError(f"{model}: image size {h}x{w} is not divisible by the patch size "
                     f"{patch_size}.")
