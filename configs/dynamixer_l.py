r"""DynaMixer-L on ImageNet-1k with the official recipe (spec section 8, value for value).

Command:   python train.py --config=configs/dynamixer_l.py --workdir=runs/dynamixer_l
           (--config.data.data_dir=... where tfds keeps the prepared imagenet2012)
Hardware:  the paper used 8 GPUs (per-GPU batch 64, global 512); any mesh works here.
Time:      not run by us; no wall-time figure yet (the benchmark issue will give an estimate).
Accuracy:  84.3 % top-1 (paper); not reproduced here.
"""

from dynamixer_jax.train import configlib


def get_config(arg=None):
  configlib.parse_arguments(arg, {}, "configs/dynamixer_l.py")
  config = configlib.base_config()
  config.model.name = "dynamixer_l"
  config.model.drop_path_rate = 0.3
  config.batch_size = config.eval_batch_size = 512
  config.data.eval_resize = 256  # crop_pct 0.875
  config.augment.randaugment = "rand-m9-mstd0.5-inc1"  # --aa, on the device
  config.data.train_interpolation = "random"
  config.augment.chunk_size = 64  # mixup/cutmix lambda per official per-GPU batch (-b 64)
  return config.lock()
