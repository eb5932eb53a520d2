"""Times the official PyTorch DynaMixer from a user's local checkout; run in its own process.

``benchmark.py --torch-reference DIR`` starts this file as a script (not as a module of the
package, so neither JAX nor TensorFlow is imported beside torch, and JAX's GPU preallocation
cannot starve it). The model is built by the official ``dynamixer_s()``-style functions of
``DIR/models/configs/conf_dynamixer.py``; nothing of the official code is vendored here. The
result is one JSON object on the last line of stdout.

    python dynamixer_jax/torch_reference.py --dir DIR [--pythonpath P1:P2] --model dynamixer_s \
        --batch 8 --mode train --dtype float32 --steps 5 --repeats 3 [--compile]
"""

import argparse
import importlib
import json
import statistics
import sys
import time

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dir", required=True, help="a checkout of github.com/ziyuwwang/DynaMixer")
  p.add_argument("--pythonpath", default="", help="extra sys.path entries, ':'-separated, first")
  p.add_argument("--model", default="dynamixer_s")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--mode", choices=("train", "infer"), default="infer")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--drop-path-rate", type=float, default=0.1)
  p.add_argument("--compile", action="store_true", help="wrap the step in torch.compile")
  args = p.parse_args(argv)

  sys.path[:0] = [e for e in args.pythonpath.split(":") if e] + [args.dir]
  import torch  # pylint: disable=import-outside-toplevel
  try:
    conf = importlib.import_module("models.configs.conf_dynamixer")
  except ImportError as e:
    raise SystemExit(f"Could not import models.configs.conf_dynamixer from {args.dir}: {e}. "
                     "Pass a checkout of github.com/ziyuwwang/DynaMixer; the official code imports "
                     "timm, which needs torchvision: add a directory with a working timm via "
                     "--torch-pythonpath if yours does not import.") from e
  if not hasattr(conf, args.model):
    raise SystemExit(f"{args.dir}/models/configs/conf_dynamixer.py has no {args.model}().")

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  train = args.mode == "train"
  model = getattr(conf, args.model)(num_classes=args.num_classes, img_size=args.image_size,
                                    drop_path_rate=args.drop_path_rate if train else 0.0)
  model = model.to(device).train(train)
  mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
  std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
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
    logits = forward(x)
    loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  if args.compile:
    forward = torch.compile(forward)
    step_body = torch.compile(train_step)
  else:
    step_body = train_step

  def step():
    if train:
      return step_body(images, labels)
    with torch.inference_mode():
      return forward(images)

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
  peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
  result = dict(
      framework="torch", torch_version=torch.__version__, compiled=args.compile,
      device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
      threads=torch.get_num_threads(), model=args.model, mode=args.mode, dtype=args.dtype,
      batch=args.batch, images_per_s=statistics.median(rates), images_per_s_min=min(rates),
      images_per_s_max=max(rates), step_time_s=statistics.median(times),
      first_step_s=first_step_s, peak_memory_bytes=peak)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
