r"""A small DynaMixer on scikit-learn's handwritten digits: real images, nothing to download.

1,797 real 8x8 digits ship inside the scikit-learn wheel; they are upsampled to 32x32 and split
into a fixed held-out set (20 %). The model is a two-entry DynaMixer (8x8 then 4x4 tokens), one
block each.

Command:   python train.py --config=configs/quickstart.py
Hardware:  any CPU; 2 cores are enough.
Time:      measured on a 2-core CPU: see the README (about 2 minutes).
Accuracy:  measured: see the README; tests/test_train.py checks >= 95 % held-out top-1.
"""

from dynamixer_jax.train import configlib


def get_config(arg=None):
  configlib.parse_arguments(arg, {}, "configs/quickstart.py")
  config = configlib.base_config()
  config.model = dict(name="dynamixer_s", drop_path_rate=0.0, image_size=32, patch_size=4,
                      entries=((1, 64, 4, 2, 3.0, True), (1, 128, 8, 2, 3.0, False)))
  config.dtype = "float32"
  config.data.name = "digits"
  config.data.image_size = 32
  config.data.eval_resize = 32
  config.data.train_crop = "resize_pad_crop"
  config.data.pad = 2
  config.augment.hflip = False  # a mirrored 2 is not a 2
  config.augment.randaugment = ""  # no RandAugment, mixup, cutmix or erasing: 8x8 digits
  config.data.train_interpolation = "bicubic"
  config.augment.mixup_alpha = config.augment.cutmix_alpha = 0.0
  config.augment.erase_prob = 0.0
  config.mean = config.std = (0.5, 0.5, 0.5)
  config.batch_size = config.eval_batch_size = 64
  config.num_epochs = 20
  config.optim.lr = 2e-3
  config.schedule.warmup_epochs = 2
  config.schedule.cooldown_epochs = 0
  config.schedule.per_epoch = False
  config.ema_decay = 0.98  # the EMA of a short run: about the last 50 steps
  config.log_every_steps = 50
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 200
  config.mesh = dict(data=1)  # one device: keeps the quickstart fast on CPU
  return config.lock()
