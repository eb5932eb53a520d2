"""Fine-tuning and weights: convert -> evaluate -> predict, export, head reset, init_from.

Only the tests that read or write a real ``.pth`` need torch (the optional extra); each of them
skips on its own, with the reason, when torch is missing.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import FAST_COMPILE, load_fixture
from dynamixer_jax import evaluate, predict, preprocessing, weights
from dynamixer_jax.train import steps
from dynamixer_jax.weights import metadata as metadata_lib
from dynamixer_jax.weights import official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT_S = 360


def _torch():
  return pytest.importorskip("torch", reason="torch is the optional [torch] extra")


def _cli(module, *args, expect=0):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
  assert result.returncode == expect, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
  """The official tiny fixture's weights in our checkpoint layout (what convert writes)."""
  model, variables = official.load_torch_dynamixer(load_fixture("dynamixer_tiny.npz")["params"])
  out = tmp_path_factory.mktemp("weights") / "tiny"
  weights.save(str(out), variables, metadata_lib.for_official(model, "dynamixer_tiny.npz"))
  return out


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
  torch = _torch()
  params = load_fixture("dynamixer_tiny.npz")["params"]
  path = tmp_path_factory.mktemp("pth") / "official.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in params.items()}}, path)
  return path, params


@pytest.mark.slow
def test_convert_cli_writes_a_loadable_checkpoint_with_metadata(official_pth, tmp_path):
  out = tmp_path / "converted"
  printed = _cli("dynamixer_jax.convert", official_pth[0], out).stdout
  assert "Wrote dynamixer (custom: 3 entries, 32 px) (10 classes)" in printed  # not "dynamixer_s"
  model, variables, meta = weights.load(str(out))
  fixture = load_fixture("dynamixer_tiny.npz")
  np.testing.assert_allclose(jax.jit(model.apply)(variables, fixture["images"]),
                             fixture["logits_f64"], atol=1e-6)
  prep = meta["preprocessing"]
  assert (prep["image_size"], prep["resize"], prep["crop"]) == (32, 35, "center")
  assert prep["mean"] == list(preprocessing.IMAGENET_MEAN)


@pytest.mark.slow
def test_export_round_trip_is_identical(saved_weights, official_pth, tmp_path):
  torch = _torch()
  out = tmp_path / "back.pth"
  _cli("dynamixer_jax.convert", "--to_torch", saved_weights, out)
  back = torch.load(out, weights_only=True)
  params = official_pth[1]
  assert set(back) == set(params)
  for key, value in params.items():
    np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)


def test_saved_weights_load_back_quietly_with_the_official_logits(saved_weights, caplog):
  with caplog.at_level("WARNING"):
    model, variables, meta = weights.load(str(saved_weights))
  assert not caplog.records, caplog.text  # read as orbax expects: no warning about its metadata
  fixture = load_fixture("dynamixer_tiny.npz")
  np.testing.assert_allclose(jax.jit(model.apply)(variables, fixture["images"]),
                             fixture["logits_f64"], atol=1e-6)
  assert meta["model"]["family"] == "dynamixer" and meta["model"]["name"] is None


def _main(module, capsys, *args):
  """A command's ``main`` in this process (its happy path; the error paths run as children in
  test_cli.py): what it prints to stdout."""
  capsys.readouterr()
  module.main([str(a) for a in args])
  return capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_gives_the_models_own_top1(saved_weights, capsys):
  out = _main(evaluate, capsys, "--checkpoint", saved_weights, "--dataset", "cifar10", "--mock",
              "--batch_size", "24", "--json")
  results = json.loads(out.strip().splitlines()[-1])
  # The same images through model.apply directly, no eval loop.
  from dynamixer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  model, variables, meta = weights.load(str(saved_weights))
  config = evaluate.data_config(meta, "cifar10", mock=True)
  batches = list(pipeline.eval_batches(config.data, batch_size=24))
  correct = count = 0
  apply = jax.jit(model.apply)  # op by op, each batch would compile every operation alone
  for b in batches:
    logits = apply(variables, steps.normalize(b["image"], config.mean, config.std))
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


@pytest.mark.slow
def test_predict_cli_prints_top5_and_writes_json_and_csv(saved_weights, tmp_path, capsys):
  _, paths = _images(tmp_path)
  files = [str(p) for p in paths.values()]
  out = _main(predict, capsys, "--checkpoint", saved_weights, *files,
              "--output", tmp_path / "results.json")
  for path in files:
    assert path in out
  top = predict.predict(str(saved_weights), [files[0]])[0]
  assert len(top) == 5 and top[0][0] in out and sum(p for _, p in top) <= 1 + 1e-6
  assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["file"] for r in saved] == files
  first = saved[0]["predictions"]
  assert [p["label"] for p in first] == [name for name, _ in top]
  assert [p["probability"] for p in first] == pytest.approx([prob for _, prob in top])
  _main(predict, capsys, "--checkpoint", saved_weights, files[0], "--top-k", "2",
        "--output", tmp_path / "results.csv")  # the dashed spelling is an alias
  rows = (tmp_path / "results.csv").read_text().splitlines()
  assert rows[0] == "file,rank,label,probability" and len(rows) == 3
  assert rows[1].startswith(f"{files[0]},1,{top[0][0]},")


