r"""DynaMixer-M on ImageNet-1k with the official recipe (spec section 8, value for value).

Command:   python train.py --config=configs/dynamixer_m.py --workdir=runs/dynamixer_m
           (--config.data.data_dir=... where tfds keeps the prepared imagenet2012)
Hardware:  the paper used 8 GPUs (per-GPU batch 128, global 1024); any mesh works here.
Time:      not run by us; no wall-time figure yet (the benchmark issue will give an estimate).
Accuracy:  83.7 % top-1 (paper); not reproduced here.
"""

from dynamixer_jax.train import configlib


def get_config(arg=None):
  configlib.parse_arguments(arg, {}, "configs/dynamixer_m.py")
  config = configlib.base_config()
  config.model.name = "dynamixer_m"
  config.model.drop_path_rate = 0.1
  config.batch_size = config.eval_batch_size = 1024
  config.data.eval_resize = 248  # crop_pct 0.9
  config.augment.randaugment = "rand-m9-mstd0.5-inc1"  # --aa, on the device
  config.data.train_interpolation = "random"
  config.augment.chunk_size = 128  # mixup/cutmix lambda per official per-GPU batch (-b 128)
  return config.lock()
