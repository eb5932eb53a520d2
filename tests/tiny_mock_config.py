"""A tiny DynaMixer on in-run mock CIFAR-10: train.py end to end in seconds (tests only)."""

from dynamixer_jax.train import configlib


def get_config(arg=None):
  del arg
  config = configlib.base_config()
  config.model = dict(name="dynamixer_s", drop_path_rate=0.1, image_size=32, patch_size=4,
                      entries=((1, 16, 2, 2, 2.0, True), (1, 32, 4, 2, 2.0, False)))
  config.dtype = "float32"
  config.data.name = "cifar10"
  config.data.mock = True
  config.data.mock_num_examples = 64
  config.data.image_size = config.data.eval_resize = 32
  config.data.train_crop = "resize_pad_crop"
  config.batch_size = config.eval_batch_size = 16
  config.num_epochs = 4
  config.schedule.warmup_epochs = 1
  config.schedule.cooldown_epochs = 0
  config.log_every_steps = 1
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 2
  return config.lock()
