"""Fine-tuning and weights: convert -> evaluate -> predict, export, head reset, init_from."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import load_fixture
from dynamixer_jax import convert, evaluate, models, predict, pretrained, steps

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args, timeout=180):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
  params = load_fixture("dynamixer_tiny.npz")["params"]
  path = tmp_path_factory.mktemp("pth") / "official.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in params.items()}}, path)
  return path, params


@pytest.fixture(scope="module")
def converted(official_pth, tmp_path_factory):
  out = tmp_path_factory.mktemp("conv") / "weights"
  _cli("dynamixer_jax.convert", official_pth[0], out)
  return out


def test_convert_writes_a_loadable_checkpoint_with_metadata(converted, official_pth):
  model, variables, meta = pretrained.load(converted)
  fixture = load_fixture("dynamixer_tiny.npz")
  np.testing.assert_allclose(model.apply(variables, fixture["images"]), fixture["logits_f64"],
                             atol=1e-6)
  prep = meta["preprocessing"]
  assert (prep["image_size"], prep["resize"], prep["crop"]) == (32, 35, "center")
  assert prep["mean"] == list(pretrained.IMAGENET_MEAN)
  model2, variables2 = models.create_model("dynamixer_s", pretrained=str(converted))
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, variables2))
  with pytest.raises(ValueError, match="not a MlpMixer"):
    models.create_model("mixer_b16", pretrained=str(converted))


def test_export_round_trip_is_identical(converted, official_pth, tmp_path):
  out = tmp_path / "back.pth"
  _cli("dynamixer_jax.convert", "--to-torch", converted, out)
  back = torch.load(out, weights_only=True)
  params = official_pth[1]
  assert set(back) == set(params)
  for key, value in params.items():
    np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)


def test_evaluate_gives_the_models_own_top1(converted):
  out = _cli("dynamixer_jax.evaluate", "--checkpoint", converted, "--dataset", "cifar10",
             "--mock", "--batch_size", "24", "--json")
  results = json.loads(out.strip().splitlines()[-1])
  # The same images through model.apply directly, no eval loop.
  from dynamixer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  model, variables, meta = pretrained.load(converted)
  config = evaluate.data_config(meta, "cifar10", mock=True)
  batches = list(input_pipeline.eval_batches(config.data, batch_size=24))
  correct = count = 0
  for b in batches:
    logits = model.apply(variables, steps.normalize(b["image"], config.mean, config.std))
    correct += np.sum((np.argmax(logits, -1) == b["label"]) * b["mask"])
    count += b["mask"].sum()
  assert results["count"] == count == 64
  assert results["top1"] == pytest.approx(correct / count)


def _images(tmp_path):
  rgb = (np.random.RandomState(0).rand(40, 52, 3) * 255).astype(np.uint8)
  files = {"rgb.png": Image.fromarray(rgb), "gray.png": Image.fromarray(rgb).convert("L"),
           "rgba.png": Image.fromarray(rgb).convert("RGBA"),
           "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
           "gray16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}
  paths = {}
  for name, image in files.items():
    image.save(tmp_path / name)
    paths[name] = tmp_path / name
  return rgb, paths


def test_read_rgb_handles_every_mode(tmp_path):
  rgb, paths = _images(tmp_path)
  assert Image.open(paths["gray16.png"]).mode == "I;16"
  for name, path in paths.items():
    image = predict.read_rgb(str(path))
    assert image.shape == (40, 52, 3) and image.dtype == np.uint8, name
  np.testing.assert_array_equal(predict.read_rgb(str(paths["rgba.png"])), rgb)
  np.testing.assert_array_equal(predict.read_rgb(str(paths["gray16.png"]))[..., 1], rgb[..., 0])


def test_predict_cli_prints_top5(converted, tmp_path):
  _, paths = _images(tmp_path)
  out = _cli("dynamixer_jax.predict", "--checkpoint", converted, *paths.values())
  for path in paths.values():
    assert str(path) in out
  top = predict.predict(str(converted), [str(paths["rgb.png"])])[0]
  assert len(top) == 5 and top[0][0] in out and sum(p for _, p in top) <= 1 + 1e-6
  assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)


def test_imagenet_names_ship_with_the_package():
  names = pretrained.imagenet_class_names()
  assert len(names) == 1000 and names[0].startswith("tench") and len(set(names)) == 1000
  assert predict.class_names({"num_classes": 1000, "class_names": []}) == names


def test_head_reset_keeps_every_other_weight(official_pth):
  _, variables, _ = pretrained.load(str(official_pth[0]))
  _, reset, meta = pretrained.load(str(official_pth[0]), num_classes=3)
  assert meta["num_classes"] == 3 and reset["params"]["head"]["kernel"].shape == (64, 3)
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  new = dict(jax.tree_util.tree_flatten_with_path(reset["params"])[0])
  for path, value in flat:
    if path[0].key != "head":
      np.testing.assert_array_equal(new[path], value)


def test_mixer_resolution_adaptation(mixer_tiny):
  model, variables = convert.load_mixer_npz(mixer_tiny["params"])
  images = mixer_tiny["images"]
  same, same_vars = convert.adapt_mixer_resolution(model, variables, 16)
  np.testing.assert_array_equal(same.apply(same_vars, images), model.apply(variables, images))
  big, big_vars = convert.adapt_mixer_resolution(model, variables, 32)
  assert big.tokens_mlp_dim == 4 * model.tokens_mlp_dim
  # Each block mixes one 16 px sub-image as before: a 2x2 tiling gives the original logits.
  tiled = np.tile(images, (1, 2, 2, 1))
  np.testing.assert_allclose(big.apply(big_vars, tiled), model.apply(variables, images),
                             atol=1e-5)
  with pytest.raises(ValueError, match="integer multiple"):
    convert.adapt_mixer_resolution(model, variables, 24)


def test_cli_errors_are_clear(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  bad = subprocess.run([sys.executable, "-m", "dynamixer_jax.convert", "x.bin", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "neither an official .pth" in bad.stderr
  for module in ("convert", "evaluate", "predict"):
    help_out = subprocess.run([sys.executable, "-m", f"dynamixer_jax.{module}", "--help"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "Example" in help_out.stdout, module


def test_init_from_with_a_different_class_count(official_pth, tmp_path, caplog):
  from dynamixer_jax import train_lib  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "config", os.path.join(ROOT, "configs", "cifar_finetune.py")).get_config(
          f"model=dynamixer_s,dataset=cifar100,init={official_pth[0]}")
  kwargs = pretrained.load(str(official_pth[0]))[2]["model"]["kwargs"]
  with config.unlocked():
    config.model = dict(name="dynamixer_s", drop_path_rate=0.0, image_size=32, patch_size=4,
                        entries=[tuple(e) for e in kwargs["entries"]])
  config.data.mock = True
  config.data.mock_num_examples = 16
  config.data.image_size = config.data.eval_resize = 32
  config.data.pad = 4
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 1
  config.mesh = {"data": 1}
  config.optim.backbone_lr_mult = 0.0  # only the head moves: the backbone stays the source's
  with caplog.at_level("WARNING"):
    state = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  logged = caplog.text
  assert "not loaded, freshly initialised: head/kernel (64, 100) (source (64, 10))" in logged
  assert "head/bias" in logged and logged.count("not loaded") == 2
  _, source, _ = pretrained.load(str(official_pth[0]))
  for key in ("patch_embed", "network_0_0", "norm"):
    for a, b in zip(jax.tree.leaves(source["params"][key]), jax.tree.leaves(state.params[key])):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-7)
  assert state.params["head"]["kernel"].shape == (64, 100)
