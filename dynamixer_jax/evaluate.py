"""``python -m dynamixer_jax.evaluate --checkpoint DIR --dataset NAME``: top-1/top-5 of weights.

Runs the trainer's own evaluation (``train.steps.evaluate`` over ``data.pipeline.eval_batches``
with ``train.steps.make_eval_step``): every example counted once, the last batch padded and
masked, preprocessed as the checkpoint's metadata says (its ``EvalPreprocessing`` record).
"""

import json
from typing import Any, Optional

from dynamixer_jax import cli, hugepages

PROG = "python -m dynamixer_jax.evaluate"


def data_config(metadata: dict[str, Any], dataset: str, data_dir: Optional[str] = None,
                split: str = "validation", mock: bool = False):
  """A run config for ``dataset`` with the checkpoint's eval preprocessing."""
  from dynamixer_jax.train import configlib  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.weights import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  config = configlib.base_config()
  prep = metadata_lib.eval_preprocessing(metadata)
  config.data.name, config.data.data_dir, config.data.mock = dataset, data_dir, mock
  config.data.eval_split = split
  prep.apply_to(config.data)
  config.mean, config.std = prep.mean, prep.std
  return config


def evaluate_checkpoint(checkpoint: str, dataset: str, *, data_dir: Optional[str] = None,
                        split: str = "validation", mock: bool = False, batch_size: int = 64,
                        use_ema: bool = True) -> dict[str, float]:
  """``{'top1', 'top5', 'loss', 'count'}`` of a checkpoint on a dataset split."""
  import jax  # pylint: disable=g-import-not-at-top
  from dynamixer_jax import weights  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.train import sharding, steps  # pylint: disable=g-import-not-at-top
  model, variables, metadata = weights.load(checkpoint, use_ema=use_ema)
  config = data_config(metadata, dataset, data_dir, split, mock)
  info = sources.dataset_info(config.data)
  if info.num_classes != metadata["num_classes"]:
    raise ValueError(f"{dataset!r} has {info.num_classes} classes but the checkpoint's head has "
                     f"{metadata['num_classes']}; evaluate on the dataset it was trained for, or "
                     "fine-tune it first (configs/cifar_finetune.py).")
  mesh = sharding.create_mesh({"data": -1})
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size  # a multiple of devices
  state = steps.TrainState(step=0, params=variables["params"], opt_state=None, ema_params=None)
  eval_step = jax.jit(steps.make_eval_step(model, config, info.num_classes))
  results = steps.evaluate(eval_step, state, pipeline.eval_batches(
      config.data, batch_size=sharding.per_process_batch(batch_size, mesh),
      process_index=jax.process_index(), process_count=jax.process_count()), mesh)
  return dict(top1=results["eval_top1"], top5=results["eval_top5"], loss=results["eval_loss"],
              count=results["eval_count"])


def build_parser():
  p = cli.parser("evaluate", "Top-1/top-5 accuracy of a checkpoint (train.py workdir, convert "
                 "output, official .pth or .npz) on a dataset, every example counted once.",
                 [f"{PROG} --checkpoint runs/cifar_finetune --dataset cifar100 --split test",
                  f"{PROG} --checkpoint weights/dynamixer_s --dataset imagenet2012 "
                  "--data_dir ~/tensorflow_datasets"])
  cli.add(p, "checkpoint", required=True, help="train.py workdir, convert output, .pth or .npz")
  cli.add(p, "dataset", required=True,
          help="a TFDS name (imagenet2012, cifar100, ...), 'digits' or 'folder'")
  cli.add(p, "data_dir", default=None, help="TFDS data_dir, or the image folder root")
  cli.add(p, "split", default="validation",
          help="the split to evaluate (default validation; CIFAR and digits have 'test', "
               "folders 'val'; 'train' evaluates the training split)")
  cli.add(p, "batch_size", type=cli.positive_int, default=64)
  cli.add(p, "mock", action="store_true", help="tfds mock data (smoke tests)")
  cli.add(p, "no_ema", dest="use_ema", action="store_false",
          help="evaluate the raw weights, not the EMA weights")
  cli.add(p, "json", action="store_true", help="print one JSON line only")
  return p


def main(argv: Optional[list[str]] = None) -> None:
  args = build_parser().parse_args(argv)
  results = evaluate_checkpoint(args.checkpoint, args.dataset, data_dir=args.data_dir,
                                split=args.split, mock=args.mock, batch_size=args.batch_size,
                                use_ema=args.use_ema)
  if args.json:
    print(json.dumps(results))
  else:
    print(f"{args.dataset} {args.split}: top-1 {100 * results['top1']:.2f} %  top-5 "
          f"{100 * results['top5']:.2f} %  loss {results['loss']:.4f}  "
          f"({int(results['count'])} images)")


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()
  cli.run(main, PROG)
