"""The config schema: every field a run reads, with defaults, and the one validator of it.

Config files in ``configs/`` start from ``base_config()`` and change what their recipe needs; the
result is locked, so a mistyped ``--config.field=value`` fails loudly. ``validate`` refuses a
config that cannot work before anything loads or compiles; ``check_devices`` adds what is known
only once the devices are (the mesh and the per-device batch).
"""

import json
import math
import re
from typing import Any, Sequence

import ml_collections

from dynamixer_jax import models, preprocessing
from dynamixer_jax.augment import device, mixing, randaugment
from dynamixer_jax.preprocessing import check_choice, fail, is_int, is_number
from dynamixer_jax.train import optim, sharding


def parse_arguments(arg: Any, defaults: dict[str, str], usage: str) -> dict[str, str]:
  """A config file's typed arguments: 'key=value,key=value' after the colon of --config.

  Unknown keys and arguments to a config that takes none are errors naming the accepted ones.
  """
  args = dict(defaults)
  for item in filter(None, (str(arg) if arg is not None else "").split(",")):
    key, sep, value = item.partition("=")
    if not defaults:
      raise ValueError(f"{usage} takes no arguments after the colon; got {arg!r}.")
    if not sep or key not in args:
      raise ValueError(f"Bad config argument {item!r}: use key=value with keys "
                       f"{', '.join(sorted(args))}, e.g. {usage}:"
                       + ",".join(f"{k}={v or '...'}" for k, v in defaults.items()) + ".")
    args[key] = value
  return args


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the official DynaMixer-S ImageNet recipe (spec section 8) on a generic mesh."""
  c = ml_collections.ConfigDict()
  c.seed = 42
  # create_model(model.name, **other fields of model); num_classes comes from the dataset.
  c.model = ml_collections.ConfigDict(dict(name="dynamixer_s", drop_path_rate=0.1, remat=False))
  c.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  c.data = preprocessing.default_data_config()
  c.mean = preprocessing.IMAGENET_MEAN  # normalisation on device, images arrive as uint8
  c.std = preprocessing.IMAGENET_STD
  c.data.train_interpolation = "random"
  # On the device, in the train step (augment/device.py), in timm's order: flip, RandAugment
  # (timm policy string; '' = none), mixup / cutmix (one lambda per chunk_size examples = the
  # official per-GPU batch), random erasing. randaugment_batching: 'auto' (map on CPU, vmap on
  # GPU/TPU), 'map' or 'vmap' (the same images either way).
  c.augment = ml_collections.ConfigDict(dict(
      hflip=True, randaugment="rand-m9-mstd0.5-inc1", randaugment_batching="auto",
      mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mix_prob=1.0, chunk_size=256,
      erase_prob=0.25, erase_mode="pixel"))

  c.batch_size = 2048  # global: split over processes and devices
  c.eval_batch_size = 2048
  c.num_epochs = 300  # length of the cosine (timm --epochs); cooldown epochs come after
  c.num_train_steps = -1  # > 0: stop after this many steps instead (smoke tests)
  # Memory levers (README "Scaling out"): k > 1 computes each global batch as k micro-batches
  # (the same update); model.remat = True recomputes block activations in the backward pass.
  c.grad_accum_steps = 1

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
      decay_matrices_only=True, momentum=0.9, nesterov=False, grad_clip_norm=0.0))
  c.optim.backbone_lr_mult = 1.0  # lr factor for all but the head (fine-tuning); 1 = off
  c.init_from = ""  # weights to start from (pretrained.load: checkpoint, .pth, .npz); '' = none
  c.schedule = ml_collections.ConfigDict(dict(
      name="cosine", warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10,
      per_epoch=True))
  c.label_smoothing = 0.1
  c.ema_decay = 0.99996  # 0 turns the weight EMA off

  # Device mesh: axis name -> size, -1 = the rest. Batches split over every axis; the state is
  # split over 'fsdp' (e.g. dict(data=4, fsdp=2)) by the first matching (path regex, rule).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.partition_rules = ((".*", "fsdp"),)  # rule: 'fsdp' or 'replicate'
  # Multi-host: see sharding.initialize_distributed and the README's "Scaling out".
  c.distributed = ml_collections.ConfigDict(dict(
      mode="auto", coordinator_address="", num_processes=0, process_id=-1, timeout_s=300,
      cpu_collectives=""))
  c.fsdp_min_size = 2 ** 14  # smaller tensors stay replicated
  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.max_checkpoint_failures = 3  # failed saves in a row before the run stops
  # JAX's persistent compilation cache, so that a restart reuses the compiled steps: 'auto' =
  # JAX_COMPILATION_CACHE_DIR if set, else <workdir>/compile_cache; '' = JAX's own setting
  # (off unless that variable is set); or a folder (local or gs://).
  c.compilation_cache_dir = "auto"
  # Resume even if the workdir's run used another model, dataset, seed, global batch or
  # optimizer (RESUME_FIELDS); the mesh, epochs and eval/log cadence may always change.
  c.force_resume = False
  return c


# What makes a workdir "the same run": resuming with other values is refused (README "Failures
# and recovery") unless config.force_resume. model.remat only changes how it is computed.
RESUME_FIELDS = ("model", "data.name", "seed", "batch_size", "optim")
RESUME_IGNORED = ("model.remat",)
# What a user changes to recover a run (after a NaN stop, say): allowed on a resume, with a
# warning that records the change (the schedule's warmup is not a resume field at all).
RECOVERY_FIELDS = ("optim.lr", "optim.grad_clip_norm")


def resume_differences(saved: dict, config: ml_collections.ConfigDict,
                       fields: Sequence[str] = RESUME_FIELDS,
                       ignored: Sequence[str] = RESUME_IGNORED + RECOVERY_FIELDS) -> list[str]:
  """``field: saved -> now`` for each of ``fields`` whose value differs from the saved run's
  (by default the RESUME_FIELDS, without the ignored and the recovery fields)."""
  def flat(tree, prefix):
    if isinstance(tree, dict):
      return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}

  now = config.to_dict()
  diffs = []
  for field in fields:
    old, new = saved, now
    for part in field.split("."):
      old = old.get(part) if isinstance(old, dict) else None
      new = new.get(part) if isinstance(new, dict) else None
    old, new = flat(old, field), flat(json.loads(json.dumps(new, default=str)), field)
    for key in sorted(set(old) | set(new)):
      if key not in ignored and old.get(key) != new.get(key):
        diffs.append(f"config.{key}: {old.get(key)!r} in the saved run, {new.get(key)!r} now")
  return diffs


def total_epochs(config: ml_collections.ConfigDict) -> int:
  """Epochs actually trained: the cosine plus the cooldown (300 + 10 in the official recipe)."""
  return config.num_epochs + config.schedule.cooldown_epochs


# --- Validation ----------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_COLLECTIVES = ("", "gloo", "mpi")


# Rules: (predicate, what is allowed). ``_check(config, rule, *fields)`` applies one to fields.
_POSITIVE_INT = (lambda v: is_int(v) and v > 0, "it must be a positive integer")
_NON_NEGATIVE_INT = (lambda v: is_int(v) and v >= 0, "use an integer >= 0")
_POSITIVE = (lambda v: is_number(v) and v > 0, "use a number > 0")
_NON_NEGATIVE = (lambda v: is_number(v) and v >= 0, "use a number >= 0 (0 = off)")
_FRACTION = (lambda v: is_number(v) and 0 <= v < 1, "use a number in [0, 1)")
_PROBABILITY = (lambda v: is_number(v) and 0 <= v <= 1, "a probability must lie in [0, 1]")
_BOOL = (lambda v: isinstance(v, bool), "use True or False")
_STRING = (lambda v: isinstance(v, str), "use a string")


def _check(config: ml_collections.ConfigDict, rule: tuple, *fields: str) -> None:
  ok, allowed = rule
  for field in fields:
    if not ok(config[field]):
      fail(field, config[field], allowed)


def _check_choice(config: ml_collections.ConfigDict, field: str, options: Sequence[Any]) -> None:
  check_choice(config[field], field, options)


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuse a config that cannot work, naming the field and the allowed values, before anything
  compiles or loads.

  Needs no TensorFlow and no data. What does is checked next, by ``data.sources.dataset_info``
  (the dataset name, the RandAugment policy, the image folder), and what needs the devices by
  ``check_devices``.
  """
  _check_batches(config)
  _check_optimizer(config)
  _check_augment(config)
  preprocessing.validate_data(config.data)
  _check_mesh(config)
  _check_model(config)
  _check(config, _POSITIVE_INT, "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
         "max_checkpoint_failures")
  _check(config, _POSITIVE, "eval_every_epochs")
  _check(config, _BOOL, "force_resume")
  _check(config, _STRING, "init_from", "compilation_cache_dir")


