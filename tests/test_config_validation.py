"""Bad configuration: every value is refused before anything compiles, naming the field and what
is allowed; every shipped config passes."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from dynamixer_jax.train import configlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_mock_config.py")  # dynamixer_s, 32 px, patch 4, batch 16


def load(path: str, arg=None):
  """``get_config(arg)`` of a config file, as train.py's --config=path:arg loads it."""
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def override(config, **fields):
  """``override(config, **{'optim.lr': -1.0})``, as ``--config.optim.lr=-1`` would."""
  with config.unlocked():
    for field, value in fields.items():
      parent, _, leaf = field.rpartition(".")
      (config[parent] if parent else config)[leaf] = value
  return config


# (overrides of the tiny config, the message expected). Each names the field and the allowed values.
CASES = [
    ({"model.name": "dynamixer_xs"},
     r"config\.model is invalid: Unknown model 'dynamixer_xs'\. Registered models: dynamixer_l"),
    ({"model.patch_sise": 4}, r"config\.model is invalid: .*no argument.*patch_sise.*Valid"),
    ({"model.drop_path_rate": 1.0}, r"config\.model\.drop_path_rate=1\.0 is invalid: .*\[0, 1\)"),
    ({"dtype": "float64"}, r"config\.dtype='float64' is invalid: use one of 'auto', 'float32'"),
    ({"seed": -1}, r"config\.seed=-1 is invalid: use an integer in \[0, 2\*\*32\)"),
    ({"batch_size": 0}, r"config\.batch_size=0 is invalid: it must be a positive integer"),
    ({"num_train_steps": 0}, r"config\.num_train_steps=0 is invalid: use -1 .* or a positive"),
    ({"optim.lr": -1.0}, r"config\.optim\.lr=-1\.0 is invalid: the learning rate must be a pos"),
    ({"optim.lr": float("inf")}, r"config\.optim\.lr=inf is invalid"),
    ({"optim.name": "adam"}, r"config\.optim\.name='adam' is invalid: use one of 'adamw', 'sgd'"),
    ({"optim.b2": 1.0}, r"config\.optim\.b2=1\.0 is invalid: use a number in \[0, 1\)"),
    ({"optim.weight_decay": -0.1}, r"config\.optim\.weight_decay=-0\.1 is invalid: .*>= 0"),
    ({"optim.grad_clip_norm": -1.0}, r"config\.optim\.grad_clip_norm=-1\.0 is invalid: .*>= 0"),
    ({"optim.backbone_lr_mult": -1.0}, r"config\.optim\.backbone_lr_mult=-1\.0 is invalid"),
    ({"schedule.name": "step"},
     r"config\.schedule\.name='step' is invalid: use one of 'cosine', 'constant'"),
    ({"schedule.warmup_epochs": 4},
     r"config\.schedule\.warmup_epochs=4 is invalid: warmup must be shorter than num_epochs=4"),
    ({"schedule.min_lr": -1e-5}, r"config\.schedule\.min_lr=-1e-05 is invalid: .*>= 0"),
    ({"schedule.cooldown_epochs": -1}, r"config\.schedule\.cooldown_epochs=-1 is invalid"),
    ({"label_smoothing": 1.0}, r"config\.label_smoothing=1\.0 is invalid: .*\[0, 1\)"),
    ({"ema_decay": 1.0}, r"config\.ema_decay=1\.0 is invalid: use a value in \[0, 1\)"),
    ({"std": (0.5, 0.0, 0.5)}, r"config\.std=\(0\.5, 0\.0, 0\.5\) is invalid: .*std > 0"),
    ({"augment.mixup_alpha": -1.0}, r"config\.augment\.mixup_alpha=-1\.0 is invalid: .*>= 0"),
    ({"augment.erase_prob": 1.5}, r"config\.augment\.erase_prob=1\.5 is invalid: .*\[0, 1\]"),
    ({"data.name": ""}, r"config\.data\.name='' is invalid: use a non-empty string"),
    ({"data.name": "folder"}, r"config\.data\.data_dir=None is invalid: data\.name='folder' needs"),
    ({"data.train_crop": "center"},
     r"config\.data\.train_crop='center' is invalid: use one of 'random_resized', 'resize_pad"),
    ({"data.eval_resize": 24},
     r"config\.data\.eval_resize=24 is invalid: use an integer >= data\.image_size=32"),
    ({"data.pad": -1}, r"config\.data\.pad=-1 is invalid: use an integer >= 0"),
    ({"data.train_interpolation": "lanczos"},
     r"config\.data\.train_interpolation='lanczos' is invalid: use one of 'random', 'bicubic'"),
    # The image and the model: patches, transitions, segments, and the size the model is built for.
    ({"model.image_size": 30, "data.image_size": 30, "data.eval_resize": 30},
     r"config\.data\.image_size=30 is invalid: .*image_size 30 is not divisible by patch_size 4"),
    ({"model.image_size": 36, "data.image_size": 36, "data.eval_resize": 36},
     r"config\.data\.image_size=36 is invalid: .*9x9 token grid is odd"),
    ({"model.entries": ((1, 16, 3, 2, 2.0, True), (1, 32, 4, 2, 2.0, False))},
     r"config\.model\.entries\[0\]=\(1, 16, 3, 2, 2\.0, True\) is invalid: segments=3 must "
     r"divide width=16"),
    ({"data.image_size": 64, "data.eval_resize": 64},
     r"config\.data\.image_size=64 is invalid: model 'dynamixer_s' is built for 32x32 images"),
    ({"model": {"name": "mixer_s16", "image_size": None}, "data.image_size": 40,
      "data.eval_resize": 40},
     r"config\.data\.image_size=40 is invalid: .*divisible by the patch size of 'mixer_s16' "
     r"\(16\)"),
    # Batches and the mesh.
    ({"mesh": {"data": -1, "fsdp": -1}}, r"config\.mesh=.* is invalid: .*at most one -1"),
    ({"mesh": {"data": 0}}, r"config\.mesh=\{'data': 0\} is invalid: .*positive integers"),
    ({"mesh": {"data": 3}},
     r"config\.batch_size=16 is invalid: config\.mesh=\{'data': 3\} splits each batch over a "
     r"multiple of 3 devices; use a multiple of 3"),
    ({"mesh": {"data": 4, "fsdp": -1}, "eval_batch_size": 6},
     r"config\.eval_batch_size=6 is invalid: .*multiple of 4"),
    ({"mesh": {"data": 4}, "grad_accum_steps": 8},
     r"config\.grad_accum_steps=8 is invalid: it must divide the batch of each device"),
    ({"partition_rules": ((".*", "shard"),)},
     r"config\.partition_rules\[0\]=\('\.\*', 'shard'\) is invalid: .*\('fsdp', 'replicate'\)"),
    ({"partition_rules": (("(", "fsdp"),)},
     r"config\.partition_rules\[0\]=.* is invalid: '\(' is not a regular expression"),
    ({"distributed.mode": "yes"},
     r"config\.distributed\.mode='yes' is invalid: use one of 'auto', 'on', 'off'"),
    ({"distributed.num_processes": 2, "distributed.process_id": 2},
     r"config\.distributed\.process_id=2 is invalid: use -1 .* below distributed\.num_processes"),
    # The loop's cadence.
    ({"log_every_steps": 0}, r"config\.log_every_steps=0 is invalid: it must be a positive int"),
    ({"checkpoint_every_steps": 0}, r"config\.checkpoint_every_steps=0 is invalid"),
    ({"keep_checkpoints": 0}, r"config\.keep_checkpoints=0 is invalid: it must be a positive int"),
    ({"eval_every_epochs": 0.0}, r"config\.eval_every_epochs=0\.0 is invalid: use a number > 0"),
]


