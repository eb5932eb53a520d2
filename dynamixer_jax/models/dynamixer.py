"""DynaMixer (Wang et al., ICML 2022): an MLP whose token mixing weights depend on the input.

Written to the official PyTorch code (ziyuwwang/DynaMixer @ 038b73b); the module tree mirrors its
state-dict names (``patch_embed/proj``, ``network_0_1/attn/mix_h/generate``, ``norm``, ``head``,
PyTorch's ``network.0.1`` becoming ``network_0_1``) so that ``convert.py`` is a short table.
Numerics follow it too: LayerNorm epsilon 1e-5, exact (erf) GELU, no bias on the channel branch.
"""

from typing import Any, NamedTuple, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamixer_jax.models.layers import (branch_draws, check_images, drop_path, exact_gelu,
                                         stochastic_depth_per_block, torch_conv_bias_init,
                                         torch_conv_kernel_init, torch_linear_kernel_init)

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; Flax's is 1e-6.


class Entry(NamedTuple):
  """One entry of the official per-"stage" lists (``layers[i]``, ``embed_dims[i]``, ...).

  ``transition`` puts a 2x2 stride-2 convolution after this entry (halving the token grid);
  an entry whose width differs from the next one's gets a 1x1 convolution instead.
  """

  depth: int
  width: int
  segments: int
  reduced_dim: int = 2
  mlp_ratio: float = 3.0
  transition: bool = False


def _dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=torch_linear_kernel_init())


def _per_token(layer: nn.Module, x: jax.Array) -> jax.Array:
  """``layer(x)`` on x flattened to (tokens, channels): the same numbers, but XLA:CPU computes the
  weight gradient of a Dense on 2-D data much faster than on (B, H, W, C) (benchmark.py)."""
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