def check_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """What is known only at run time: the batches and gradient accumulation split over
  ``num_devices`` (the mesh itself is checked by ``sharding.create_mesh``)."""
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % num_devices:
      raise ValueError(f"config.{field}={config[field]} must be divisible by the number of "
                       f"devices ({num_devices}); pick a multiple of {num_devices}.")
  if (config.batch_size // num_devices) % config.grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must divide the batch of "
                     f"each device ({config.batch_size} / {num_devices} devices); pick a "
                     "divisor of it, or a larger batch_size.")


def _check_batches(config: ml_collections.ConfigDict) -> None:
  if not (is_int(config.seed) and 0 <= config.seed < 2**32):
    fail("seed", config.seed, "use an integer in [0, 2**32)")
  _check_choice(config, "dtype", DTYPES)
  _check(config, _POSITIVE_INT, "batch_size", "eval_batch_size", "num_epochs", "grad_accum_steps")
  steps = config.num_train_steps
  if not (is_int(steps) and (steps == -1 or steps > 0)):
    fail("num_train_steps", config.num_train_steps,
          "use -1 (train num_epochs) or a positive number of steps")
  if config.batch_size % config.grad_accum_steps:
    fail("grad_accum_steps", config.grad_accum_steps,
          f"it must divide batch_size={config.batch_size}")


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  _check_choice(config, "optim.name", optim.OPTIMIZERS)
  if not (is_number(config.optim.lr) and config.optim.lr > 0):
    fail("optim.lr", config.optim.lr, "the learning rate must be a positive number")
  _check(config, _FRACTION, "optim.b1", "optim.b2", "optim.momentum", "label_smoothing")
  _check(config, _POSITIVE, "optim.eps")
  _check(config, _NON_NEGATIVE, "optim.weight_decay", "optim.grad_clip_norm",
         "optim.backbone_lr_mult", "schedule.warmup_epochs", "schedule.warmup_lr",
         "schedule.min_lr")
  _check(config, _BOOL, "optim.nesterov", "optim.decay_matrices_only", "schedule.per_epoch")
  _check_choice(config, "schedule.name", optim.SCHEDULES)
  _check(config, _NON_NEGATIVE_INT, "schedule.cooldown_epochs")
  if config.schedule.warmup_epochs >= config.num_epochs:
    fail("schedule.warmup_epochs", config.schedule.warmup_epochs,
          f"warmup must be shorter than num_epochs={config.num_epochs}")
  if not (is_number(config.ema_decay) and 0 <= config.ema_decay < 1):
    fail("ema_decay", config.ema_decay, "use a value in [0, 1); 0 turns EMA off")


