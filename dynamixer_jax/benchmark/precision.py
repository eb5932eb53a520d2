"""Where bfloat16 loses accuracy in a DynaMixer: the shipped mixed precision against variants.

    python -m dynamixer_jax.benchmark.precision --checkpoint runs/quickstart

A DynaMixer trained on the digits (the quickstart) is evaluated on the 360 held-out digits in
float32, in bfloat16 as shipped (bf16 compute; float32 parameters, LayerNorm statistics, both
softmaxes and the logits), and in variants that move one piece to the other precision: the
``generate`` layer (the L x L mixing logits) in float32, the mixing softmax in bfloat16, the
three-way reweighting softmax in bfloat16, the LayerNorm statistics in bfloat16. Each row: top-1,
agreement of the top-1 with float32, and the mean logit error relative to float32's logit scale.
Analysis only: the variants patch the model module for the duration of one evaluation.
"""

import argparse
import contextlib
from typing import Callable, Optional
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dynamixer_jax import cli, preprocessing, weights
from dynamixer_jax.models import dynamixer
from dynamixer_jax.train import steps

PROG = "python -m dynamixer_jax.benchmark.precision"
_softmax = jax.nn.softmax
_dense, _layer_norm = dynamixer._dense, dynamixer._layer_norm  # pylint: disable=protected-access


def _softmax_in_bf16(which: str) -> Callable:
  """jax.nn.softmax computed on bf16 inputs for the mixing (last axis L) or reweighting (3)."""
  def softmax(x, axis=-1, **kwargs):
    if (x.shape[-1] == 3) == (which == "reweight"):
      return _softmax(x.astype(jnp.bfloat16), axis=axis, **kwargs).astype(x.dtype)
    return _softmax(x, axis=axis, **kwargs)
  return softmax


def _generate_in_f32(features, dtype, name, use_bias=True):
  return _dense(features, jnp.float32 if name == "generate" else dtype, name, use_bias)


def _layer_norm_bf16_statistics(dtype, name, x):
  norm = dynamixer.nn.LayerNorm(epsilon=dynamixer.LAYER_NORM_EPS, use_fast_variance=False,
                                dtype=dtype, name=name, force_float32_reductions=False)
  return dynamixer._per_token(norm, x)  # pylint: disable=protected-access


VARIANTS = {
    "float32": (jnp.float32, contextlib.nullcontext),
    "bfloat16 as shipped": (jnp.bfloat16, contextlib.nullcontext),
    "bf16, generate layer in float32": (
        jnp.bfloat16, lambda: mock.patch.object(dynamixer, "_dense", _generate_in_f32)),
    "bf16, mixing softmax in bf16": (
        jnp.bfloat16, lambda: mock.patch.object(jax.nn, "softmax", _softmax_in_bf16("mixing"))),
    "bf16, reweighting softmax in bf16": (
        jnp.bfloat16, lambda: mock.patch.object(jax.nn, "softmax", _softmax_in_bf16("reweight"))),
    "bf16, LayerNorm statistics in bf16": (
        jnp.bfloat16, lambda: mock.patch.object(dynamixer, "_layer_norm",
                                                _layer_norm_bf16_statistics)),
}


def held_out_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
  """The 360 held-out digits, resized to ``size`` with PIL's bicubic."""
  _, (images, labels) = preprocessing.digits_splits()
  resized = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BICUBIC))
                      for i in images])
  return resized, labels


def compare(checkpoint: str) -> list[dict]:
  model, variables, metadata = weights.load(checkpoint)
  prep = preprocessing.EvalPreprocessing.from_dict(metadata["preprocessing"])
  images, labels = held_out_digits(prep.image_size)
  x = steps.normalize(jnp.asarray(images), prep.mean, prep.std)
  rows, reference = [], None
  for name, (dtype, patch) in VARIANTS.items():
    with patch():
      logits = jax.jit(model.clone(dtype=dtype).apply)(variables, x)
      logits = np.asarray(logits, np.float32)
    if reference is None:
      reference = logits
    rows.append(dict(variant=name, top1=float(np.mean(logits.argmax(-1) == labels)),
                     agreement=float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
                     relative_error=float(np.abs(logits - reference).mean()
                                          / np.abs(reference).mean())))
  return rows


def build_parser() -> argparse.ArgumentParser:
  p = cli.parser("benchmark.precision", __doc__.splitlines()[0],
                 [f"{PROG} --checkpoint runs/quickstart"])
  cli.add(p, "checkpoint", required=True, help="a DynaMixer trained on the digits")
  return p


def main(argv: Optional[list[str]] = None) -> list[dict]:
  args = build_parser().parse_args(argv)
  rows = compare(args.checkpoint)
  print("| variant | held-out top-1 | top-1 agrees with float32 | mean logit error |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {100 * r['top1']:.2f} % | {100 * r['agreement']:.2f} % | "
          f"{100 * r['relative_error']:.2f} % |")
  return rows


if __name__ == "__main__":
  cli.run(main, PROG)
