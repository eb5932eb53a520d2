"""``python -m dynamixer_jax.predict --checkpoint DIR image.jpg ...``: the top classes of images.

Any image Pillow opens (grayscale, palette, CMYK, RGBA, 16-bit) becomes 8-bit RGB, then gets the
eval preprocessing recorded in the checkpoint's metadata, exactly as ``evaluate`` applies it.
``--output results.json`` (or ``.csv``) keeps the predictions for scripts.
"""

import csv
import json
import os
from typing import Optional

import numpy as np

from dynamixer_jax import cli, hugepages

PROG = "python -m dynamixer_jax.predict"


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


def predict(checkpoint: str, paths: list[str], top_k: int = 5,
            use_ema: bool = True) -> list[list[tuple[str, float]]]:
  """For each image, its ``top_k`` (class name, probability) pairs, most likely first."""
  import jax  # pylint: disable=g-import-not-at-top
  import dynamixer_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (TensorFlow, quietly)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dynamixer_jax import weights  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.train import steps  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.weights import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  images = [read_rgb(p) for p in paths]  # unreadable files fail before the model loads
  model, variables, metadata = weights.load(checkpoint, use_ema=use_ema)
  if not 1 <= top_k <= metadata["num_classes"]:
    raise ValueError(f"--top_k {top_k}: the model has {metadata['num_classes']} classes; "
                     f"use 1 to {metadata['num_classes']}.")
  prep = metadata_lib.eval_preprocessing(metadata)
  batch = np.stack([transforms.preprocess_eval(tf.constant(i), prep).numpy() for i in images])
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, steps.normalize(
      x, prep.mean, prep.std), train=False).astype(np.float32)))
  probs = np.asarray(apply(variables, batch))
  names = metadata_lib.class_names(metadata)
  order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  return [[(names[i], float(p[i])) for i in row] for row, p in zip(order, probs)]


def write_output(path: str, paths: list[str], results: list[list[tuple[str, float]]]) -> None:
  """JSON (a list of {file, predictions: [{label, probability}]}) or CSV (file, rank, label,
  probability), chosen by the extension."""
  if path.endswith(".json"):
    with open(path, "w") as f:
      json.dump([{"file": p, "predictions": [{"label": n, "probability": q} for n, q in top]}
                 for p, top in zip(paths, results)], f, indent=2)
  elif path.endswith(".csv"):
    with open(path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["file", "rank", "label", "probability"])
      for p, top in zip(paths, results):
        writer.writerows([p, rank, n, f"{q:.6f}"] for rank, (n, q) in enumerate(top, 1))
  else:
    raise ValueError(f"--output {path!r}: give a .json or a .csv file name.")


def build_parser():
  p = cli.parser("predict", "The most likely classes, with probabilities, of image files.",
                 [f"{PROG} --checkpoint runs/cifar_finetune cat.jpg dog.png",
                  f"{PROG} --checkpoint weights/dynamixer_s --top_k 3 --output results.json "
                  "*.jpg"])
  cli.add(p, "checkpoint", required=True,
          help="train.py workdir, convert output, official .pth or .npz")
  p.add_argument("images", nargs="+", help="image files")
  cli.add(p, "top_k", type=cli.positive_int, default=5, help="classes per image (default 5)")
  cli.add(p, "output", default=None, metavar="FILE.json|FILE.csv",
          help="also write the predictions to this JSON or CSV file")
  cli.add(p, "no_ema", dest="use_ema", action="store_false",
          help="use the raw weights, not the EMA weights")
  return p


def main(argv: Optional[list[str]] = None) -> None:
  args = build_parser().parse_args(argv)
  missing = [p for p in args.images if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"No such image file(s): {', '.join(missing)}.")
  if args.output and not args.output.endswith((".json", ".csv")):
    raise ValueError(f"--output {args.output!r}: give a .json or a .csv file name.")
  results = predict(args.checkpoint, args.images, args.top_k, args.use_ema)
  for path, top in zip(args.images, results):
    print(path)
    for name, prob in top:
      print(f"  {100 * prob:6.2f} %  {name}")
  if args.output:
    write_output(args.output, args.images, results)
    print(f"Wrote {args.output}.")


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()
  cli.run(main, PROG)
