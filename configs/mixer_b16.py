r"""MLP-Mixer-B/16 on ImageNet-1k from scratch, with the DynaMixer recipe.

This is the DynaMixer/timm recipe (AdamW 2e-3, cosine, 20 warmup epochs, label smoothing, EMA)
with the Mixer paper's gradient clipping at global norm 1; it is NOT the Mixer paper's own
ImageNet-1k recipe. To fine-tune the official pre-trained weights instead, convert the .npz
(see the README) and use configs/cifar_finetune.py-style fine-tuning.

Command:   python train.py --config=configs/mixer_b16.py --workdir=runs/mixer_b16
Hardware:  a GPU or TPU host; global batch 2048 over any mesh.
Time:      not run by us.
Accuracy:  not run by us (the Mixer paper reports 76.4 % top-1 for B/16 trained on ImageNet-1k
           alone with its own recipe).
"""

from dynamixer_jax.train import configlib


def get_config(arg=None):
  configlib.parse_arguments(arg, {}, "configs/mixer_b16.py")
  config = configlib.base_config()
  config.model.name = "mixer_b16"
  config.model.drop_path_rate = 0.1
  config.optim.grad_clip_norm = 1.0
  config.batch_size = config.eval_batch_size = 2048
  config.data.eval_resize = 256  # crop_pct 0.875
  return config.lock()
