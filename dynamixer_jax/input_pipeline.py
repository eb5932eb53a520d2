"""Host-side input pipeline: a dataset -> host-local numpy batches of uint8 images and int32 labels.

Sources: any prepared TFDS image-classification set (streamed from its files), scikit-learn's
``digits``, a local image ``folder``, and ``tfds.testing.mock_data`` (``data.mock``). The last three
are held in memory and read by index. Normalisation happens later, on the device.

Every random choice is stateless, keyed by (seed, epoch, example index), so a run resumed at
``start_step`` yields exactly the batches an uninterrupted run would have.

Image folders may hold bad files. Grayscale, palette, RGBA, CMYK and 16-bit images decode to uint8
RGB. Unreadable files (empty, truncated, not an image) are found when the folder is listed and
left out with a warning (``_readable``); a file that passes that check but still fails to decode
during the run is replaced by the next readable file of the listing, and masked out in eval
(``_skipping_unreadable``), so a bad file never stops training.
"""

import concurrent.futures
import dataclasses
import difflib
import functools
import itertools
import math
import os
import time
from typing import Callable, Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from dynamixer_jax import augment
# Re-exported: the data defaults and the train crops live in the TF-free config schema.
from dynamixer_jax.configlib import EVAL_CROPS, TRAIN_CROPS, default_data_config

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
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


