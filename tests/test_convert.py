"""The bridge to official weights: logits of the official implementations, and strictness."""

import argparse
import pathlib
import sys

import jax
import numpy as np
import pytest

from conftest import FIXTURES, load_fixture
from dynamixer_jax import models
from dynamixer_jax.weights import official as convert
from dynamixer_jax.weights import trees

ATOL = 1e-6  # fp32 CPU vs the official float64 forward; a wrong LayerNorm eps moves ~5e-6


def test_dynamixer_logits_match_official(dynamixer_tiny):
  model, variables = convert.load_torch_dynamixer(dynamixer_tiny["params"])
  assert model.token_grids() == [8, 4, 4]
  logits = model.apply(variables, dynamixer_tiny["images"])
  np.testing.assert_allclose(logits, dynamixer_tiny["logits_f64"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("dynamixer_*.npz")
                                        if p.name != "dynamixer_tiny.npz"))
def test_other_official_layouts_match(name):
  fixture = load_fixture(name)
  model, variables = convert.load_torch_dynamixer(fixture["params"])
  logits = model.apply(variables, fixture["images"])
  np.testing.assert_allclose(logits, fixture["logits_f64"], rtol=0, atol=1e-5)


def test_dynamixer_intermediate_activation_matches(dynamixer_tiny):
  model, variables = convert.load_torch_dynamixer(dynamixer_tiny["params"])
  _, state = model.apply(variables, dynamixer_tiny["images"], capture_intermediates=True,
                         mutable=["intermediates"])
  first_group = state["intermediates"]["network_0_1"]["__call__"][0]
  np.testing.assert_allclose(first_group, dynamixer_tiny["raw"]["act/network.0"], atol=1e-5)


def test_mixer_logits_match_official(mixer_tiny, tmp_path):
  path = tmp_path / "mixer.npz"
  np.savez(path, **{k: v for k, v in mixer_tiny["params"].items()})
  model, variables = convert.load_mixer_npz(path)
  assert (model.patch_size, model.num_blocks, model.image_size) == (4, 2, 16)
  logits = model.apply(variables, mixer_tiny["images"])
  np.testing.assert_allclose(logits, mixer_tiny["logits_f64"], rtol=0, atol=ATOL)


def _official_checkpoint(params, ema_shift=0.0):
  """What the official training script saves: raw and EMA weights, args, an epoch."""
  torch = pytest.importorskip("torch", reason="torch is the optional [torch] extra")
  as_torch = lambda d, s: {k: torch.from_numpy(v + s) for k, v in d.items()}
  return {"epoch": 3, "arch": "dynamixer_tiny", "args": argparse.Namespace(lr=2e-3, model="x"),
          "state_dict": {"module." + k: v for k, v in as_torch(params, 0.0).items()},
          "state_dict_ema": as_torch(params, ema_shift)}


def test_pth_checkpoint_takes_ema_unless_told(dynamixer_tiny, tmp_path, capsys):
  torch = pytest.importorskip("torch", reason="torch is the optional [torch] extra")
  path = tmp_path / "checkpoint.pth.tar"
  torch.save(_official_checkpoint(dynamixer_tiny["params"], ema_shift=0.01), path)
  _, ema = convert.load_torch_dynamixer(path)
  assert "state_dict_ema" in capsys.readouterr().out
  model, raw = convert.load_torch_dynamixer(path, use_ema=False)
  assert "'state_dict'" in capsys.readouterr().out
  np.testing.assert_allclose(model.apply(raw, dynamixer_tiny["images"]),
                             dynamixer_tiny["logits_f64"], atol=ATOL)
  np.testing.assert_allclose(ema["params"]["head"]["bias"], raw["params"]["head"]["bias"] + 0.01,
                             atol=1e-6)


def test_pth_never_unpickles_arbitrary_objects(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is the optional [torch] extra")
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {}, "payload": pathlib.PurePosixPath("/etc")}, path)
  with pytest.raises(Exception, match="(?i)weights.only|unsupported|not allowed"):
    convert.load_torch_dynamixer(path)


def test_pth_without_torch_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"pip install 'dynamixer-jax\[torch\]'"):
    convert.load_torch_dynamixer(tmp_path / "x.pth")


def test_head_reset_keeps_every_other_weight(dynamixer_tiny):
  _, original = convert.load_torch_dynamixer(dynamixer_tiny["params"])
  model, variables = convert.load_torch_dynamixer(dynamixer_tiny["params"], num_classes=4)
  assert model.num_classes == 4
  assert variables["params"]["head"]["kernel"].shape == (64, 4)
  assert float(np.abs(variables["params"]["head"]["bias"]).max()) == 0.0
  for name, subtree in original["params"].items():
    if name != "head":
      jax.tree.map(np.testing.assert_array_equal, subtree, variables["params"][name])
  assert model.apply(variables, dynamixer_tiny["images"]).shape == (2, 4)


def test_mixer_head_reset_is_zero(mixer_tiny):
  _, variables = convert.load_mixer_npz(mixer_tiny["params"], num_classes=3)
  assert not np.asarray(variables["params"]["head"]["kernel"]).any()


def test_unmatched_and_missing_keys_are_all_listed(dynamixer_tiny):
  params = dict(dynamixer_tiny["params"])
  del params["network.0.1.norm2.bias"]
  params["network.0.1.attn.extra.weight"] = np.zeros((3, 3), np.float32)
  params["norm.weight"] = np.ones(5, np.float32)
  with pytest.raises(ValueError) as e:
    convert.load_torch_dynamixer(params)
  message = str(e.value)
  assert "1 in the checkpoint, not in the model: network_0_1/attn/extra/kernel (3, 3)" in message
  assert "1 in the model, not in the checkpoint: network_0_1/norm2/bias (32,)" in message
  assert "1 shapes differ (checkpoint vs model): norm/scale (5,) vs (64,)" in message


def test_state_dict_that_is_not_dynamixer(mixer_tiny):
  with pytest.raises(ValueError, match="not an official DynaMixer state dict"):
    convert.load_torch_dynamixer({"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="not an official MLP-Mixer checkpoint"):
    convert.load_mixer_npz({"head/kernel": np.zeros((3, 3), np.float32)})


def test_export_round_trip_gives_identical_tensors(dynamixer_tiny):
  _, variables = convert.load_torch_dynamixer(dynamixer_tiny["params"])
  exported = convert.to_torch_state_dict(variables)
  assert sorted(exported) == sorted(dynamixer_tiny["params"])
  for key, value in dynamixer_tiny["params"].items():
    np.testing.assert_array_equal(exported[key], value)


@pytest.mark.parametrize("name,tensors", [("dynamixer_s", 494), ("dynamixer_m", 656),
                                          ("dynamixer_l", 980)])
def test_full_size_architectures_are_read_back_from_shapes(name, tensors):
  model = models.create_model(name)
  shapes = trees.expected_param_shapes(model)
  state = {convert.path_to_torch_key(p): np.broadcast_to(np.float32(0), s)
           for p, s in shapes.items()}
  state = {k: convert.flax_to_torch_array(v) for k, v in state.items()}
  assert len(state) == tensors  # the official state-dict tensor counts (spec section 6)
  assert "network.1.proj.weight" in state if name != "dynamixer_m" else "network.2.proj.weight"
  inferred = convert.infer_dynamixer_kwargs(state)
  for field in ("entries", "num_classes", "image_size", "patch_size"):
    assert inferred[field] == getattr(model, field)
