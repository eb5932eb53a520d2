"""Pieces both model families use: stochastic depth and PyTorch-style initialisers."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example, scaling survivors by 1/keep.

  This is dropout whose mask is shared by every element of one example, so it draws from
  the ``'dropout'`` rng like any Flax dropout.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.rate == 0.0:
      return x
    per_example = tuple(range(1, x.ndim))
    return nn.Dropout(self.rate, broadcast_dims=per_example)(x, deterministic=not train)


def drop_path_rates(rate: float, num_blocks: int) -> Sequence[float]:
  """Linear stochastic-depth schedule from 0 (first block) to ``rate`` (last block)."""
  return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


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