@pytest.mark.parametrize("fields,message", CASES, ids=[str(c[0]) for c in CASES])
def test_a_bad_value_is_refused_naming_the_field(fields, message):
  config = override(load(TINY), **fields)
  with pytest.raises(ValueError, match=message):
    configlib.validate(config)


@pytest.mark.parametrize("path,arg", [(p, None) for p in sorted(glob.glob(
    os.path.join(ROOT, "configs", "[!_]*.py")))] + [
        (TINY, None), (os.path.join(ROOT, "configs", "cifar_finetune.py"), "model=mixer_b16"),
        (os.path.join(ROOT, "configs", "cifar_finetune.py"), "model=dynamixer_l,dataset=cifar10")],
    ids=lambda x: os.path.basename(x) if x and "/" in x else str(x))
def test_every_shipped_config_is_valid(path, arg):
  configlib.validate(load(path, arg))


def test_a_dataset_name_is_checked_against_tfds_without_downloading():
  from dynamixer_jax.data import sources  # pylint: disable=g-import-not-at-top
  data = load(TINY).data
  for name, message in (("cifar11", r"Unknown dataset config\.data\.name='cifar11'.*'digits', "
                                    r"'folder'.*Close matches: .*'cifar10'"),
                        ("cifar10:9.9.9", r"config\.data\.name='cifar10:9\.9\.9' is invalid: .*"
                                          r"only: 3\.0\.2")):
    with pytest.raises(ValueError, match=message):
      sources.dataset_info(override(data, name=name))


@pytest.mark.slow
def test_train_py_stops_with_the_field_name_before_compiling(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config=tests/tiny_mock_config.py", "--workdir",
       str(tmp_path), "--config.optim.lr=-1"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "config.optim.lr" in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def _leaves(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", config, key


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py"))),
                         ids=os.path.basename)
def test_every_field_can_be_set_from_the_command_line(path):
  """config_flags refuses to override a field whose type is NoneType (a plain None default)."""
  untyped = [name for name, parent, key in _leaves(load(path))
             if parent.get_type(key) is type(None)]
  assert not untyped, f"fields that --config.<field>=value cannot set: {untyped}"
