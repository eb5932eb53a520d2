"""Sharding: the same step on every mesh, FSDP really shards, checkpoints move between meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dynamixer_jax.train import checkpointing, configlib, optim, sharding, steps

MIN_SIZE = 256  # small enough that the tiny model's matrices are split


def _config(mixing: bool = True):
  """The tiny model's config. RandAugment is off: test_augment.py tests the whole device
  augmentation on 1 and 8 devices, and here it would only add its compile to each step. Mixup,
  cutmix and erasing stay where the batch's split matters (gradient accumulation); the meshes'
  steps go without them (``mixing=False``: 6 s instead of 14 s of compile per mesh)."""
  config = configlib.base_config()
  config.model = dict(name="dynamixer_s", drop_path_rate=0.1, image_size=32, patch_size=4,
                      entries=((1, 32, 4, 2, 2.0, True), (1, 64, 8, 2, 2.0, False)))
  config.dtype = "float32"
  config.augment.randaugment = ""
  if not mixing:
    config.augment.mixup_alpha = config.augment.cutmix_alpha = config.augment.erase_prob = 0.0
  return config


def _setup(mesh_axes, config=None, abstract=False):
  """``(mesh, state, train_step)``; with ``abstract`` the state is only its shapes, dtypes and
  shardings (a restore's target), and nothing is computed."""
  config = config or _config()
  mesh = sharding.create_mesh(mesh_axes)
  model = steps.build_model(config, num_classes=10)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=10)
  make_state = lambda key: steps.create_train_state(model, tx, 32, key, use_ema=True)
  shardings = sharding.state_shardings(jax.eval_shape(make_state, jax.random.PRNGKey(0)), mesh,
                                       min_size=MIN_SIZE)
  init = jax.jit(make_state, out_shardings=shardings)
  state = (init.eval_shape if abstract else init)(jax.random.PRNGKey(0))
  train_step = jax.jit(steps.make_train_step(model, tx, schedule, config, 10),
                       out_shardings=(shardings, None))
  return mesh, state, train_step


def _batch():
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
          "label": rng.integers(0, 10, (16,), dtype=np.int32)}


def _two_steps(mesh_axes):
  mesh, state, train_step = _setup(mesh_axes, _config(mixing=False))
  for _ in range(2):
    state, metrics = train_step(state, sharding.to_global(_batch(), mesh))
  return state, metrics


@pytest.fixture(scope="module")
def single_device():
  return jax.device_get(_two_steps({"data": 1}))


@pytest.mark.parametrize("mesh_axes", [{"data": 8}, {"data": 4, "fsdp": 2}, {"fsdp": 8}],
                         ids=["data8", "data4_fsdp2", "fsdp8"])
def test_training_steps_do_not_depend_on_the_mesh(mesh_axes, single_device):
  want_state, want_metrics = single_device
  state, metrics = _two_steps(mesh_axes)
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.device_get(state.params), want_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.device_get(state.opt_state), want_state.opt_state)


def _accumulation_config():
  # Without stochastic depth the micro-batches see exactly the full batch's computation.
  config = _config()
  config.model.drop_path_rate = 0.0
  return config


@pytest.fixture(scope="module")
def full_batch_update():
  """One step on the whole batch, one device: what every accumulation must reproduce."""
  mesh, state, train_step = _setup({"data": 1}, _accumulation_config())
  return jax.device_get(train_step(state, sharding.to_global(_batch(), mesh)))


# 15-25 s of compiles each from a cold cache on 2 cores: the full suite only.
@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes,accum", [({"data": 1}, 4), ({"data": 4, "fsdp": 2}, 2)],
                         ids=["1device_accum4", "data4_fsdp2_accum2"])
def test_gradient_accumulation_gives_the_full_batch_update(mesh_axes, accum, full_batch_update):
  want, want_metrics = full_batch_update
  config = _accumulation_config()
  config.grad_accum_steps = accum
  mesh, state, train_step = _setup(mesh_axes, config)
  got, metrics = jax.device_get(train_step(state, sharding.to_global(_batch(), mesh)))
  for name in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (got.params, got.opt_state), (want.params, want.opt_state))


def test_gradient_accumulation_must_divide_the_batch():
  config = _config()
  config.grad_accum_steps = 3
  with pytest.raises(ValueError, match="config.grad_accum_steps=3 is invalid.*divide batch_size"):
    configlib.validate(config)


def test_fsdp_shards_parameters_and_optimizer_state():
  _, state, _ = _setup({"data": 2, "fsdp": 4})
  kernel = state.params["network_0_0"]["mlp"]["fc1"]["kernel"]  # (32, 64)
  assert kernel.sharding.spec == P(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, 16)
  mu = state.opt_state[1][0].mu["network_0_0"]["mlp"]["fc1"]["kernel"]  # (clip, adamw)
  assert mu.sharding.spec == P(None, "fsdp")
  assert state.params["network_0_0"]["norm1"]["scale"].sharding.spec == P()  # small: replicated


def test_partition_rules_are_config():
  mesh = sharding.create_mesh({"fsdp": 8})
  shapes = {"head": {"kernel": jax.ShapeDtypeStruct((64, 1024), jnp.float32)},
            "stem": {"kernel": jax.ShapeDtypeStruct((64, 1024), jnp.float32)}}
  got = sharding.state_shardings(shapes, mesh, rules=(("head", "replicate"), (".*", "fsdp")))
  assert got["head"]["kernel"].spec == P()
  assert got["stem"]["kernel"].spec == P(None, "fsdp")


@pytest.mark.slow  # 15-35 s of compiles from a cold cache on 2 cores
def test_checkpoint_from_eight_devices_restores_on_two_and_one(tmp_path):
  _, state, train_step = _setup({"fsdp": 8}, _config(mixing=False))  # the mesh test's step
  state, _ = train_step(state, sharding.to_global(_batch(), sharding.create_mesh({"fsdp": 8})))
  saved = jax.device_get(state)
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  checkpointer.save(1, state, {"note": "eight devices"})
  checkpointer.wait()
  for axes in ({"fsdp": 2}, {"data": 1}):
    _, target, _ = _setup(axes, _config(mixing=False), abstract=True)  # the saved run's config
    restored, meta = checkpointing.Checkpointer(str(tmp_path)).restore(target)
    assert meta["note"] == "eight devices" and meta["checksums"]  # checksums are added on save
    assert len(restored.params["head"]["kernel"].sharding.device_set) == max(axes.values())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
    sharding.create_mesh({"data": 4, "fsdp": 4})
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.create_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="does not divide"):
    sharding.create_mesh({"data": -1, "fsdp": 3})
  config = _config()
  config.batch_size = 12
  with pytest.raises(ValueError, match="batch_size=12 must be divisible by the number of devices"):
    configlib.check_devices(config, 8)
