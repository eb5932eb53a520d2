"""Architecture tests: parameter counts, shapes, numerics of the building blocks, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamixer_jax import models
from dynamixer_jax.models import dynamixer, layers, mixer

# Counts of the official implementations at 224 px with 1000 classes (spec sections 7 and 11,
# and the MLP-Mixer issue): a silent architecture change cannot pass.
OFFICIAL_PARAM_COUNTS = {
    "dynamixer_s": 26_265_960,
    "dynamixer_m": 57_128_264,
    "dynamixer_l": 97_818_088,
    "mixer_s32": 19_104_624,
    "mixer_s16": 18_528_264,
    "mixer_b32": 60_293_428,
    "mixer_b16": 59_880_472,
    "mixer_l32": 206_939_264,
    "mixer_l16": 208_196_168,
    "mixer_h14": 432_350_952,
}

TINY = dict(entries=(models.Entry(2, 32, 4, 2, 3.0, True), models.Entry(1, 64, 8, 2, 3.0)),
            image_size=32, patch_size=4, num_classes=10)


@functools.cache
def tiny_variables():
  """The TINY DynaMixer's variables (key 1), made once: an eager Flax init costs seconds.
  Drop path, remat and the compute dtype do not change them."""
  model = models.DynaMixer(**TINY)
  return jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))


def _shapes(model, size, batch=2):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  return variables, out


def test_every_registered_model_is_pinned():
  assert sorted(OFFICIAL_PARAM_COUNTS) == models.list_models()


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count_and_output_shape(name):
  variables, out = _shapes(models.create_model(name), 224)
  assert sum(x.size for x in jax.tree.leaves(variables)) == OFFICIAL_PARAM_COUNTS[name]
  assert out.shape == (2, 1000)


@pytest.mark.parametrize("name", ["dynamixer_s", "mixer_b16"])
def test_feature_extractor_and_class_override(name):
  _, out = _shapes(models.create_model(name, num_classes=0), 224)
  assert out.shape == (2, 384 if name == "dynamixer_s" else 768)
  _, out = _shapes(models.create_model(name, num_classes=37), 224)
  assert out.shape == (2, 37)


def test_dynamixer_s_token_grids_and_stochastic_depth_schedule():
  model = models.create_model("dynamixer_s", drop_path_rate=0.1)
  assert model.token_grids() == [32, 16, 16, 16]
  rates = layers.drop_path_rates(0.1, 18)
  assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
  assert rates[1] == pytest.approx(0.1 / 17)
  variables, _ = _shapes(model, 224)
  # Downsample sits at ModuleList index 1 for S (and L), 2 for M, as in the official tree.
  assert "network_1" in variables["params"] and "network_2_0" in variables["params"]
  m_params, _ = _shapes(models.create_model("dynamixer_m"), 224)
  assert "network_2" in m_params["params"] and "network_1_2" in m_params["params"]


def test_dynamixer_generator_sizes_follow_the_spec():
  variables, _ = _shapes(models.create_model("dynamixer_l"), 224)
  p = variables["params"]
  assert p["network_0_0"]["attn"]["mix_h"]["generate"]["kernel"].shape == (256, 1024)
  assert p["network_0_0"]["attn"]["mix_h"]["compress"]["kernel"].shape == (256, 64)
  assert p["network_2_0"]["attn"]["mix_w"]["generate"]["kernel"].shape == (128, 256)
  assert "bias" not in p["network_0_0"]["attn"]["mlp_c"]


def test_one_by_one_downsample_when_only_width_changes():
  model = models.DynaMixer(entries=(models.Entry(1, 32, 4), models.Entry(1, 48, 8)),
                           image_size=32, patch_size=4, num_classes=3)
  variables, out = _shapes(model, 32)
  assert variables["params"]["network_1"]["proj"]["kernel"].shape == (1, 1, 32, 48)
  assert out.shape == (2, 3)


def test_dynamixer_layer_norm_epsilon_and_exact_gelu():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 7)) * 1e-3  # small variance exposes eps
  class Norm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return dynamixer._layer_norm(jnp.float32, "ln", x)  # pylint: disable=protected-access

  ln = Norm()
  y = ln.apply(ln.init(jax.random.PRNGKey(0), x), x)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)
  assert not np.allclose(y, (x - mean) / jnp.sqrt(var + 1e-6), atol=1e-3)

  mlp = dynamixer.Mlp(5, 3)
  h = jnp.linspace(-3.0, 3.0, 7)[None]
  variables = mlp.init(jax.random.PRNGKey(1), h)
  fc1 = variables["params"]["fc1"]
  hidden = h @ fc1["kernel"] + fc1["bias"]
  exact = 0.5 * hidden * (1 + jax.scipy.special.erf(hidden / np.sqrt(2)))
  captured = mlp.apply(variables, h, capture_intermediates=lambda m, _: isinstance(m, nn.Dense),
                       mutable=["intermediates"])[1]["intermediates"]
  fc2 = variables["params"]["fc2"]
  np.testing.assert_allclose(captured["fc2"]["__call__"][0],
                             exact @ fc2["kernel"] + fc2["bias"], rtol=1e-6, atol=1e-6)


def test_mixer_uses_tanh_gelu_and_flax_epsilon():
  block = mixer.MlpBlock(6)
  h = jnp.linspace(-3.0, 3.0, 4)[None]
  variables = block.init(jax.random.PRNGKey(0), h)
  d0, d1 = variables["params"]["Dense_0"], variables["params"]["Dense_1"]
  pre = h @ d0["kernel"] + d0["bias"]
  tanh = 0.5 * pre * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
  np.testing.assert_allclose(block.apply(variables, h), tanh @ d1["kernel"] + d1["bias"],
                             rtol=1e-6, atol=1e-6)
  # The Mixer's norms use epsilon 1e-6 (the official Flax model), not the DynaMixer's 1e-5.
  layer = mixer.MixerBlock(tokens_mlp_dim=4, channels_mlp_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 6)) * 1e-3  # small variance exposes eps
  variables = layer.init(jax.random.PRNGKey(1), x)
  _, state = layer.apply(variables, x, mutable=["intermediates"],
                         capture_intermediates=lambda m, _: isinstance(m, nn.LayerNorm))
  normed = state["intermediates"]["LayerNorm_0"]["__call__"][0]
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(normed, (x - mean) / jnp.sqrt(var + 1e-6), rtol=1e-3, atol=1e-4)
  assert not np.allclose(normed, (x - mean) / jnp.sqrt(var + 1e-5), atol=1e-2)


def test_train_applies_stochastic_depth_and_eval_is_deterministic():
  model = models.DynaMixer(**TINY, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  variables = tiny_variables()
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a, eval_b = apply(variables, x), apply(variables, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  with pytest.raises(Exception, match="dropout"):
    apply(variables, x, train=True)  # needs the 'dropout' rng (found while tracing)
  train = lambda k: apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)})
  np.testing.assert_array_equal(train(3), train(3))
  assert not np.allclose(train(3), train(4))
  assert not np.allclose(train(3), eval_a)


def _primitive_count(jaxpr, name: str) -> int:
  """How often primitive ``name`` occurs in a jaxpr, nested jaxprs (jit, remat) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _primitive_count(inner, name)
  return count


