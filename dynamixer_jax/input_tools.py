r"""Look at and time the train input pipeline.

  python -m dynamixer_jax.input_tools throughput --config=configs/dynamixer_s.py --jpegs=300
  python -m dynamixer_jax.input_tools grid --config=configs/dynamixer_s.py --photos \
      --out=samples.png

``throughput`` reports host images/s of the tf.data train pipeline (the host's part: decode the
crop, and resize it unless ``data.device_resize_canvas`` leaves that to the device) on this
machine's cores, per core, and how many host cores an accelerator needs at a few rates.
``--jpegs=N`` times it on a folder of N ImageNet-sized JPEGs made from scikit-learn's two photos
by random crops and resizes (``--jpeg_dir`` keeps them for another run). ``grid`` draws a batch
after the device augmentation too (the crops' resize, flip, RandAugment, mixup / cutmix, random
erasing), denormalised. ``--photos`` uses the two photographs themselves (a
generated image folder), so the grid shows real images offline.
"""

import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from dynamixer_jax import hugepages, preprocessing

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 20, "throughput: batches to time (after 2 warm-up).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Host batch (the config's is for a pod).")
_OUT = flags.DEFINE_string("out", "samples.png", "grid: output PNG.")
_ROWS = flags.DEFINE_integer("rows", 4, "grid: rows of 8 images.")
_PHOTOS = flags.DEFINE_bool("photos", False, "grid/throughput: use scikit-learn's sample photos.")
_STEP = flags.DEFINE_integer("step", 0, "grid: the train step whose device augmentation to show.")
_JPEGS = flags.DEFINE_integer("jpegs", 0, "throughput: time on this many ImageNet-sized JPEGs.")
_JPEG_DIR = flags.DEFINE_string("jpeg_dir", "", "throughput: where the --jpegs folder is made "
                                "(reused if it exists; default: a temporary folder).")
# Sizes common in ImageNet (width x height); most photos there are 4:3 or 3:4 at about 500 px.
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (800, 600),
                  (333, 500), (500, 500))
flags.mark_flags_as_required(["config"])


def photo_folder(root: str, copies: int = 32) -> str:
  """An image folder (train/ and val/, 2 classes) of scikit-learn's two 427x640 photographs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  photos = datasets.load_sample_images()
  for split in ("train", "val"):
    for name, pixels in zip(("china", "flower"), photos.images):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(copies if split == "train" else 1):
        Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.jpg"), quality=95)
  return root


def jpeg_folder(root: str, count: int, seed: int = 0) -> str:
  """An image folder of ``count`` train JPEGs (2 classes, quality 90, 4:2:0 chroma as most
  photos) at ImageNet's common sizes, each a random crop of one of scikit-learn's two photos."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(root, "train")):
    return root
  photos = datasets.load_sample_images().images
  rng = np.random.default_rng(seed)
  for split, n in (("train", count), ("val", 2)):
    for i in range(n):
      label = i % 2
      photo = photos[label]
      h, w = photo.shape[:2]
      ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      size = IMAGENET_SIZES[int(rng.integers(len(IMAGENET_SIZES)))]
      image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BICUBIC)
      os.makedirs(os.path.join(root, split, f"class_{label}"), exist_ok=True)
      image.save(os.path.join(root, split, f"class_{label}", f"{i:05d}.jpg"), quality=90)
  return root


def throughput(config, batch_size: int, num_batches: int) -> float:
  """Host images/s of ``train_batches`` after two warm-up batches."""
  from dynamixer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.train_batches(config.data, batch_size=batch_size, seed=config.seed)
  for _ in range(2):
    next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch_size / (time.perf_counter() - start)


def augmented_batch(config, batch_size: int, step: int):
  """One train batch after the host pipeline and the device augmentation, as uint8 images."""
  import jax  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.augment import device  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  num_classes = sources.dataset_info(config.data).num_classes
  batch = next(pipeline.train_batches(config.data, batch_size=batch_size, seed=config.seed))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2), step)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.augment.chunk_size = min(config.augment.chunk_size, batch_size)
  images, targets = jax.jit(lambda k, b: device.augment_batch(
      k, device.train_size_images(b, config.data.image_size), b["label"], num_classes,
      config))(key, batch)
  images = np.asarray(images) * np.array(config.std) * 255 + np.array(config.mean) * 255
  return np.clip(np.round(images), 0, 255).astype(np.uint8), np.asarray(targets)


def save_grid(images: np.ndarray, path: str, columns: int = 8) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n, h, w, _ = images.shape
  rows, gap = -(-n // columns), 2
  canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
  # A 256-colour palette keeps the PNG small enough for a README; the look is unchanged.
  image = Image.fromarray(canvas).quantize(256, dither=Image.Dither.NONE)
  image.save(path, optimize=True)


def main(argv):
  if len(argv) != 2 or argv[1] not in ("throughput", "grid"):
    raise app.UsageError("Give one command: throughput or grid.")
  import dynamixer_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (TensorFlow, quietly)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    if _PHOTOS.value:
      with config.unlocked():
        config.data.name, config.data.data_dir = "folder", photo_folder(tmp)
    if _JPEGS.value:
      with config.unlocked():
        config.data.name = "folder"
        config.data.data_dir = jpeg_folder(_JPEG_DIR.value or tmp, _JPEGS.value)
    if argv[1] == "throughput":
      with config.unlocked():
        config.data.mock_num_examples = max(config.data.mock_num_examples, 4 * _BATCH_SIZE.value)
      rate = throughput(config, _BATCH_SIZE.value, _BATCHES.value)
      cores = preprocessing.host_cores()
      canvas = preprocessing.train_canvas(config.data)
      work = (f"decode the crop; resize on the device from a {canvas} px canvas" if canvas
              else "decode, crop, resize")
      print(f"{config.data.name}{' (mock)' if config.data.mock else ''} at "
            f"{config.data.image_size} px, train_crop={config.data.train_crop!r} (host: {work}): "
            f"{rate:.0f} host images/s on {cores} cores = {rate / cores:.0f} images/s per host "
            "core")
      print("host cores needed per accelerator at " + ", ".join(
          f"{n} img/s: {n / (rate / cores):.1f}" for n in (1000, 2000, 5000)))
    else:
      images, targets = augmented_batch(config, 8 * _ROWS.value, _STEP.value)
      save_grid(images, _OUT.value)
      print(f"Wrote {_OUT.value}: {len(images)} images; soft-target top-2 of the first row:")
      for t in targets[:8]:
        top = np.argsort(t)[::-1][:2]
        print("  " + ", ".join(f"class {k}: {t[k]:.2f}" for k in top))


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()
  app.run(main)
