"""Times the official PyTorch DynaMixer from a user's local checkout, in its own process.

``python -m dynamixer_jax.benchmark --torch_reference DIR`` starts this module in a subprocess,
so that neither JAX nor TensorFlow is imported beside torch and JAX's GPU preallocation cannot
starve it. The model is built by the official ``dynamixer_s()``-style functions of
``DIR/models/configs/conf_dynamixer.py``; nothing of the official code is vendored here. The
result is one JSON object on the last line of stdout.

    python -m dynamixer_jax.benchmark.torch_reference --dir DIR [--pythonpath P1:P2] \
        --model dynamixer_s --batch 8 --mode train --dtype float32 --steps 5 --repeats 3 [--compile]
"""

import argparse
import importlib
import json
import statistics
import sys
import time
from typing import Any, Callable

from dynamixer_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m dynamixer_jax.benchmark.torch_reference",
                              description=__doc__.splitlines()[0])
  p.add_argument("--dir", required=True, help="a checkout of github.com/ziyuwwang/DynaMixer")
  p.add_argument("--pythonpath", default="", help="extra sys.path entries, ':'-separated, first")
  p.add_argument("--model", default="dynamixer_s")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", "--image-size", type=int, default=224)
  p.add_argument("--num_classes", "--num-classes", type=int, default=1000)
  p.add_argument("--mode", choices=("train", "infer"), default="infer")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--drop_path_rate", "--drop-path-rate", type=float, default=0.1)
  p.add_argument("--compile", action="store_true", help="wrap the step in torch.compile")
  return p.parse_args(argv)


def official_model(args: argparse.Namespace):
  """The official model function of ``args.model`` from the checkout, built as timm would."""
  sys.path[:0] = [e for e in args.pythonpath.split(":") if e] + [args.dir]
  try:
    conf = importlib.import_module("models.configs.conf_dynamixer")
  except ImportError as e:
    raise SystemExit(f"Could not import models.configs.conf_dynamixer from {args.dir}: {e}. "
                     "Pass a checkout of github.com/ziyuwwang/DynaMixer; the official code imports "
                     "timm, which needs torchvision: add a directory with a working timm via "
                     "--pythonpath if yours does not import.") from e
  if not hasattr(conf, args.model):
    raise SystemExit(f"{args.dir}/models/configs/conf_dynamixer.py has no {args.model}().")
  train = args.mode == "train"
  return getattr(conf, args.model)(num_classes=args.num_classes, img_size=args.image_size,
                                   drop_path_rate=args.drop_path_rate if train else 0.0)


def make_step(model, args: argparse.Namespace, device) -> Callable[[], Any]:
  """One train step (AdamW, label smoothing, uint8 normalised on the device) or one forward."""
  import torch  # pylint: disable=import-outside-toplevel
  train = args.mode == "train"
  model = model.to(device).train(train)
  mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
  std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size),
                         dtype=torch.uint8, generator=gen).to(device)
  labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

  def forward(x):
    with autocast:
      return model((x.float() - mean) / std)

  def train_step(x, y):
    loss = loss_fn(forward(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  if args.compile:
    forward, train_step = torch.compile(forward), torch.compile(train_step)

  def step():
    if train:
      return train_step(images, labels)
    with torch.inference_mode():
      return forward(images)
  return step


def time_step(step: Callable[[], Any], sync: Callable[[], None],
              args: argparse.Namespace) -> tuple[float, list[float], list[float]]:
  """(first step seconds, images/s per repeat, seconds/step per repeat)."""
  start = time.perf_counter()
  step()
  sync()
  first_step_s = time.perf_counter() - start
  for _ in range(args.warmup):
    step()
  sync()
  rates, times = [], []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      step()
    sync()
    elapsed = time.perf_counter() - start
    times.append(elapsed / args.steps)
    rates.append(args.batch * args.steps / elapsed)
  return first_step_s, rates, times


def main(argv=None) -> dict:
  args = parse_args(argv)
  model = official_model(args)
  import torch  # pylint: disable=import-outside-toplevel
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  first_step_s, rates, times = time_step(make_step(model, args, device), sync, args)
  result = dict(
      framework="torch", torch_version=torch.__version__, compiled=args.compile,
      device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
      threads=torch.get_num_threads(), model=args.model, mode=args.mode, dtype=args.dtype,
      batch=args.batch, images_per_s=statistics.median(rates), images_per_s_min=min(rates),
      images_per_s_max=max(rates), step_time_s=statistics.median(times),
      first_step_s=first_step_s,
      peak_memory_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