@pytest.mark.parametrize("remat", [False, True])
def test_stochastic_depth_draws_once_per_network_at_the_rate(remat):
  """One random draw for every block's two branches (one random program to compile instead of
  one per branch), each example's branch dropped at its block's rate and survivors scaled."""
  model = models.DynaMixer(**TINY, drop_path_rate=0.3, remat=remat)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  jaxpr = jax.make_jaxpr(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))(
      variables, jax.random.PRNGKey(1)).jaxpr
  assert _primitive_count(jaxpr, "random_bits") == 1
  uniform = jnp.linspace(0.0, 0.99, 100)
  y = layers.drop_path(jnp.ones((100, 3, 3, 2)), 0.3, uniform)
  np.testing.assert_allclose(y[:, 0, 0, 0], np.where(uniform < 0.7, 1 / 0.7, 0.0), rtol=1e-6)
  assert layers.drop_path(y, 0.0, uniform) is y and layers.drop_path(y, 0.3, None) is y
  # A block used on its own still applies stochastic depth from the 'dropout' rng.
  block = models.DynaMixerBlock(4, 2, drop_path_rate=0.5)
  tokens = jax.random.normal(jax.random.PRNGKey(2), (64, 8, 8, 32))
  params = block.init(jax.random.PRNGKey(3), tokens)
  out = block.apply(params, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(4)})
  both_dropped = np.all(out == tokens, axis=(1, 2, 3))  # the residual alone: P = 0.25
  assert 4 <= both_dropped.sum() <= 32, both_dropped.sum()


