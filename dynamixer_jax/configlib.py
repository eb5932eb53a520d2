"""The config schema: every field the trainer reads, with defaults, and its validation.

Config files in ``configs/`` start from ``base_config()`` and change what their recipe needs; the
result is locked, so a mistyped ``--config.field=value`` fails loudly.
"""

import ml_collections

from dynamixer_jax import mixing, models


def default_data_config() -> ml_collections.ConfigDict:
  """Every field the input pipeline reads, at ImageNet defaults; configs override what differs.

  It lives here, not in ``input_pipeline`` (which re-exports it), so that the config schema,
  the steps and the benchmark import no TensorFlow.
  """
  return ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=None, train_split="train", eval_split="validation",
      image_size=224, eval_resize=248, train_crop="random_resized", pad=4, hflip=True,
      shuffle_buffer=10_000, mock=False, mock_num_examples=64,
      # Off here (a neutral pipeline); base_config turns on the official recipe.
      randaugment="",  # timm policy string, e.g. 'rand-m9-mstd0.5-inc1'; '' = none
      train_interpolation="bicubic",  # 'random' (bilinear or bicubic per image), 'bicubic', 'bilinear'
      eval_crop="center"))  # 'center': resize shorter side to eval_resize + crop; 'resize': squash


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the official DynaMixer-S ImageNet recipe (spec section 8) on a generic mesh."""
  c = ml_collections.ConfigDict()
  c.seed = 42
  # create_model(model.name, **other fields of model); num_classes comes from the dataset.
  c.model = ml_collections.ConfigDict(dict(name="dynamixer_s", drop_path_rate=0.1))
  c.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  c.data = default_data_config()
  c.mean = (0.485, 0.456, 0.406)  # normalisation on device, images arrive as uint8
  c.std = (0.229, 0.224, 0.225)
  c.data.randaugment = "rand-m9-mstd0.5-inc1"
  c.data.train_interpolation = "random"
  # On-device mixup / cutmix / random erasing (mixing.py); chunk_size = the official per-GPU batch.
  c.augment = mixing.default_augment_config()

  c.batch_size = 2048  # global: split over processes and devices
  c.eval_batch_size = 2048
  c.num_epochs = 300  # length of the cosine (timm --epochs); cooldown epochs come after
  c.num_train_steps = -1  # > 0: stop after this many steps instead (smoke tests)

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
  return c


def total_epochs(config: ml_collections.ConfigDict) -> int:
  """Epochs actually trained: the cosine plus the cooldown (300 + 10 in the official recipe)."""
  return config.num_epochs + config.schedule.cooldown_epochs


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuse a config that cannot work, naming the field, before anything compiles."""
  def fail(field, value, allowed):
    raise ValueError(f"config.{field}={value!r} is invalid: {allowed}.")

  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  models.model_kwargs(config.model.name, **kwargs)  # unknown model / argument: lists valid ones
  if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
    fail("dtype", config.dtype, "use 'auto', 'float32', 'bfloat16' or 'float16'")
  for field in ("batch_size", "eval_batch_size", "num_epochs"):
    if not isinstance(config[field], int) or config[field] <= 0:
      fail(field, config[field], "it must be a positive integer")
  if not config.optim.lr > 0:
    fail("optim.lr", config.optim.lr, "the learning rate must be positive")
  if config.schedule.warmup_epochs >= config.num_epochs:
    fail("schedule.warmup_epochs", config.schedule.warmup_epochs,
         f"warmup must be shorter than num_epochs={config.num_epochs}")
  if not 0 <= config.ema_decay < 1:
    fail("ema_decay", config.ema_decay, "use a value in [0, 1); 0 turns EMA off")
  if len(config.mean) != 3 or len(config.std) != 3:
    fail("mean/std", (config.mean, config.std), "give three values each (RGB)")
  aug = config.augment
  for field in ("switch_prob", "mix_prob", "erase_prob"):
    if not 0 <= aug[field] <= 1:
      fail(f"augment.{field}", aug[field], "a probability must lie in [0, 1]")
  if aug.erase_mode not in mixing.ERASE_MODES:
    fail("augment.erase_mode", aug.erase_mode, f"use one of {mixing.ERASE_MODES}")
  mixing_on = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0
  if mixing_on and (aug.chunk_size <= 0 or config.batch_size % min(aug.chunk_size,
                                                                   config.batch_size)):
    fail("augment.chunk_size", aug.chunk_size,
         f"mixup/cutmix chunks must divide batch_size={config.batch_size}; pick a divisor "
         "(the official per-GPU batch) or set augment.mixup_alpha = augment.cutmix_alpha = 0")
  if config.data.train_interpolation not in ("random", "bicubic", "bilinear"):
    fail("data.train_interpolation", config.data.train_interpolation,
         "use 'random', 'bicubic' or 'bilinear'")
  if config.data.eval_crop not in ("center", "resize"):
    fail("data.eval_crop", config.data.eval_crop, "use 'center' or 'resize'")
