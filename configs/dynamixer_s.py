r"""DynaMixer-S on ImageNet-1k with the official recipe (spec section 8, value for value).

Command:   python train.py --config=configs/dynamixer_s.py --workdir=runs/dynamixer_s
           (--config.data.data_dir=... where tfds keeps the prepared imagenet2012)
Hardware:  the paper used 8 GPUs (per-GPU batch 256, global 2048); any mesh works here.
Time:      not run by us; no wall-time figure yet (the benchmark issue will give an estimate).
Accuracy:  82.7 % top-1 (paper); not reproduced here.
"""

from dynamixer_jax.train import configlib


def get_config(arg=None):
  configlib.parse_arguments(arg, {}, "configs/dynamixer_s.py")
  config = configlib.base_config()
  config.model.name = "dynamixer_s"
  config.model.drop_path_rate = 0.1
  config.batch_size = config.eval_batch_size = 2048
  config.data.eval_resize = 248  # crop_pct 0.9
  config.augment.randaugment = "rand-m9-mstd0.5-inc1"  # --aa, on the device
  config.data.train_interpolation = "random"
  config.augment.chunk_size = 256  # mixup/cutmix lambda per official per-GPU batch (-b 256)
  return config.lock()
