"""Forward FLOPs per image from XLA's own cost analysis of the lowered model (no compile).

The count is a property of the model, not of the device, so it is taken from the model lowered
for the CPU, which every JAX installation has: on an NVIDIA GPU (jax 0.11.2, H200) the lowered
program's ``cost_analysis()`` returned None.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def forward_flops(model: nn.Module, image_size: Optional[int] = None, batch: int = 1,
                  variables: Optional[Any] = None) -> float:
  """FLOPs of one inference forward pass, per image (2 FLOPs per multiply-add).

  XLA also counts elementwise work (GELU, softmax, normalisation), so this lands a few percent
  above a count of matrix multiplies alone.
  """
  size = image_size or model.image_size or 224
  images = jax.ShapeDtypeStruct((batch, size, size, model.in_channels), jnp.float32)
  if variables is None:
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  with jax.default_device(jax.devices("cpu")[0]):
    cost = forward.lower(variables, images).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0]
  if not cost or "flops" not in cost:
    raise RuntimeError(f"XLA's cost analysis of the lowered model gave no FLOPs ({cost!r}).")
  return float(cost["flops"]) / batch
