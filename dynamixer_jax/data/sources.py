"""Where examples come from: TFDS sets, scikit-learn's digits, image folders and mock data.

``dataset_info`` answers what the trainer needs before it builds the model (classes, split sizes)
and fails early, before anything compiles, when the data is not usable. Digits, folders and mock
data are held in memory and read by index (``Examples``); a prepared TFDS set is streamed from
its files by the pipeline.
"""

import dataclasses
import difflib
import functools
import os
from typing import Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dynamixer_jax import preprocessing
from dynamixer_jax.data import readable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMAGENET_INSTRUCTIONS = (
    "ImageNet cannot be downloaded automatically. Register at "
    "https://image-net.org/download-images, download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar into {root}/downloads/manual/ (the TFDS manual_dir), then run:\n"
    "  tfds build imagenet2012 --data_dir={root}\n"
    "(add --manual_dir=DIR if the tars live elsewhere). To test without it, set data.mock=True.")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know before it builds the model: classes and split sizes."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Examples:
  """An in-memory split: uint8 pixels (N, H, W, 3), encoded image bytes, or file paths."""
  images: np.ndarray
  labels: np.ndarray
  kind: str  # "pixels" | "encoded" | "paths"

  def loader(self, source: Optional[np.ndarray] = None):
    """A tf function index -> (image, int32 label, bool), with the tables captured once.

    The image is encoded bytes for "encoded" and "paths" (decoded later, so that a train crop
    can decode only its window) and uint8 pixels for "pixels". ``source[i]`` is the example read
    for index i: i itself, or a replacement when file i turned out unreadable; the bool says
    whether index i was read as itself.
    """
    images, labels = tf.constant(self.images), tf.constant(self.labels, tf.int32)
    sources = None if source is None else tf.constant(source, tf.int64)

    def load(index):
      read = index if sources is None else tf.gather(sources, index)
      image = tf.gather(images, read)
      if self.kind == "paths":
        image = tf.io.read_file(image)
      return image, tf.gather(labels, read), tf.equal(read, index)
    return load

  @property
  def encoded(self) -> bool:
    return self.kind != "pixels"


@functools.lru_cache(maxsize=None)
def digits() -> tuple[Examples, Examples]:
  """scikit-learn's 1,797 digits as RGB uint8, split 80/20 (``preprocessing.digits_splits``)."""
  return tuple(Examples(images, labels, "pixels")
               for images, labels in preprocessing.digits_splits())


@functools.lru_cache(maxsize=None)
def mock_examples(name: str, num_examples: int) -> Examples:
  """``tfds.testing.mock_data``'s examples (deterministic, equal for every split), in memory.

  Generated here rather than under a caller's patch, so a trainer in a child process gets them too.
  """
  with tfds.testing.mock_data(num_examples=num_examples):
    ds = tfds.builder(name).as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    examples = list(ds.as_numpy_iterator())
  images = np.array([ex["image"] for ex in examples], dtype=object)
  labels = np.array([ex["label"] for ex in examples], np.int32)
  return Examples(images, labels, "encoded")


def folder_classes(root: str) -> tuple[str, ...]:
  """Class names: the sorted subfolders of ``root/train``, after checking the layout."""
  for sub in ("train", "val"):
    if not os.path.isdir(os.path.join(root, sub)):
      raise ValueError(f"Image folder {root!r} has no {sub}/ subfolder. Expected "
                       f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg.")
  classes = tuple(sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir()))
  if not classes:
    raise ValueError(f"{root}/train/ has no class subfolders; put images in {root}/train/<class>/.")
  return classes


def folder_examples(root: str, sub: str) -> Examples:
  """Paths and labels of the readable ``root/sub/<class>/*``, sorted so the order never depends
  on the disk."""
  classes = folder_classes(root)
  paths, labels = [], []
  for class_dir in sorted(e.name for e in os.scandir(os.path.join(root, sub)) if e.is_dir()):
    if class_dir not in classes:
      raise ValueError(f"{root}/{sub}/{class_dir} is not a class of {root}/train/ "
                       f"({len(classes)} classes); rename or remove it.")
    folder = os.path.join(root, sub, class_dir)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f"Class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                       "add images or remove the folder.")
    paths += [os.path.join(folder, f) for f in files]
    labels += [classes.index(class_dir)] * len(files)
  labels = np.array(labels, np.int32)
  ok = readable.readable(tuple(paths), os.path.join(root, sub))
  for label in np.setdiff1d(labels, labels[ok]):
    raise ValueError(f"Class folder {os.path.join(root, sub, classes[label])} has no readable "
                     "images (see the warning above); replace them or remove the folder.")
  return Examples(np.array(paths)[ok], labels[ok], "paths")


