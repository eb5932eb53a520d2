"""FLOP counting from XLA's cost analysis."""

import flax.linen as nn
import pytest

from dynamixer_jax import models
from dynamixer_jax.benchmark import flops

# torch FlopCounterMode counts of the official models (spec section 7), 2 FLOPs per MAC.
OFFICIAL_GFLOPS = {"dynamixer_s": 14.605, "dynamixer_m": 33.961, "dynamixer_l": 54.687}


@pytest.mark.parametrize("name", sorted(OFFICIAL_GFLOPS))
def test_dynamixer_flops_within_five_percent_of_official(name):
  measured = flops.forward_flops(models.create_model(name)) / 1e9
  assert measured == pytest.approx(OFFICIAL_GFLOPS[name], rel=0.05)
  assert measured > OFFICIAL_GFLOPS[name]  # XLA also counts GELU, softmax and norms


class _DenseStack(nn.Module):
  widths: tuple
  in_channels: int = 3
  image_size: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    for w in self.widths:
      x = nn.Dense(w, use_bias=False)(x)
    return x


def test_bias_free_dense_stack_matches_analytic_count():
  model = _DenseStack((16, 8, 5))
  inputs = 4 * 4 * 3
  analytic = 2 * (inputs * 16 + 16 * 8 + 8 * 5)
  assert flops.forward_flops(model, batch=3) == analytic