def test_gradients_are_finite():
  model = models.DynaMixer(**TINY, drop_path_rate=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = tiny_variables()

  def loss(params):
    logits = model.apply({"params": params}, x, train=True,
                         rngs={"dropout": jax.random.PRNGKey(2)})
    return -jax.nn.log_softmax(logits)[:, 0].mean()

  grads = jax.jit(jax.grad(loss))(variables["params"])
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


@pytest.mark.parametrize("kind", ["dynamixer", "mixer"])
def test_remat_keeps_names_and_numbers(kind):
  if kind == "dynamixer":
    plain = models.DynaMixer(**TINY, drop_path_rate=0.2)
  else:
    plain = models.MlpMixer(patch_size=4, num_classes=10, num_blocks=2, hidden_dim=32,
                            tokens_mlp_dim=24, channels_mlp_dim=64, drop_path_rate=0.2)
  remat = plain.clone(remat=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  init = lambda model: jax.jit(model.init)(jax.random.PRNGKey(1), x)
  variables = tiny_variables() if kind == "dynamixer" else init(plain)
  remat_variables = init(remat)
  assert jax.tree.structure(remat_variables) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, remat_variables, variables)
  variables = jax.tree.map(lambda v: v + 0.01, variables)  # a non-zero Mixer head

  def loss(model, params):
    logits = model.apply({"params": params}, x, train=True,
                         rngs={"dropout": jax.random.PRNGKey(2)})
    return -jax.nn.log_softmax(logits)[:, 0].mean()

  grad = lambda model: jax.value_and_grad(lambda p: loss(model, p))
  want, got = jax.jit(grad(plain))(variables["params"]), jax.jit(grad(remat))(variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  # The backward really recomputes: the program handed to XLA fences each block's recomputation
  # with optimization barriers (XLA:GPU/TPU keep them; XLA:CPU drops them, see README).
  barriers = lambda model: jax.jit(grad(model)).lower(variables["params"]).as_text().count(
      "optimization_barrier")
  assert barriers(plain) == 0 and barriers(remat) >= 2


@pytest.mark.parametrize("kind", ["dynamixer", "mixer"])
def test_bfloat16_compute_close_to_float32(kind):
  if kind == "dynamixer":
    f32 = models.DynaMixer(**TINY)
  else:
    f32 = models.MlpMixer(patch_size=4, num_classes=10, num_blocks=2, hidden_dim=32,
                          tokens_mlp_dim=24, channels_mlp_dim=64)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = tiny_variables() if kind == "dynamixer" else jax.jit(f32.init)(
      jax.random.PRNGKey(1), x)
  if kind == "mixer":  # the zero head would make the comparison trivial
    variables = jax.tree.map(lambda v: v + 0.05, variables)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params_dtypes = {v.dtype for v in jax.tree.leaves(
      jax.eval_shape(bf16.init, jax.random.PRNGKey(1), x))}
  assert params_dtypes == {jnp.dtype(jnp.float32)}
  want, got = jax.jit(f32.apply)(variables, x), jax.jit(bf16.apply)(variables, x)
  assert got.dtype == jnp.bfloat16
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05 * scale)
  assert not np.array_equal(np.asarray(got, np.float32), want)


def test_clear_error_for_wrong_image_size():
  model = models.create_model("dynamixer_s")
  with pytest.raises(ValueError, match="built for 224x224 images; got 256x256"):
    _shapes(model, 256)
  with pytest.raises(ValueError, match="built for 224x224"):
    _shapes(models.create_model("mixer_b16"), 192)


def test_clear_error_for_wrong_channels_and_layout():
  model = models.DynaMixer(**TINY)
  with pytest.raises(ValueError, match="expects 3 channels last"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="channels last"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))


def test_clear_error_for_bad_architecture():
  with pytest.raises(ValueError, match="not divisible by its 5 segments"):
    _shapes(models.DynaMixer(entries=(models.Entry(1, 32, 5),), image_size=32, patch_size=4), 32)
  with pytest.raises(ValueError, match="image_size 30 is not divisible by patch_size 4"):
    models.DynaMixer(entries=(models.Entry(1, 32, 4),), image_size=30, patch_size=4).token_grids()
  with pytest.raises(ValueError, match="grid is odd"):
    models.DynaMixer(entries=(models.Entry(1, 32, 4, transition=True), models.Entry(1, 32, 4)),
                     image_size=28, patch_size=4).token_grids()


def test_registry_errors_name_the_valid_choices():
  with pytest.raises(ValueError, match="Registered models: dynamixer_l, dynamixer_m"):
    models.create_model("dynamixer_xl")
  with pytest.raises(ValueError, match="no argument.*num_clases.*Valid arguments"):
    models.create_model("dynamixer_s", num_clases=10)


def test_entries_override_accepts_plain_tuples():
  model = models.create_model("dynamixer_s", entries=[(1, 32, 4, 2, 3.0, True), (1, 64, 8)],
                              image_size=32, patch_size=4, num_classes=10)
  assert all(isinstance(e, models.Entry) for e in model.entries)
  assert _shapes(model, 32)[1].shape == (2, 10)