# The splits of the in-memory sources, by the names a config may give them.
DIGITS_SPLITS = {"train": 0, "test": 1, "validation": 1}  # index into digits()
FOLDER_SPLITS = {"train": "train", "val": "val", "validation": "val"}  # subfolder


def in_memory(data: ml_collections.ConfigDict, train: bool) -> Optional[Examples]:
  """The in-memory split (``data.train_split`` or ``data.eval_split``) for digits, folder and
  mock data; None for a streamed TFDS set."""
  split = data.train_split if train else data.eval_split
  if data.name in ("digits", "folder"):
    splits = DIGITS_SPLITS if data.name == "digits" else FOLDER_SPLITS
    if split not in splits:
      field = "train_split" if train else "eval_split"
      raise ValueError(f"config.data.{field}={split!r}: data.name={data.name!r} has the splits "
                       f"{', '.join(map(repr, splits))}.")
    if data.name == "digits":
      return digits()[splits[split]]
    return folder_examples(data.data_dir, splits[split])
  if data.mock:
    tfds_builder(data)  # Checks the name.
    return mock_examples(data.name, data.mock_num_examples)
  return None


def tfds_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder, checked to be known, prepared on disk and an image classification set."""
  try:
    builder = tfds.builder(data.name, data_dir=data.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(data.name, tfds.list_builders(), n=3)
    raise ValueError(f"Unknown dataset config.data.name={data.name!r}. Use 'digits', 'folder', "
                     "or a TFDS image-classification name (e.g. cifar10, cifar100, imagenet2012; "
                     f"see tfds.list_builders()). Close matches: {close or 'none'}.") from None
  except (ValueError, AssertionError) as e:  # a config or version part of the name that is not
    raise ValueError(f"config.data.name={data.name!r} is invalid: {e}") from None
  features = builder.info.features
  features = dict(features.items()) if isinstance(features, tfds.features.FeaturesDict) else {}
  if not (isinstance(features.get("image"), tfds.features.Image)
          and isinstance(features.get("label"), tfds.features.ClassLabel)):
    raise ValueError(f"TFDS dataset {data.name!r} lacks an 'image' Image and a 'label' ClassLabel "
                     "feature; only image classification sets are supported.")
  if not data.mock and not builder.is_prepared():
    root = builder.data_dir_root
    if data.name.split("/")[0] == "imagenet2012":
      how = IMAGENET_INSTRUCTIONS.format(root=root)
    else:
      how = f"Prepare it on a machine with network: tfds build {data.name} --data_dir={root}"
      if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        how += (f"\nIt needs files downloaded by hand into {root}/downloads/manual/:\n"
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    raise FileNotFoundError(f"TFDS dataset {data.name!r} is not prepared under data_dir={root} "
                            f"(this pipeline never downloads). {how}")
  return builder


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a split (slices like 'train[:50%]' too), or an error naming the valid splits."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f"Split {split!r} of {builder.name!r} is invalid ({e}); available splits: "
                     f"{list(builder.info.splits)}.") from None


def dataset_info(data: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes and split sizes; fails early, before anything compiles, if the data is not usable."""
  check(data)
  if data.name in ("digits", "folder"):
    classes = (tuple(str(i) for i in range(10)) if data.name == "digits"
               else folder_classes(data.data_dir))
    sizes = [len(in_memory(data, train).labels) for train in (True, False)]
    return DatasetInfo(len(classes), *sizes, classes)
  builder = tfds_builder(data)
  label = builder.info.features["label"]
  if data.mock:
    sizes = [data.mock_num_examples] * 2
  else:
    sizes = [split_size(builder, s) for s in (data.train_split, data.eval_split)]
  return DatasetInfo(label.num_classes, *sizes, tuple(label.names))


def check(data: ml_collections.ConfigDict) -> None:
  """The data part of the config validator, for callers that use the pipeline without
  ``configlib.validate``."""
  preprocessing.validate_data(data)
