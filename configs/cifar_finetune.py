r"""Fine-tune ImageNet weights on CIFAR-10/100 with the DynaMixer paper's transfer recipe (Table 9).

Arguments after the colon: model (registered name), dataset (cifar10 | cifar100), init (weights:
a train.py workdir or checkpoint, convert output, official .pth or .npz; '' = from scratch).

Command:   python train.py --config=configs/cifar_finetune.py:model=dynamixer_s,dataset=cifar100,init=weights/dynamixer_s \
               --workdir=runs/cifar100_dynamixer_s
Hardware:  one GPU (batch 128 at 224 px); a CPU only for smoke runs (colabs/cifar_finetune.ipynb).
Time:      not measured by us yet (60 epochs of 50,000 images at 224 px).
Accuracy:  paper Table 9 (from ImageNet DynaMixer-S weights, which were never published):
           not reproduced here.

The official transfer script: SGD momentum 0.9, lr 0.01, weight decay 5e-4 on every parameter,
batch 128, 60 epochs, CosineAnnealingLR(T_max=60, eta_min=2e-4) stepped once per epoch (our
'cosine' with no warmup, min_lr 2e-4 and per_epoch=True is that curve exactly); train images
Resize(224) -> RandomCrop(224, padding=28) -> horizontal flip, test Resize((224, 224)), CIFAR
mean/std; EMA weights of the ImageNet checkpoint, head dropped. No RandAugment, mixup, label
smoothing or EMA. ``optim.backbone_lr_mult`` (1.0 = off) mimics its --transfer-learning groups
(0.01 x lr for patch_embed and network, lr for the head); the official script by accident
leaves the final norm out of every group, freezing it; we do not: it trains with the backbone.
Differences: our resizes are TensorFlow's antialiased ones (torchvision: PIL's).
"""

import ml_collections

from dynamixer_jax.train import configlib

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def get_config(arg=None) -> ml_collections.ConfigDict:
  args = configlib.parse_arguments(arg, dict(model="dynamixer_s", dataset="cifar100", init=""),
                                   "configs/cifar_finetune.py")
  config = configlib.base_config()
  config.model = dict(name=args["model"], drop_path_rate=0.0)
  config.init_from = args["init"]
  config.data.name = args["dataset"]
  config.data.eval_split = "test"
  config.data.image_size = config.data.eval_resize = 224
  config.data.train_crop = "resize_pad_crop"  # Resize(224), RandomCrop(224, padding=28)
  config.data.pad = 28
  config.augment.hflip = True
  config.augment.randaugment = ""
  config.data.train_interpolation = "bilinear"  # torchvision Resize's default
  config.data.eval_crop = "resize"  # Resize((224, 224))
  config.data.eval_interpolation = "bilinear"  # torchvision Resize's default
  config.augment.mixup_alpha = config.augment.cutmix_alpha = 0.0
  config.augment.erase_prob = 0.0
  config.label_smoothing = 0.0
  config.ema_decay = 0.0
  config.mean, config.std = CIFAR_MEAN, CIFAR_STD
  config.batch_size = config.eval_batch_size = 128
  config.num_epochs = 60
  config.optim.name = "sgd"
  config.optim.lr = 0.01
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.decay_matrices_only = False  # torch SGD(weight_decay=...) decays every parameter
  config.schedule.warmup_epochs = 0
  config.schedule.min_lr = 2e-4
  config.schedule.cooldown_epochs = 0
  config.schedule.per_epoch = True
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  return config.lock()