def _check_augment(config: ml_collections.ConfigDict) -> None:
  for field in ("mean", "std"):
    values = config[field]
    if (not isinstance(values, (tuple, list)) or len(values) != 3
        or not all(is_number(v) for v in values) or field == "std" and min(values) <= 0):
      fail(field, values, "give three numbers (R, G, B, for pixels in 0..1); std > 0")
  aug = config.augment
  _check(config, _PROBABILITY, "augment.switch_prob", "augment.mix_prob", "augment.erase_prob")
  _check(config, _NON_NEGATIVE, "augment.mixup_alpha", "augment.cutmix_alpha")
  _check_choice(config, "augment.erase_mode", mixing.ERASE_MODES)
  _check(config, _BOOL, "augment.hflip")
  _check_choice(config, "augment.randaugment_batching", device.BATCHINGS)
  if not isinstance(aug.randaugment, str):
    fail("augment.randaugment", aug.randaugment,
         "use a policy string such as 'rand-m9-mstd0.5-inc1', or '' for none")
  randaugment.parse_policy(aug.randaugment)  # a malformed policy fails here, naming the field
  mixing_on = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0
  if mixing_on and (not is_int(aug.chunk_size) or aug.chunk_size <= 0
                    or config.batch_size % min(aug.chunk_size, config.batch_size)):
    fail("augment.chunk_size", aug.chunk_size,
          f"mixup/cutmix chunks must divide batch_size={config.batch_size}; pick a divisor "
          "(the official per-GPU batch) or set augment.mixup_alpha = augment.cutmix_alpha = 0")


