"""``python -m dynamixer_jax.predict --checkpoint DIR image.jpg ...``: the top-5 classes of images.

Any image Pillow opens (grayscale, palette, CMYK, RGBA, 16-bit) becomes 8-bit RGB, then gets the
evaluation preprocessing stored in the checkpoint's metadata, exactly as ``evaluate`` does.
"""

import argparse
import os
from typing import Any, Optional

import jax
import numpy as np

from dynamixer_jax import pretrained


def read_rgb(path: str) -> np.ndarray:
  """uint8 (H, W, 3) from any file Pillow reads; alpha is dropped, 16-bit scaled to 8-bit."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    image = Image.open(path)
    image.load()
  except (OSError, ValueError) as e:
    raise ValueError(f"Cannot read {path!r} as an image ({e}); give a JPEG, PNG, BMP, TIFF, "
                     "GIF or another format Pillow reads.") from None
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and wider grayscale
    pixels = np.asarray(image, np.float64)
    scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 1.0
    pixels = np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"), np.uint8)


def class_names(metadata: dict[str, Any]) -> list[str]:
  """The checkpoint's class names; ImageNet names for unnamed 1000-class weights; else indices."""
  names, count = list(metadata.get("class_names") or []), metadata["num_classes"]
  if len(names) == count:
    return names
  if count == 1000:
    return pretrained.imagenet_class_names()
  return [f"class {i}" for i in range(count)]


def predict(checkpoint: str, paths: list[str], top_k: int = 5,
            use_ema: bool = True) -> list[list[tuple[str, float]]]:
  """For each image, its ``top_k`` (class name, probability) pairs, most likely first."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dynamixer_jax import evaluate, input_pipeline, steps  # pylint: disable=g-import-not-at-top
  model, variables, metadata = pretrained.load(checkpoint, use_ema=use_ema)
  config = evaluate.data_config(metadata, "digits")
  images = np.stack([input_pipeline.preprocess_eval(tf.constant(read_rgb(p)), config.data).numpy()
                     for p in paths])
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, steps.normalize(
      x, config.mean, config.std), train=False).astype(np.float32)))
  probs = np.asarray(apply(variables, images))
  names = class_names(metadata)
  order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  return [[(names[i], float(p[i])) for i in row] for row, p in zip(order, probs)]


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m dynamixer_jax.predict",
      description="Top-5 classes with probabilities for image files.",
      epilog="Example: python -m dynamixer_jax.predict --checkpoint runs/cifar_finetune cat.jpg")
  parser.add_argument("--checkpoint", required=True,
                      help="train.py workdir, convert output, official .pth or .npz")
  parser.add_argument("images", nargs="+", help="image files")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                      help="use the raw weights, not the EMA weights")
  args = parser.parse_args(argv)
  missing = [p for p in args.images if not os.path.isfile(p)]
  if missing:
    parser.error(f"No such image file(s): {', '.join(missing)}.")
  for path, top in zip(args.images, predict(args.checkpoint, args.images, args.top_k,
                                            args.use_ema)):
    print(path)
    for name, prob in top:
      print(f"  {100 * prob:6.2f} %  {name}")


if __name__ == "__main__":
  main()
