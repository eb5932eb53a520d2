"""The training loop: configs, the official schedule, weight decay, EMA, exact eval, resume."""

import glob
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamixer_jax import models, recipes
from dynamixer_jax.train import configlib, loop, optim, sharding, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py")))


def load_config(path: str):
  return recipes.load(path)


def tiny_config(**data):
  """A small DynaMixer on mock CIFAR-10, a few steps: the loop without the cost."""
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py"))
  config.model.entries = ((1, 16, 2, 2, 2.0, True), (1, 32, 4, 2, 2.0, False))
  config.model.drop_path_rate = 0.1
  config.data.name = "cifar10"
  config.data.mock = True
  config.data.mock_num_examples = 48
  config.batch_size = config.eval_batch_size = 16
  config.num_epochs = 4
  config.schedule.warmup_epochs = 1
  config.log_every_steps = 2
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 2
  config.mesh = {"data": 1}  # one device: the mesh has tests of its own (test_sharding.py)
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_validates_and_builds(path):
  config = load_config(path)
  configlib.validate(config)
  assert "Command:" in open(path).read() and "Accuracy:" in open(path).read()
  model = steps.build_model(config, num_classes=10)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert logits.shape == (2, 10)  # the config's image size fits the model it builds


@pytest.mark.parametrize("name,batch,drop_path,resize", [
    ("dynamixer_s", 2048, 0.1, 248), ("dynamixer_m", 1024, 0.1, 248),
    ("dynamixer_l", 512, 0.3, 256)])
def test_imagenet_configs_are_the_official_recipe(name, batch, drop_path, resize):
  c = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  assert (c.model.name, c.batch_size, c.model.drop_path_rate) == (name, batch, drop_path)
  assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps) == (
      "adamw", 2e-3, 0.9, 0.999, 1e-8)
  assert (c.optim.weight_decay, c.optim.decay_matrices_only, c.optim.grad_clip_norm) == (
      0.05, True, 0.0)
  s = c.schedule
  assert (s.warmup_epochs, s.warmup_lr, s.min_lr, s.per_epoch) == (20, 1e-6, 1e-5, True)
  assert configlib.total_epochs(c) == 310
  assert (c.ema_decay, c.label_smoothing, c.seed) == (0.99996, 0.1, 42)
  assert (c.data.image_size, c.data.eval_resize) == (224, resize)


def _official_lr(epoch):
  """timm 0.4.12 CosineLRScheduler as main.py configures it, written out independently."""
  if epoch < 20:
    return 1e-6 + epoch * (2e-3 - 1e-6) / 20
  if epoch >= 300:
    return 1e-5
  return 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 300))


def test_schedule_matches_the_official_formula_at_key_steps():
  config = load_config(os.path.join(ROOT, "configs", "dynamixer_s.py"))
  steps_per_epoch = 625
  schedule = optim.create_schedule(config, steps_per_epoch)
  for epoch in [0, 1, 10, 19, 20, 21, 100, 150, 299, 300, 309]:
    for offset in (0, steps_per_epoch - 1):  # constant within an epoch
      got = float(schedule(epoch * steps_per_epoch + offset))
      assert got == pytest.approx(_official_lr(epoch), rel=1e-5), (epoch, offset)
  assert float(schedule(20 * steps_per_epoch)) < 2e-3  # cosine phase measured from epoch 0
  with config.unlocked():
    config.schedule.per_epoch = False
  smooth = optim.create_schedule(config, steps_per_epoch)
  assert float(smooth(10 * steps_per_epoch + 312)) > _official_lr(10)


def test_weight_decay_only_on_matrices_as_timm_groups_them():
  shapes = jax.eval_shape(lambda x: models.create_model("dynamixer_s").init(
      jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  mask = optim.weight_decay_mask(shapes["params"])
  pairs = list(zip(jax.tree.leaves(mask), jax.tree.leaves(shapes["params"])))
  decayed = [p.size for m, p in pairs if m]
  kept = [p.size for m, p in pairs if not m]
  # timm 0.4.12 create_optimizer on the official dynamixer_s (spec section 8).
  assert (len(decayed), sum(decayed)) == (219, 26_159_680)
  assert (len(kept), sum(kept)) == (275, 106_280)


def test_adamw_decay_is_decoupled_and_masked():
  config = configlib.base_config()
  with config.unlocked():
    config.schedule.name = "constant"
  tx, _ = optim.create_optimizer(config, steps_per_epoch=1)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -2e-3 * 0.05 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], 0.0)