# --- Sources -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Examples:
  """An in-memory split: uint8 pixels (N, H, W, 3), encoded image bytes, or file paths."""
  images: np.ndarray
  labels: np.ndarray
  kind: str  # "pixels" | "encoded" | "paths"

  def loader(self, source: Optional[np.ndarray] = None):
    """A tf function index -> (uint8 image, int32 label, bool), with the tables captured once.

    ``source[i]`` is the example read for index i: i itself, or a replacement when file i turned
    out unreadable; the bool says whether index i was read as itself.
    """
    images, labels = tf.constant(self.images), tf.constant(self.labels, tf.int32)
    sources = None if source is None else tf.constant(source, tf.int64)
    def load(index):
      read = index if sources is None else tf.gather(sources, index)
      image = tf.gather(images, read)
      if self.kind == "paths":
        image = tf.io.read_file(image)
      if self.kind != "pixels":
        image = decode_image(image)
      return image, tf.gather(labels, read), tf.equal(read, index)
    return load


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[_Examples, _Examples]:
  """scikit-learn's 1,797 digits as RGB uint8, split 80/20, stratified with a fixed seed."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=0)
  labels = digits.target.astype(np.int32)
  return tuple(_Examples(images[i], labels[i], "pixels") for i in (train, test))


@functools.lru_cache(maxsize=None)
def _mock_examples(name: str, num_examples: int) -> _Examples:
  """``tfds.testing.mock_data``'s examples (deterministic, equal for every split), in memory.

  Generated here rather than under a caller's patch, so a trainer in a child process gets them too.
  """
  with tfds.testing.mock_data(num_examples=num_examples):
    ds = tfds.builder(name).as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    examples = list(ds.as_numpy_iterator())
  images = np.array([ex["image"] for ex in examples], dtype=object)
  labels = np.array([ex["label"] for ex in examples], np.int32)
  return _Examples(images, labels, "encoded")


def _folder_classes(root: str) -> tuple[str, ...]:
  """Class names: the sorted subfolders of ``root/train``, after checking the layout."""
  if not root:
    raise ValueError("data.name='folder' needs data.data_dir: the root of train/<class>/ and "
                     "val/<class>/.")
  for sub in ("train", "val"):
    if not os.path.isdir(os.path.join(root, sub)):
      raise ValueError(f"Image folder {root!r} has no {sub}/ subfolder. Expected "
                       f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg.")
  classes = tuple(sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir()))
  if not classes:
    raise ValueError(f"{root}/train/ has no class subfolders; put images in {root}/train/<class>/.")
  return classes


def _folder_examples(root: str, sub: str) -> _Examples:
  """Paths and labels of the readable ``root/sub/<class>/*``, sorted so the order never depends
  on the disk."""
  classes = _folder_classes(root)
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
  readable = _readable(tuple(paths), os.path.join(root, sub))
  for label in np.setdiff1d(labels, labels[readable]):
    raise ValueError(f"Class folder {os.path.join(root, sub, classes[label])} has no readable "
                     "images (see the warning above); replace them or remove the folder.")
  return _Examples(np.array(paths)[readable], labels[readable], "paths")


# --- Unreadable images ---------------------------------------------------------------------------

# The check reads two small pieces of each file: threads overlap the reads of a cold disk.
_CHECK_THREADS = 16


def _looks_complete(path: str) -> bool:
  """A known image signature at the start and that format's end marker at the end.

  Reads at most 1 KB at each end, so every file of an ImageNet-size folder can be checked at
  startup, where a full decode would cost over an hour of CPU time: ~80,000 files/s from a warm
  page cache on a 2-core machine (1.28M files in ~16 s); from a cold disk the reads dominate and
  the threads overlap them (not measured). Truncation, the commonest damage, and non-images are
  caught; damage inside the image data is left to the decoder (``_skipping_unreadable``).
  """
  try:
    with open(path, "rb") as f:
      head = f.read(16)
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - 1024))
      tail = f.read()
  except OSError:
    return False
  if head.startswith(b"\xff\xd8\xff"):  # JPEG: the EOI marker, maybe followed by zero padding
    return tail.rstrip(b"\0").endswith(b"\xff\xd9")
  if head.startswith(b"\x89PNG\r\n\x1a\n"):  # PNG: the IEND chunk
    return tail.endswith(b"IEND\xaeB`\x82")
  if head[:6] in (b"GIF87a", b"GIF89a"):  # GIF: the trailer byte
    return tail.endswith(b";")
  if head.startswith(b"BM"):  # BMP and WebP: the file size their header declares
    return int.from_bytes(head[2:6], "little") <= size
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return int.from_bytes(head[4:8], "little") + 8 <= size
  return False


def _decodes(path: str) -> bool:
  """The authority: TensorFlow's full decode, as the pipeline runs it."""
  try:
    decode_image(tf.io.read_file(path))
    return True
  except tf.errors.OpError:
    return False


@functools.lru_cache(maxsize=4)
def _readable(paths: tuple[str, ...], where: str) -> np.ndarray:
  """Which files can be read: ``_looks_complete``, or, where that says no (data after the end
  marker, a format it does not know), a full decode. Unreadable files are counted in a warning
  that names the first ten.

  Cached per listing: the dataset info, the train and the eval pipelines share one pass.
  """
  start = time.time()
  check = lambda chunk: [_looks_complete(p) or _decodes(p) for p in chunk]
  chunks = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    ok = np.fromiter(itertools.chain.from_iterable(pool.map(check, chunks)), bool, len(paths))
  logging.info("Checked the %d images of %s in %.1f s.", len(paths), where, time.time() - start)
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.warning("Skipping %d of the %d images of %s: they cannot be read (empty, truncated, "
                    "or not a JPEG/PNG/GIF/BMP/WebP image): %s%s", len(bad), len(paths), where,
                    ", ".join(bad[:10]), ", ..." if len(bad) > 10 else "")
  ok.setflags(write=False)
  return ok


class _Replacements:
  """Files of a folder split found unreadable during the run; each is read as the next readable
  file of the listing instead.

  The replacement depends only on which files are unreadable, so a resumed run, which meets the
  same files, yields the same batches.
  """

  def __init__(self, examples: _Examples):
    self.paths = examples.images
    self.bad = np.zeros(len(self.paths), bool)
    self.source = np.arange(len(self.paths), dtype=np.int64)

  def mark_unreadable(self, rows: np.ndarray) -> list[str]:
    """Decode the files read for ``rows``; mark those that fail and return their paths."""
    found = sorted({int(j) for j in self.source[rows] if not _decodes(self.paths[j])})
    if found:
      self.bad[found] = True
      good = np.flatnonzero(~self.bad)
      if not good.size:
        raise ValueError("No image of the split can be read; check the folder.")
      self.source = good[np.searchsorted(good, np.arange(len(self.bad))) % good.size]
    return [str(self.paths[j]) for j in found]


def _skipping_unreadable(make: Callable[[int, np.ndarray], Iterator],
                         rows_of: Callable[[int], np.ndarray], start: int,
                         examples: _Examples) -> Iterator[dict[str, np.ndarray]]:
  """The batches of ``make(batch index, source)`` from ``start`` on. When one fails to load, the
  unreadable files among its rows (``rows_of``) are marked and logged, and the pipeline is built
  again from that batch with replacements for them."""
  replacements, position = _Replacements(examples), start
  while True:
    try:
      for batch in make(position, replacements.source):
        yield batch
        position += 1
      return
    except tf.errors.OpError:
      found = replacements.mark_unreadable(rows_of(position))
      if not found:
        raise
      logging.warning("Batch %d: %d image(s) passed the startup check but cannot be decoded: %s. "
                      "Reading the next readable file of the folder in place of each (%d so far).",
                      position, len(found), ", ".join(found), int(replacements.bad.sum()))


def _in_memory(data: ml_collections.ConfigDict, train: bool) -> Optional[_Examples]:
  """The in-memory split for digits, folder and mock data; None for a streamed TFDS set."""
  if data.name == "digits":
    return _digits()[0 if train else 1]
  if data.name == "folder":
    return _folder_examples(data.data_dir, "train" if train else "val")
  if data.mock:
    _tfds_builder(data)  # Checks the name.
    return _mock_examples(data.name, data.mock_num_examples)
  return None


def _tfds_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
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


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a split (slices like 'train[:50%]' too), or an error naming the valid splits."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f"Split {split!r} of {builder.name!r} is invalid ({e}); available splits: "
                     f"{list(builder.info.splits)}.") from None


def dataset_info(data: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes and split sizes; fails early, before anything compiles, if the data is not usable."""
  _check_config(data)
  if data.name == "digits":
    train, test = _digits()
    return DatasetInfo(10, len(train.labels), len(test.labels), tuple(str(i) for i in range(10)))
  if data.name == "folder":
    classes = _folder_classes(data.data_dir)
    sizes = [len(_folder_examples(data.data_dir, sub).labels) for sub in ("train", "val")]
    return DatasetInfo(len(classes), *sizes, classes)
  builder = _tfds_builder(data)
  label = builder.info.features["label"]
  if data.mock:
    sizes = [data.mock_num_examples] * 2
  else:
    sizes = [_split_size(builder, s) for s in (data.train_split, data.eval_split)]
  return DatasetInfo(label.num_classes, *sizes, tuple(label.names))


def _check_config(data: ml_collections.ConfigDict) -> None:
  """Settings that would otherwise fail deep inside tf.data, with an unreadable message."""
  if data.train_crop not in TRAIN_CROPS:
    raise ValueError(f"data.train_crop={data.train_crop!r} is not one of {TRAIN_CROPS}.")
  augment.parse_policy(data.randaugment)  # A malformed policy string fails here.
  if data.train_interpolation not in augment.INTERPOLATIONS:
    raise ValueError(f"data.train_interpolation={data.train_interpolation!r} is not one of "
                     f"{augment.INTERPOLATIONS}.")
  if data.eval_crop not in EVAL_CROPS:
    raise ValueError(f"data.eval_crop={data.eval_crop!r}: use 'center' (resize the shorter side "
                     "to eval_resize, center crop) or 'resize' (squash to image_size).")
  if data.eval_resize < data.image_size:
    raise ValueError(f"data.eval_resize={data.eval_resize} is smaller than data.image_size="
                     f"{data.image_size}; the eval center crop needs eval_resize >= image_size.")


# --- Per-example preprocessing -------------------------------------------------------------------


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP -> uint8 (H, W, 3): grayscale is replicated, alpha dropped."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  """Bicubic, antialiased when shrinking (like PIL), rounded back to uint8."""
  image = tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def preprocess_train(image: tf.Tensor, key: tf.Tensor,
                     data: ml_collections.ConfigDict) -> tf.Tensor:
  """Random crop, horizontal flip, then RandAugment (timm's order) of one uint8 (H, W, 3) image.

  ``key`` is a stateless seed (int64, shape [2]) unique to (seed, epoch, example); all
  randomness comes from it.
  """
  crop_key, flip_key, aug_key, interp_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 4))
  size = data.image_size
  method = data.train_interpolation
  if data.train_crop == "random_resized":
    shape = tf.shape(image)
    top, left, h, w = augment.random_resized_crop_box(crop_key, shape[0], shape[1], RRC_SCALE,
                                                      RRC_RATIO)
    image = augment.resize(image[top:top + h, left:left + w], size, size, method, interp_key)
  else:
    image = augment.resize(image, size, size, method, interp_key)
    image = tf.pad(image, [[data.pad, data.pad], [data.pad, data.pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_key)
  if data.hflip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
  policy = augment.parse_policy(data.randaugment)
  if policy is not None:
    image = augment.rand_augment(tf.ensure_shape(image, [size, size, 3]), aug_key, policy)
  return tf.ensure_shape(image, [size, size, 3])


def preprocess_eval(image: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize the shorter side to ``eval_resize``, then center-crop ``image_size``; or, with
  ``eval_crop='resize'`` (the official CIFAR transfer script), resize straight to the size."""
  size = data.image_size
  if data.eval_crop == "resize":
    return tf.ensure_shape(_resize(image, size, size), [size, size, 3])
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  hw = tf.maximum(tf.cast(tf.round(hw * data.eval_resize / tf.reduce_min(hw)), tf.int32), size)
  image = _resize(image, hw[0], hw[1])
  top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
  return tf.ensure_shape(tf.slice(image, [top, left, 0], [size, size, 3]), [size, size, 3])


# --- Batches -------------------------------------------------------------------------------------


def _options() -> tf.data.Options:
  """Deterministic order (the resume guarantee rests on it); one thread per op, many ops at once."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return options


def _example_key(seed: int, epoch, index) -> tf.Tensor:
  """The stateless seed of one example's augmentation in one epoch."""
  key = tf.constant([seed, 0], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def _check_batching(batch_size: int, process_index: int, process_count: int,
                    start_step: int = 0) -> None:
  if batch_size < 1 or start_step < 0 or not 0 <= process_index < process_count:
    raise ValueError(f"Need batch_size >= 1, start_step >= 0 and 0 <= process_index < "
                     f"process_count; got {batch_size=}, {start_step=}, {process_index=}, "
                     f"{process_count=}.")


def train_batches(data: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process train batches {'image': uint8 (B, S, S, 3), 'label': int32 (B,)}.

  Batch ``start_step`` onwards equals what an uninterrupted run yields from that step on.
  """
  _check_config(data)
  _check_batching(batch_size, process_index, process_count, start_step)
  examples = _in_memory(data, train=True)
  if examples is None:
    return _stream_train(data, batch_size, seed, start_step, process_index, process_count)
  num, global_batch = len(examples.labels), batch_size * process_count
  steps_per_epoch = num // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f"The global batch {global_batch} exceeds the {num} train examples; "
                     "use a smaller batch.")

  def epoch_order(epoch):
    # One permutation per epoch; step s takes its global batch from perm[s*G:(s+1)*G], and
    # process i its i-th slice, so the global batch does not depend on the process count.
    order_key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), epoch)
    perm = tf.random.experimental.stateless_shuffle(tf.range(num, dtype=tf.int64), seed=order_key)
    perm = tf.reshape(perm[:steps_per_epoch * global_batch],
                      [steps_per_epoch, process_count, batch_size])
    return tf.reshape(perm[:, process_index], [-1])

  def batches_from(step, source=None):
    load = examples.loader(source)

    def epoch_indices(epoch):
      indices = epoch_order(epoch)
      return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(indices), epoch), indices))

    def example(epoch, index):
      image, label, _ = load(index)
      image = preprocess_train(image, _example_key(seed, epoch, index), data)
      return {"image": image, "label": label}

    start_epoch, skip = divmod(step, steps_per_epoch)
    endless = tf.data.Dataset.range(start_epoch, 2**62)
    ds = endless.flat_map(epoch_indices).skip(skip * batch_size)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()

  if examples.kind != "paths":
    return batches_from(start_step)

  def rows_of(step):
    epoch, offset = divmod(step, steps_per_epoch)
    return epoch_order(tf.constant(epoch, tf.int64)).numpy()[
        offset * batch_size:(offset + 1) * batch_size]

  return _skipping_unreadable(batches_from, rows_of, start_step, examples)


def _stream_train(data, batch_size, seed, start_step, process_index, process_count):
  """Train batches streamed from TFDS files: a pipeline per epoch, its shuffles seeded by it."""
  builder = _tfds_builder(data)
  split = tfds.even_splits(data.train_split, n=process_count, drop_remainder=True)[process_index]
  num = _split_size(builder, split)
  steps_per_epoch = num // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {num} train examples of process "
                     f"{process_index}; use a smaller batch.")

  def example(epoch, index, ex):
    key = _example_key(seed, epoch, process_index * num + index)  # Unique over processes too.
    image = preprocess_train(decode_image(ex["image"]), key, data)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  def epochs() -> Iterator[dict[str, np.ndarray]]:
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      epoch_seed = int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])
      ds = builder.as_dataset(
          split=split, shuffle_files=True, decoders={"image": tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(shuffle_seed=epoch_seed, options=_options()))
      ds = ds.shuffle(data.shuffle_buffer, seed=epoch_seed).take(steps_per_epoch * batch_size)
      ds = ds.enumerate().skip(skip * batch_size)  # Skip before decoding: resuming is cheap.
      ds = ds.map(functools.partial(example, epoch), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
      ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
      yield from ds.with_options(_options()).as_numpy_iterator()
      epoch, skip = epoch + 1, 0

  return epochs()


def eval_batches(data: ml_collections.ConfigDict, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split, each example counted once across processes via 'mask'.

  Every batch has ``batch_size`` rows and every process yields the same number of batches
  (padding rows, and whole padding batches, have mask False), as multi-host steps need.
  """
  _check_config(data)
  _check_batching(batch_size, process_index, process_count)
  examples = _in_memory(data, train=False)
  size = data.image_size

  def batches(ds, read, num_examples, num_rows):
    def example(item):
      image, label, readable = read(item)  # an unreadable file's row is masked out
      return {"image": preprocess_eval(image, data), "label": label, "mask": readable}

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int32),
               "mask": tf.constant(False)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_rows - num_examples))
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()

  if examples is None:
    builder = _tfds_builder(data)
    splits = tfds.even_splits(data.eval_split, n=process_count, drop_remainder=False)
    sizes = [_split_size(builder, s) for s in splits]
    ds = builder.as_dataset(split=splits[process_index], shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(options=_options()))
    read = lambda ex: (decode_image(ex["image"]), tf.cast(ex["label"], tf.int32),
                       tf.constant(True))
    num_rows = math.ceil(max(sizes) / batch_size) * batch_size
    return batches(ds, read, sizes[process_index], num_rows)

  shards = np.array_split(np.arange(len(examples.labels), dtype=np.int64), process_count)
  shard = shards[process_index]
  num_rows = math.ceil(max(map(len, shards)) / batch_size) * batch_size

  def batches_from(batch, source=None):
    rows = shard[batch * batch_size:]
    return batches(tf.data.Dataset.from_tensor_slices(rows), examples.loader(source), len(rows),
                   num_rows - batch * batch_size)

  if examples.kind != "paths":
    return batches_from(0)
  rows_of = lambda batch: shard[batch * batch_size:(batch + 1) * batch_size]
  return _skipping_unreadable(batches_from, rows_of, 0, examples)