def _layer_norm(dtype: Any, name: str, x: jax.Array) -> jax.Array:
  """torch's LayerNorm of x's last axis, computed on (tokens, channels) like the Dense layers
  (on XLA:CPU the 4-D form costs ~5 % of a DynaMixer-S train step, benchmark.py)."""
  # use_fast_variance=False computes E[(x - mean)^2] as torch does, for fp32 fidelity.
  norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)
  return _per_token(norm, x)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 (timm's Mlp)."""

  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _per_token(_dense(self.hidden_dim, self.dtype, "fc1"), x)
    x = exact_gelu(x)
    return _per_token(_dense(self.out_dim, self.dtype, "fc2"), x)


class PatchConv(nn.Module):
  """A k x k stride-k convolution, no padding, no norm: the patch embedding and the downsampling."""

  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.patch_size
    fan_in = k * k * x.shape[-1]
    return nn.Conv(self.features, (k, k), strides=(k, k), padding="VALID", dtype=self.dtype,
                   kernel_init=torch_conv_kernel_init(), bias_init=torch_conv_bias_init(fan_in),
                   name="proj")(x)


class DynaMixerOp(nn.Module):
  """Dynamic mixing of the L tokens of each sequence, separately in each of S channel segments.

  The mixing matrix of segment s is generated from the sequence itself: every token is
  compressed from all C channels to d features per segment, the L*d features of a segment are
  mapped by one ``generate`` layer (shared by all segments) to L*L logits, and a softmax over
  the input tokens turns them into mixing weights.
  """

  seq_len: int
  segments: int
  reduced_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, length, channels = x.shape
    s, d = self.segments, self.reduced_dim
    reduced = _per_token(_dense(s * d, self.dtype, "compress"), x)
    reduced = einops.rearrange(reduced, "n l (s d) -> n s (l d)", s=s)
    logits = _per_token(_dense(length * length, self.dtype, "generate"), reduced)
    # Unit i*L + j weighs input token i for output token j; the softmax runs over i. Putting i
    # last makes the mixing a plain batched (j, i) @ (i, c) matmul, which XLA:CPU hands to its
    # fast matmul library (the batched mixing took 212 -> 68 ms of a DynaMixer-S train step).
    logits = einops.rearrange(logits, "n s (i j) -> n s j i", i=length)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    segments = einops.rearrange(x, "n i (s c) -> n s i c", s=s)
    mixed = jnp.einsum("nsji,nsic->nsjc", weights, segments)
    mixed = einops.rearrange(mixed, "n s j c -> n j (s c)")
    return _per_token(_dense(channels, self.dtype, "out"), mixed)


class TokenMixing(nn.Module):
  """Mixes along H (``mix_h``), along W (``mix_w``) and across channels (``mlp_c``), then fuses
  the three with per-channel weights computed from the image (the official ``DynaMixerBlock``)."""

  segments: int
  reduced_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h != w:
      raise ValueError(f"DynaMixer needs a square token grid; got {h}x{w}.")
    op = lambda name: DynaMixerOp(h, self.segments, self.reduced_dim, self.dtype, name=name)
    along_h = op("mix_h")(einops.rearrange(x, "b h w c -> (b w) h c"))
    along_h = einops.rearrange(along_h, "(b w) h c -> b h w c", b=b)
    along_w = op("mix_w")(einops.rearrange(x, "b h w c -> (b h) w c"))
    along_w = einops.rearrange(along_w, "(b h) w c -> b h w c", b=b)
    across_c = _per_token(_dense(c, self.dtype, "mlp_c", use_bias=False), x)

    summary = jnp.mean(along_h + along_w + across_c, axis=(1, 2))
    branch_logits = Mlp(c // 4, 3 * c, self.dtype, name="reweight")(summary)
    # The official layout is (C, 3): unit 3*c + k weighs branch k of channel c.
    branch_weights = jax.nn.softmax(branch_logits.reshape(b, c, 3).astype(jnp.float32), axis=-1)
    branch_weights = branch_weights.astype(x.dtype)[:, None, None, :, :]
    fused = (along_h * branch_weights[..., 0] + along_w * branch_weights[..., 1]
             + across_c * branch_weights[..., 2])
    return _per_token(_dense(c, self.dtype, "proj"), fused)


class DynaMixerBlock(nn.Module):
  """Pre-norm residual block: token mixing, then a channel MLP (the official ``VisionBlock``)."""

  segments: int
  reduced_dim: int
  mlp_ratio: float = 3.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               drop_draws: Optional[jax.Array] = None) -> jax.Array:
    """``drop_draws``: (2, batch) U[0, 1) draws for the two branches' stochastic depth (the
    network passes its own); in training without them the block draws from ``'dropout'``."""
    channels = x.shape[-1]
    first, second = branch_draws(self, drop_draws, x.shape[0], train, self.drop_path_rate)
    y = _layer_norm(self.dtype, "norm1", x)
    y = TokenMixing(self.segments, self.reduced_dim, self.dtype, name="attn")(y)
    x = x + drop_path(y, self.drop_path_rate, first)
    y = _layer_norm(self.dtype, "norm2", x)
    y = Mlp(int(channels * self.mlp_ratio), channels, self.dtype, name="mlp")(y)
    return x + drop_path(y, self.drop_path_rate, second)


class DynaMixer(nn.Module):
  """The DynaMixer network (the official ``VisionModel``).

  ``entries`` is the official per-entry lists as a sequence of ``Entry``. The token grid of each
  entry follows from ``image_size``, ``patch_size`` and the transitions before it; the
  ``generate`` layers are sized for that grid, so a model accepts one image size only.
  ``num_classes=0`` returns the pooled features instead of logits. ``remat=True`` recomputes each
  block's activations in the backward pass (``nn.remat``): less memory, about one more forward
  of compute, the same parameters and numbers.
  """

  entries: Sequence[Entry]
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 7
  in_channels: int = 3
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  def token_grids(self) -> list[int]:
    """Tokens per side for each entry; raises when the image does not fit the patches."""
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                       f"{self.patch_size}.")
    grid, grids = self.image_size // self.patch_size, []
    for i, entry in enumerate(self.entries):
      grids.append(grid)
      if entry.width % entry.segments:
        raise ValueError(f"entry {i}: width {entry.width} is not divisible by its "
                         f"{entry.segments} segments.")
      if entry.transition and i + 1 < len(self.entries):
        if grid % 2:
          raise ValueError(f"entry {i} is a transition but its {grid}x{grid} token grid is odd; "
                           "pick an image_size that keeps the grid even.")
        grid //= 2
    return grids

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    check_images(images, self.patch_size, self.in_channels, self.image_size, "DynaMixer")
    self.token_grids()
    entries = list(self.entries)
    per_block = iter(stochastic_depth_per_block(self, sum(e.depth for e in entries),
                                                images.shape[0], train, self.drop_path_rate))

    # static_argnums counts the module as 0: ``train`` (2) is a Python bool, not traced.
    block = nn.remat(DynaMixerBlock, static_argnums=(2,)) if self.remat else DynaMixerBlock
    x = PatchConv(entries[0].width, self.patch_size, self.dtype, name="patch_embed")(images)
    index = 0  # position in the official ``network`` ModuleList
    for i, entry in enumerate(entries):
      for j in range(entry.depth):
        rate, draws = next(per_block)
        x = block(entry.segments, entry.reduced_dim, entry.mlp_ratio, rate, self.dtype,
                  name=f"network_{index}_{j}")(x, train, draws)
      index += 1
      if i + 1 < len(entries) and (entry.transition or entry.width != entries[i + 1].width):
        x = PatchConv(entries[i + 1].width, 2 if entry.transition else 1, self.dtype,
                      name=f"network_{index}")(x)
        index += 1

    x = einops.rearrange(x, "b h w c -> b (h w) c")
    x = _layer_norm(self.dtype, "norm", x)
    x = jnp.mean(x, axis=1)
    if self.num_classes == 0:
      return x
    return _dense(self.num_classes, self.dtype, "head")(x)