@pytest.mark.slow  # six compiles
def test_the_precision_study_evaluates_every_variant(saved_weights, capsys):
  """``benchmark.precision`` (the README's bfloat16 evidence) on the official tiny weights and
  the 360 held-out digits: float32 is the reference, every variant differs from it a little."""
  from dynamixer_jax.benchmark import precision  # pylint: disable=g-import-not-at-top
  rows = precision.main(["--checkpoint", str(saved_weights)])
  assert [r["variant"] for r in rows] == list(precision.VARIANTS)
  assert rows[0]["agreement"] == 1.0 and rows[0]["relative_error"] == 0.0
  assert all(0 < r["relative_error"] < 0.05 for r in rows[1:]), rows
  assert "| bfloat16 as shipped |" in capsys.readouterr().out


def test_imagenet_names_ship_with_the_package():
  names = metadata_lib.imagenet_class_names()
  assert len(names) == 1000 and names[0].startswith("tench") and len(set(names)) == 1000
  assert metadata_lib.class_names({"num_classes": 1000, "class_names": []}) == names


def test_head_reset_keeps_every_other_weight(saved_weights):
  _, variables, _ = weights.load(str(saved_weights))
  model, reset, meta = weights.load(str(saved_weights), num_classes=3)
  assert meta["num_classes"] == 3 and reset["params"]["head"]["kernel"].shape == (64, 3)
  assert meta["model"]["kwargs"]["num_classes"] == 3 and model.num_classes == 3
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  new = dict(jax.tree_util.tree_flatten_with_path(reset["params"])[0])
  for path, value in flat:
    if path[0].key != "head":
      np.testing.assert_array_equal(new[path], value)


def test_mixer_resolution_adaptation(mixer_tiny):
  model, variables = official.load_mixer_npz(mixer_tiny["params"])
  images = mixer_tiny["images"]
  same, same_vars = official.adapt_mixer_resolution(model, variables, 16)
  np.testing.assert_array_equal(same.apply(same_vars, images), model.apply(variables, images))
  big, big_vars = official.adapt_mixer_resolution(model, variables, 32)
  assert big.tokens_mlp_dim == 4 * model.tokens_mlp_dim
  # Each block mixes one 16 px sub-image as before: a 2x2 tiling gives the original logits.
  tiled = np.tile(images, (1, 2, 2, 1))
  np.testing.assert_allclose(big.apply(big_vars, tiled), model.apply(variables, images),
                             atol=1e-5)
  with pytest.raises(ValueError, match="integer multiple"):
    official.adapt_mixer_resolution(model, variables, 24)


def test_mixer_npz_is_named_by_what_it_is(mixer_tiny, tmp_path):
  path = tmp_path / "tiny_mixer.npz"
  np.savez(path, **mixer_tiny["params"])
  model, _, meta = weights.load(str(path))
  assert meta["description"] == "mixer (custom: patch 4, 2 blocks, width 32, 16 px)"
  assert meta["model"]["name"] is None and meta["model"]["family"] == "mixer"
  assert metadata_lib.describe(model.clone(num_classes=10)) == meta["description"]
  from dynamixer_jax import models  # pylint: disable=g-import-not-at-top
  assert metadata_lib.describe(models.create_model("mixer_b16", num_classes=10)) == "mixer_b16"


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path):
  bad = _cli("dynamixer_jax.convert", "x.bin", tmp_path, expect=1)
  assert "neither an official .pth" in bad.stderr and "Traceback" not in bad.stderr
  for module in ("convert", "evaluate", "predict"):
    help_out = _cli(f"dynamixer_jax.{module}", "--help")
    assert "Examples" in help_out.stdout and f"python -m dynamixer_jax.{module}" in help_out.stdout


@pytest.mark.slow  # 15-35 s of compiles from a cold cache on 2 cores
def test_init_from_with_a_different_class_count(saved_weights, tmp_path, caplog):
  from dynamixer_jax import recipes  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = recipes.load("cifar_finetune", f"model=dynamixer_s,dataset=cifar100,init={saved_weights}")
  kwargs = weights.load(str(saved_weights))[2]["model"]["kwargs"]
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
    state = loop.train_and_evaluate(config, str(tmp_path / "run"), handle_signals=False)
  logged = caplog.text
  assert "shape differs, freshly initialised: head/kernel (64, 100) (source (64, 10))" in logged
  assert "head/bias (100,) (source (10,))" in logged and logged.count("freshly initialised") == 2
  _, source, _ = weights.load(str(saved_weights))
  for key in ("patch_embed", "network_0_0", "norm"):
    for a, b in zip(jax.tree.leaves(source["params"][key]), jax.tree.leaves(state.params[key])):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-7)
  assert state.params["head"]["kernel"].shape == (64, 100)