def test_ema_update():
  ema = optim.ema_update({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, 0.75)
  np.testing.assert_allclose(ema["w"], [1.5])


def test_padded_eval_counts_every_example_once():
  config = tiny_config()
  model = steps.build_model(config, 10)
  tx, _ = optim.create_optimizer(config, 3)
  state = steps.create_train_state(model, tx, 32, jax.random.PRNGKey(0), use_ema=True)
  mesh = sharding.mesh_from_config(config)
  from dynamixer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = list(pipeline.eval_batches(config.data, batch_size=40))
  assert len(batches) == 2 and batches[-1]["mask"].sum() == 8  # 48 = 40 + 8 real + 32 padding
  results = steps.evaluate(jax.jit(steps.make_eval_step(model, config, 10)), state,
                               batches, mesh)
  assert results["eval_count"] == 48
  # The same accuracy as counting by hand over the 48 real examples.
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  logits = jax.jit(model.apply)({"params": state.params},
                                steps.normalize(jnp.asarray(images), config.mean, config.std))
  assert results["eval_top1"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)))
  assert results["eval_ema_top1"] == results["eval_top1"]  # EMA == params at init


def _run(config, workdir, steps_total):
  """train_and_evaluate in this process, so without signal handlers (signal tests use children)."""
  with config.unlocked():
    config.num_train_steps = steps_total
  return loop.train_and_evaluate(config, str(workdir), handle_signals=False)


def _assert_same_state(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.ema_params),
               jax.device_get(b.ema_params))
  assert int(a.step) == int(b.step)


def _augmented_config():
  """The tiny config with the whole device augmentation of the ImageNet recipe, the crops'
  resize from a canvas included."""
  config = tiny_config()
  config.augment.update(dict(hflip=True, randaugment="rand-m9-mstd0.5-inc1", mixup_alpha=0.8,
                             cutmix_alpha=1.0, chunk_size=8, erase_prob=0.25))
  config.data.update(dict(train_crop="random_resized", device_resize_canvas=32,
                          train_interpolation="random"))
  return config


@pytest.mark.slow  # several runs of one workdir: the inner loop leaves it to the full suite
def test_stop_and_resume_equals_an_uninterrupted_run_on_mock_data(tmp_path):
  """With the crops' resize, flip, RandAugment, mixup/cutmix and erasing on the device: a resumed
  run sees the same augmented images, so it ends with exactly the parameters of an uninterrupted
  one."""
  whole = _run(_augmented_config(), tmp_path / "whole", 6)
  _run(_augmented_config(), tmp_path / "split", 3)
  assert os.path.isdir(tmp_path / "split" / "checkpoints" / "3")
  resumed = _run(_augmented_config(), tmp_path / "split", 6)
  _assert_same_state(whole, resumed)
  # keep_checkpoints=3: the resumed run wrote 4 and 6 beside the first run's 3 (2 was dropped).
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints"), key=int) == ["3", "4", "6"]
  assert glob.glob(str(tmp_path / "whole" / "events.out.tfevents.*"))


def test_checkpoint_metadata_describes_the_model(tmp_path):
  _run(tiny_config(), tmp_path / "run", 2)
  from dynamixer_jax.weights import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.weights import store  # pylint: disable=g-import-not-at-top
  meta = metadata_lib.read(store.find_step_dir(str(tmp_path / "run")))
  # A custom DynaMixer is not called by a registered name.
  assert meta["model"]["family"] == "dynamixer" and meta["model"]["name"] is None
  assert meta["description"] == "dynamixer (custom: 2 entries, 32 px)"
  assert meta["num_classes"] == 10 and meta["model"]["kwargs"]["image_size"] == 32
  assert len(meta["class_names"]) == 10 and meta["preprocessing"]["image_size"] == 32
  rebuilt = metadata_lib.build_model(meta)
  assert rebuilt.entries[0] == models.Entry(1, 16, 2, 2, 2.0, True)


def test_config_errors_name_the_field():
  config = tiny_config()
  with config.unlocked():
    config.model.name = "dynamixer_xs"
  with pytest.raises(ValueError, match="Registered models"):
    configlib.validate(config)
  config = tiny_config()
  config.optim.lr = -1.0
  with pytest.raises(ValueError, match="optim.lr"):
    configlib.validate(config)
  config = tiny_config()
  config.mesh = {"data": -1}
  config.batch_size = 12  # 8 devices
  with pytest.raises(ValueError, match="batch_size=12 must be divisible by the number of devices"):
    loop.train_and_evaluate(config, "/nonexistent/never/written", handle_signals=False)