def _check_mesh(config: ml_collections.ConfigDict) -> None:
  """Sizes, rules and multi-host settings; the device count itself is known only at run time."""
  sizes = dict(config.mesh)
  if not sizes or any(not is_int(s) or (s < 1 and s != -1) for s in sizes.values()) or (
      list(sizes.values()).count(-1) > 1):
    fail("mesh", sizes, "give axis=size pairs, sizes positive integers with at most one -1 (all "
          "remaining devices), e.g. dict(data=-1, fsdp=1)")
  known = math.prod(s for s in sizes.values() if s > 0)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % known:
      fail(field, config[field], f"config.mesh={sizes} splits each batch over a multiple of "
            f"{known} devices; use a multiple of {known}")
  if -1 not in sizes.values() and (config.batch_size // known) % config.grad_accum_steps:
    fail("grad_accum_steps", config.grad_accum_steps, f"it must divide the batch of each device "
          f"(batch_size={config.batch_size} over {known} devices)")
  rules = config.partition_rules
  for i, rule in enumerate(rules if isinstance(rules, (tuple, list)) else [rules]):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and rule[1] in sharding.PARTITION_RULES):
      fail(f"partition_rules[{i}]", rule, "use (path regex, rule) with rule one of "
            f"{sharding.PARTITION_RULES}, e.g. ('.*', 'fsdp')")
    try:
      re.compile(rule[0])
    except re.error as e:
      fail(f"partition_rules[{i}]", rule, f"{rule[0]!r} is not a regular expression ({e})")
  _check(config, _NON_NEGATIVE_INT, "fsdp_min_size", "distributed.num_processes")
  _check_choice(config, "distributed.mode", sharding.DISTRIBUTED_MODES)
  _check_choice(config, "distributed.cpu_collectives", CPU_COLLECTIVES)
  _check(config, _STRING, "distributed.coordinator_address")
  _check(config, _POSITIVE, "distributed.timeout_s")
  dist = config.distributed
  if not (is_int(dist.process_id) and -1 <= dist.process_id
          and (dist.num_processes == 0 or dist.process_id < dist.num_processes)):
    fail("distributed.process_id", dist.process_id,
          "use -1 (auto-detect) or an index below distributed.num_processes")


def _check_model(config: ml_collections.ConfigDict) -> None:
  """The model's own arguments, and that its patches, segments and transitions fit the image."""
  name = config.model.name
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  try:
    full = models.model_kwargs(name, **kwargs)
  except (TypeError, ValueError) as e:  # unknown model or argument: lists the valid ones
    raise ValueError(f"config.model is invalid: {e}") from None
  _check(config, _FRACTION, *(f"model.{k}" for k in ("drop_path_rate",) if k in kwargs))
  _check(config, _BOOL, *(f"model.{k}" for k in ("remat",) if k in kwargs))
  for field in ("image_size", "patch_size"):
    if field in kwargs and not (kwargs[field] is None and field == "image_size"):
      _check(config, _POSITIVE_INT, f"model.{field}")
  size = config.data.image_size
  if full.get("image_size") not in (None, size):
    fail("data.image_size", size, f"model {name!r} is built for {full['image_size']}x"
          f"{full['image_size']} images (config.model.image_size); use the same size for both")
  module = models.create_model(name, **kwargs)
  if isinstance(module, models.DynaMixer):
    for i, entry in enumerate(module.entries):
      if not (all(is_int(v) and v > 0 for v in entry[:4]) and entry.mlp_ratio > 0):
        fail(f"model.entries[{i}]", tuple(entry), "depth, width, segments, reduced_dim must "
              "be positive integers and mlp_ratio positive")
      if entry.width % entry.segments:
        fail(f"model.entries[{i}]", tuple(entry),
              f"segments={entry.segments} must divide width={entry.width}")
    try:
      module.token_grids()
    except ValueError as e:
      fail("data.image_size", size, f"{name} with patch_size={module.patch_size} cannot take "
            f"it: {e} Change data.image_size (and model.image_size) or model.patch_size")
  elif size % full["patch_size"]:
    fail("data.image_size", size,
          f"it must be divisible by the patch size of {name!r} ({full['patch_size']})")
