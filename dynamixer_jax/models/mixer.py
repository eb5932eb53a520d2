"""MLP-Mixer (Tolstikhin et al., 2021), written like the paper's Flax listing.

Parameter names equal the official checkpoints' (``stem``, ``MixerBlock_0/token_mixing/Dense_0``,
``pre_head_layer_norm``, ``head``), so an official ``.npz`` loads without renaming. Numerics are the
official ones too: tanh-approximate GELU and LayerNorm epsilon 1e-6 (Flax defaults).
"""

from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamixer_jax.models.layers import (branch_draws, check_images, drop_path,
                                         stochastic_depth_per_block)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, back to the input width."""

  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    y = nn.gelu(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
  """One Mixer layer: an MLP across tokens, then an MLP across channels, each pre-norm residual."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               drop_draws: Optional[jax.Array] = None) -> jax.Array:
    """``drop_draws`` as in ``DynaMixerBlock``: the network's draws for this block's branches."""
    first, second = branch_draws(self, drop_draws, x.shape[0], train, self.drop_path_rate)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MlpBlock(self.tokens_mlp_dim, dtype=self.dtype, name="token_mixing")(y)
    y = jnp.swapaxes(y, 1, 2)
    x = x + drop_path(y, self.drop_path_rate, first)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.channels_mlp_dim, dtype=self.dtype, name="channel_mixing")(y)
    return x + drop_path(y, self.drop_path_rate, second)


class MlpMixer(nn.Module):
  """The MLP-Mixer network: patch stem, ``num_blocks`` Mixer layers, mean pool, linear head.

  ``num_classes=0`` returns the pooled features instead of logits. ``drop_path_rate`` (not in the
  official model, 0 by default) adds stochastic depth, linear over the blocks. ``remat=True``
  recomputes each block's activations in the backward pass (``nn.remat``) to save memory.
  """

  patch_size: int
  num_classes: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_path_rate: float = 0.0
  in_channels: int = 3
  image_size: Optional[int] = None
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    check_images(images, self.patch_size, self.in_channels, self.image_size, type(self).__name__)
    p = self.patch_size
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), dtype=self.dtype, name="stem")(images)
    x = einops.rearrange(x, "n h w c -> n (h w) c")
    # static_argnums counts the module as 0: ``train`` (2) is a Python bool, not traced.
    block = nn.remat(MixerBlock, static_argnums=(2,)) if self.remat else MixerBlock
    per_block = stochastic_depth_per_block(self, self.num_blocks, images.shape[0], train,
                                           self.drop_path_rate)
    for i, (rate, draws) in enumerate(per_block):
      x = block(self.tokens_mlp_dim, self.channels_mlp_dim, rate, self.dtype,
                name=f"MixerBlock_{i}")(x, train, draws)
    x = nn.LayerNorm(dtype=self.dtype, name="pre_head_layer_norm")(x)
    x = jnp.mean(x, axis=1)
    if self.num_classes == 0:
      return x
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                    name="head")(x)
