"""What the host pipeline, the trainer and the checkpoints agree on, with no heavy imports.

The data config fields and their checks, the crop and interpolation choices, the normalisation
constants, and the eval-preprocessing record that every checkpoint carries (so that ``evaluate``
and ``predict`` preprocess exactly as the run that made it). Both the TensorFlow side
(``data/``) and the JAX side (``train/``, ``weights/``) import this module; it imports neither.
"""

import dataclasses
import math
import os
from typing import Any, Mapping, NoReturn, Sequence

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN, for pixels in 0..1
IMAGENET_STD = (0.229, 0.224, 0.225)

TRAIN_CROPS = ("random_resized", "resize_pad_crop")  # data.train_crop
INTERPOLATIONS = ("random", "bicubic", "bilinear")  # data.train_interpolation ('random': per image)
EVAL_INTERPOLATIONS = ("bicubic", "bilinear")  # data.eval_interpolation
EVAL_CROPS = ("center", "resize")  # data.eval_crop


def default_data_config() -> ml_collections.ConfigDict:
  """Every field the input pipeline reads, at ImageNet defaults; configs override what differs."""
  return ml_collections.ConfigDict(dict(
      name="imagenet2012",
      # A typed placeholder (None = the TFDS default), so --config.data.data_dir=DIR can set it.
      data_dir=ml_collections.config_dict.placeholder(str),
      train_split="train", eval_split="validation",
      image_size=224, train_crop="random_resized", pad=4, shuffle_buffer=10_000,
      mock=False, mock_num_examples=64,
      train_interpolation="bicubic",  # 'random' (bilinear or bicubic per image), 'bicubic', 'bilinear'
      # Random resized crops of at most this many pixels a side travel on a canvas of this size
      # and are resized on the device (augment/resize.py: the host only decodes them); larger
      # ones are resized on the host. 0: every resize on the host. 512 holds every crop of a
      # photo of up to 512 px (most of ImageNet) at 786 KB per image instead of 150 KB at 224.
      device_resize_canvas=512,
      # Evaluation: 'center' resizes the shorter side to eval_resize, then center-crops
      # image_size (torchvision's Resize + CenterCrop); 'resize' squashes to image_size.
      eval_resize=248, eval_crop="center", eval_interpolation="bicubic"))


def host_cores() -> int:
  """The cores this process may run on: the host pipeline runs one map call on each."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def train_canvas(data: ml_collections.ConfigDict) -> int:
  """The canvas side train crops travel on, to be resized on the device; 0 when the host resizes
  them (no canvas, or a train crop other than random resized)."""
  return data.device_resize_canvas if data.train_crop == "random_resized" else 0


# --- Checks ----------------------------------------------------------------------------------------
# The rules the whole config validator (train/configlib.py) is built from; the data part lives here
# so that the pipeline can check a data config without importing the trainer.


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  raise ValueError(f"config.{field}={value!r} is invalid: {allowed}.")


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(value: Any, field: str, options: Sequence[Any]) -> None:
  if value not in options:
    fail(field, value, "use one of " + ", ".join(map(repr, options)))


def validate_data(data: ml_collections.ConfigDict, prefix: str = "data") -> None:
  """Refuse a data config that cannot work, naming the field and what is allowed.

  Needs no data: whether the dataset exists and the folder is usable is checked by
  ``data.sources.dataset_info``.
  """
  for field in ("name", "train_split", "eval_split"):
    if not (isinstance(data[field], str) and data[field]):
      fail(f"{prefix}.{field}", data[field], "use a non-empty string")
  if data.data_dir is not None and not isinstance(data.data_dir, str):
    fail(f"{prefix}.data_dir", data.data_dir, "use a path, or leave it unset for the TFDS default")
  if data.name == "folder" and not data.data_dir:
    fail(f"{prefix}.data_dir", data.data_dir, "data.name='folder' needs the root folder that "
         "holds train/<class>/ and val/<class>/")
  for field in ("image_size", "shuffle_buffer", "mock_num_examples"):
    if not (is_int(data[field]) and data[field] > 0):
      fail(f"{prefix}.{field}", data[field], "it must be a positive integer")
  if not (is_int(data.pad) and data.pad >= 0):
    fail(f"{prefix}.pad", data.pad, "use an integer >= 0")
  if not isinstance(data.mock, bool):
    fail(f"{prefix}.mock", data.mock, "use True or False")
  if not (is_int(data.eval_resize) and data.eval_resize >= data.image_size):
    fail(f"{prefix}.eval_resize", data.eval_resize,
         f"use an integer >= data.image_size={data.image_size} (the eval center crop)")
  canvas = data.device_resize_canvas
  if not (is_int(canvas) and (canvas == 0 or canvas >= data.image_size)):
    fail(f"{prefix}.device_resize_canvas", canvas, f"use 0 (resize on the host) or an integer >= "
         f"data.image_size={data.image_size} (the largest crop side resized on the device)")
  check_choice(data.train_crop, f"{prefix}.train_crop", TRAIN_CROPS)
  check_choice(data.train_interpolation, f"{prefix}.train_interpolation", INTERPOLATIONS)
  check_choice(data.eval_crop, f"{prefix}.eval_crop", EVAL_CROPS)
  check_choice(data.eval_interpolation, f"{prefix}.eval_interpolation", EVAL_INTERPOLATIONS)


# --- The eval-preprocessing record -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
  """How an image becomes a model input at evaluation: the one description of it.

  Written into every checkpoint's metadata from the config that trained it (or, for official
  weights, from the official recipe), and read back by ``evaluate`` and ``predict``.
  """

  image_size: int
  resize: int  # 'center': the shorter side is resized to this, then image_size is cropped
  crop: str = "center"  # one of EVAL_CROPS
  interpolation: str = "bicubic"  # one of EVAL_INTERPOLATIONS
  mean: tuple[float, float, float] = IMAGENET_MEAN  # for pixels in 0..1; applied on the device
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    check_choice(self.crop, "preprocessing.crop", EVAL_CROPS)
    check_choice(self.interpolation, "preprocessing.interpolation", EVAL_INTERPOLATIONS)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EvalPreprocessing":
    """The record of a whole run's config: the data config's eval fields and its mean/std."""
    return cls.from_data(config.data, config.mean, config.std)

  @classmethod
  def from_data(cls, data: ml_collections.ConfigDict, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> "EvalPreprocessing":
    return cls(image_size=data.image_size, resize=data.eval_resize, crop=data.eval_crop,
               interpolation=data.eval_interpolation, mean=tuple(mean), std=tuple(std))

  @classmethod
  def from_dict(cls, record: Mapping[str, Any]) -> "EvalPreprocessing":
    """From checkpoint metadata; fields that older checkpoints lack take today's defaults."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in record.items() if k in fields}
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def apply_to(self, data: ml_collections.ConfigDict) -> None:
    """Set the eval fields of a data config to this record (the mean/std live on the config)."""
    data.image_size, data.eval_resize = self.image_size, self.resize
    data.eval_crop, data.eval_interpolation = self.crop, self.interpolation


def digits_splits() -> tuple[tuple, tuple]:
  """scikit-learn's 1,797 digits as ((train images, labels), (held-out images, labels)): uint8
  RGB 8x8, split 80/20, stratified with a fixed seed (the quickstart's data, no TensorFlow)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  data = datasets.load_digits()
  images = np.repeat(np.round(data.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
  labels = data.target.astype(np.int32)
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=0.2, stratify=data.target, random_state=0)
  return (images[train], labels[train]), (images[test], labels[test])
