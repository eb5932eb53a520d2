"""``python -m dynamixer_jax.convert SRC OUT``: official weights -> our checkpoint folder, and
``--to_torch CKPT OUT.pth``: our DynaMixer checkpoint -> an official PyTorch state dict."""

from typing import Optional

from dynamixer_jax import cli

PROG = "python -m dynamixer_jax.convert"


def build_parser():
  p = cli.parser("convert", "Official weights (DynaMixer .pth, MLP-Mixer .npz) -> our checkpoint "
                 "folder, or (--to_torch) our DynaMixer checkpoint -> an official PyTorch state "
                 "dict.", [f"{PROG} checkpoint.pth.tar weights/dynamixer_s",
                           f"{PROG} --to_torch runs/cifar_finetune dynamixer.pth"])
  p.add_argument("src", help="official .pth/.npz, or with --to_torch: our checkpoint "
                 "(train.py workdir, checkpoints folder, step folder or convert output)")
  p.add_argument("out", help="output folder (must not exist or be empty), or with --to_torch "
                 "the .pth file to write")
  cli.add(p, "to_torch", action="store_true",
          help="write a bare PyTorch state dict (torch.save of {key: tensor}) that the official "
               "VisionModel.load_state_dict accepts")
  cli.add(p, "num_classes", type=cli.positive_int, default=None,
          help="replace the head with a fresh one of this many classes")
  cli.add(p, "no_ema", dest="use_ema", action="store_false",
          help="take the raw weights even when EMA weights exist (default: EMA when present)")
  cli.add(p, "class_names", default=None,
          help="text file with one class name per line (default: the ImageNet names for "
               "1000-class weights, else none)")
  cli.add(p, "seed", type=int, default=0, help="seed of a fresh head")
  return p


def main(argv: Optional[list[str]] = None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)
  # Imported after parsing, so that --help and flag mistakes answer at once.
  from dynamixer_jax import models, weights  # pylint: disable=g-import-not-at-top
  from dynamixer_jax.weights import metadata as metadata_lib  # pylint: disable=g-import-not-at-top

  if args.to_torch:
    import numpy as np  # pylint: disable=g-import-not-at-top
    model, variables, _ = weights.load(args.src, use_ema=args.use_ema,
                                       num_classes=args.num_classes, seed=args.seed)
    if not isinstance(model, models.DynaMixer):
      raise ValueError(f"--to_torch exports DynaMixer weights; {args.src} holds a "
                       f"{type(model).__name__} (MLP-Mixer weights are already in the official "
                       "Flax layout: save variables['params'] with np.savez).")
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("--to_torch needs torch: pip install 'dynamixer-jax[torch]'.") from None
    state = {k: torch.from_numpy(np.array(v))
             for k, v in weights.to_torch_state_dict(variables).items()}
    torch.save(state, args.out)
    print(f"Wrote {len(state)} tensors of {metadata_lib.describe(model)} to {args.out} (a bare "
          "state dict: model.load_state_dict(torch.load(path)) in the official code).")
    return

  from dynamixer_jax.weights import store  # pylint: disable=g-import-not-at-top
  if not args.src.endswith(store.OFFICIAL_TORCH + store.OFFICIAL_NPZ):
    raise ValueError(f"SRC={args.src!r} is neither an official .pth (DynaMixer) nor a .npz "
                     "(MLP-Mixer); to export our checkpoint to PyTorch add --to_torch.")
  model, variables, metadata = weights.load(args.src, use_ema=args.use_ema,
                                            num_classes=args.num_classes, seed=args.seed)
  if args.class_names:
    with open(args.class_names) as f:
      names = [line.strip() for line in f if line.strip()]
    if len(names) != metadata["num_classes"]:
      raise ValueError(f"--class_names {args.class_names} has {len(names)} names but the model "
                       f"has {metadata['num_classes']} classes; give one name per class.")
    metadata["class_names"] = names
  step_dir = weights.save(args.out, variables, metadata)
  print(f"Wrote {metadata['description']} ({metadata['num_classes']} classes) to {step_dir}.")


if __name__ == "__main__":
  cli.run(main, PROG)