def _quickstart(workdir, *flags) -> str:
  """The README's quickstart command (plus ``flags``) in a child process, under a timeout: its
  console, after checking that it exits 0 with raw and EMA held-out top-1 >= 95 %."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/quickstart.py", *flags,
       f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-3000:]
  raw, ema = map(float, re.search(r"final top-1: raw weights ([0-9.]+) %, EMA weights "
                                  r"([0-9.]+) %", log).groups())
  print(f"quickstart {' '.join(flags)} held-out top-1: raw {raw} %, EMA {ema} %")
  assert raw >= 95 and ema >= 95, log[-3000:]
  return log


@pytest.mark.slow
def test_quickstart_trains_to_the_readme_accuracy_and_prints_a_readable_console(tmp_path):
  """The README's first command, as a newcomer runs it."""
  log = _quickstart(tmp_path)
  # A console a person can read: one line per log step and per evaluation, a summary, and no
  # library internals (the README promises about 40 lines).
  lines = log.strip().splitlines()
  assert len(lines) <= 40, log
  assert "orbax" not in log.lower() and "Traceback" not in log, log
  assert f"tensorboard --logdir {tmp_path}" in log and f"checkpoint: {tmp_path}" in log
  assert sum("step 440 eval" in line for line in lines) == 1  # no duplicated metric lines
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert os.listdir(tmp_path / "checkpoints")


def test_evaluate_preprocesses_as_the_run_that_made_the_checkpoint(tmp_path):
  """The eval-preprocessing record goes from the config into the checkpoint and back out to
  evaluate: with eval_crop='resize' on non-square images, evaluate squashes as training did."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dynamixer_jax import evaluate  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.weights import store  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, count in (("train", 8), ("val", 4)):
    for c in range(2):
      os.makedirs(tmp_path / "images" / split / f"class_{c}")
      for i in range(count):  # wide images: a center crop and a squash differ
        pixels = rng.integers(0, 255, (20, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / split / f"class_{c}" / f"{i}.png")
  config = tiny_config(name="folder", data_dir=str(tmp_path / "images"), mock=False,
                       eval_crop="resize", eval_interpolation="bilinear")
  config.batch_size = config.eval_batch_size = 8
  _run(config, tmp_path / "run", 2)
  meta = store.load(str(tmp_path / "run"))[2]
  assert (meta["preprocessing"]["crop"], meta["preprocessing"]["interpolation"]) == (
      "resize", "bilinear")
  rebuilt = evaluate.data_config(meta, "folder", str(tmp_path / "images"), split="val")
  want = next(pipeline.eval_batches(config.data, batch_size=8))["image"]
  got = next(pipeline.eval_batches(rebuilt.data, batch_size=8))["image"]
  np.testing.assert_array_equal(got, want)
  assert rebuilt.mean == config.mean and rebuilt.std == config.std


@pytest.mark.slow
def test_the_quickstart_in_bfloat16_reaches_the_same_accuracy(tmp_path):
  """What every accelerator run uses (bf16 compute, float32 parameters, softmaxes and logits in
  float32), proven on the CPU: the README's command with --config.dtype=bfloat16."""
  _quickstart(tmp_path, "--config.dtype=bfloat16")


def test_the_compilation_cache_setting_picks_the_folder(tmp_path, monkeypatch):
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.train import compile_cache  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(compile_cache, "_ours", None)  # restored after the test
  workdir = str(tmp_path / "run")
  tests_cache = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)  # as if JAX had no folder set
    assert compile_cache.resolve("auto", workdir) == os.path.join(workdir, "compile_cache")
    assert compile_cache.resolve("", workdir) is None  # JAX's own setting: here, none
    assert compile_cache.resolve("/cache/xla", workdir) == "/cache/xla"
    jax.config.update("jax_compilation_cache_dir", "/set/by/the/user")
    assert compile_cache.use("auto", workdir) == "/set/by/the/user"  # the user's own wins
    # A second run in one process (a notebook) gets its own workdir's folder, not the first's.
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.use("auto", workdir) == os.path.join(workdir, "compile_cache")
    other = str(tmp_path / "other")
    assert compile_cache.use("auto", other) == os.path.join(other, "compile_cache")
  finally:  # back to the tests' shared cache
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", tests_cache)
