"""``python -m dynamixer_jax.evaluate --checkpoint DIR --dataset NAME``: top-1/top-5 of weights.

Runs the trainer's own evaluation (``train_lib.evaluate`` over ``input_pipeline.eval_batches``
with ``steps.make_eval_step``): every example counted once, the last batch padded and masked,
preprocessed as the checkpoint's metadata says.
"""

import argparse
import json
from typing import Any, Optional

import jax
import ml_collections

from dynamixer_jax import configlib, pretrained


def data_config(metadata: dict[str, Any], dataset: str, data_dir: Optional[str] = None,
                split: str = "validation", mock: bool = False) -> ml_collections.ConfigDict:
  """The pipeline's data config for ``dataset`` with the checkpoint's eval preprocessing."""
  config = configlib.base_config()
  prep = metadata["preprocessing"]
  config.data.name, config.data.data_dir, config.data.mock = dataset, data_dir, mock
  config.data.eval_split = split
  config.data.image_size, config.data.eval_resize = prep["image_size"], prep["resize"]
  if "eval_crop" in config.data:  # 'center' | 'resize', where the pipeline has the option
    config.data.eval_crop = "resize" if prep.get("crop") == "resize" else "center"
  config.mean, config.std = tuple(prep["mean"]), tuple(prep["std"])
  return config


def evaluate_checkpoint(checkpoint: str, dataset: str, *, data_dir: Optional[str] = None,
                        split: str = "validation", mock: bool = False, batch_size: int = 64,
                        use_ema: bool = True) -> dict[str, float]:
  """``{'top1', 'top5', 'loss', 'count'}`` of a checkpoint on a dataset split."""
  from dynamixer_jax import input_pipeline, sharding, steps, train_lib  # pylint: disable=g-import-not-at-top
  model, variables, metadata = pretrained.load(checkpoint, use_ema=use_ema)
  config = data_config(metadata, dataset, data_dir, split, mock)
  config.eval_batch_size = batch_size
  info = input_pipeline.dataset_info(config.data)
  if info.num_classes != metadata["num_classes"]:
    raise ValueError(f"{dataset!r} has {info.num_classes} classes but the checkpoint's head has "
                     f"{metadata['num_classes']}; evaluate on the dataset it was trained for, or "
                     "fine-tune it first (configs/cifar_finetune.py).")
  config.mesh = dict(data=-1)
  mesh = sharding.mesh_from_config(config)
  local_batch = sharding.per_process_batch(batch_size, mesh, "batch_size")
  state = steps.TrainState(step=0, params=variables["params"], opt_state=None, ema_params=None)
  eval_step = jax.jit(steps.make_eval_step(model, config, info.num_classes))
  results = train_lib.evaluate(eval_step, state, input_pipeline.eval_batches(
      config.data, batch_size=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count()), mesh)
  return dict(top1=results["eval_top1"], top5=results["eval_top5"], loss=results["eval_loss"],
              count=results["eval_count"])


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m dynamixer_jax.evaluate",
      description="Top-1/top-5 accuracy of a checkpoint (train.py workdir, convert output, "
                  "official .pth or .npz) on a dataset, every example counted once.",
      epilog="Example: python -m dynamixer_jax.evaluate --checkpoint runs/cifar_finetune "
             "--dataset cifar100 --data_dir ~/tensorflow_datasets --split test")
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--dataset", required=True,
                      help="a TFDS name (imagenet2012, cifar100, ...), 'digits' or 'folder'")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir, or the image folder root")
  parser.add_argument("--split", default="validation",
                      help="eval split (default validation; CIFAR has 'test')")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--mock", action="store_true", help="tfds mock data (smoke tests)")
  parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                      help="evaluate the raw weights, not the EMA weights")
  parser.add_argument("--json", action="store_true", help="print one JSON line only")
  args = parser.parse_args(argv)
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
  main()
