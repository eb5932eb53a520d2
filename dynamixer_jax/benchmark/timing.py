"""Throughput of the real jitted train step (or the inference forward) on synthetic batches.

The train step is the one ``train.py`` runs (``train.steps.make_train_step`` with the optimizer of
``configlib.base_config()``: AdamW, label smoothing, drop path, EMA), fed uint8 images that it
normalises on the device. ``--torch_reference`` times the official PyTorch model from a local
checkout of github.com/ziyuwwang/DynaMixer in a subprocess (``torch_reference.py``) with the same
batch and dtype, and prints JAX/torch ratios. With ``--rounds R`` the two sides alternate: JAX
(compiled once), then each torch mode, R times over, so that a machine that speeds up or slows
down during the run moves both sides alike; the figures are medians over the rounds and each
round's ratio is printed.

MFU = 3 x forward FLOPs x images/s / peak (the train step is counted as 3 forwards; inference
as 1). The peak is ``--peak_tflops`` if given, else the datasheet bf16 peak of a known
accelerator (``hardware.py``), else (CPUs, unknown devices) the best rate of a square matmul in
the step's dtype measured after each round. The official model's FLOP rate is put against the
same peak: a side that already runs near it leaves the other little to gain, whatever its code.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynamixer_jax import cli, hugepages, preprocessing
from dynamixer_jax.augment import device
from dynamixer_jax.benchmark import flops, hardware
from dynamixer_jax.train import configlib, optim, sharding, steps

PROG = "python -m dynamixer_jax.benchmark"
# The train step (forward, backward, update) counted as 3 forwards; the augmentation has no
# model FLOPs.
FORWARDS_PER_STEP = {"train": 3, "infer": 1}
# A two-entry DynaMixer on 32 px images: every code path of the full model, in seconds.
TINY_OVERRIDES = dict(image_size=32, patch_size=4, num_classes=10, entries=[
    [1, 16, 2, 2, 3.0, True], [1, 32, 4, 2, 3.0, False]])


def build_parser() -> argparse.ArgumentParser:
  p = cli.parser("benchmark", "Images/s, step time, memory and MFU of the train step or the "
                 "inference forward, optionally beside the official PyTorch model.", [
                     f"{PROG} --model dynamixer_s --batch 8 --mode train --steps 2 --repeats 3",
                     f"{PROG} --model dynamixer_s --batch 8 --mode infer --torch_reference "
                     "/path/to/DynaMixer --torch_compile"])
  cli.add(p, "model", default="dynamixer_s")
  cli.add(p, "batch", type=cli.positive_int, default=8)
  cli.add(p, "mode", choices=("train", "infer", "augment"), default="train",
          help="the train step, the inference forward, or the train step's device augmentation "
               "alone (the crops' resize, flip, RandAugment, mixup/cutmix, erasing)")
  cli.add(p, "dtype", choices=("float32", "bfloat16"), default="float32")
  cli.add(p, "steps", type=cli.positive_int, default=5, help="timed steps per repeat")
  cli.add(p, "repeats", type=cli.positive_int, default=3)
  cli.add(p, "warmup", type=int, default=2, help="untimed steps after compiling")
  cli.add(p, "override", action="append", default=[], metavar="FIELD=JSON",
          help="a model argument, e.g. --override image_size=32 (repeatable)")
  cli.add(p, "tiny", action="store_true", help=f"apply {TINY_OVERRIDES}")
  cli.add(p, "no_device_augment", action="store_true",
          help="train without the device augmentation (the crop's resize, flip, RandAugment, "
               "mixup/cutmix, erasing), to time what it costs")
  cli.add(p, "grad_accum_steps", type=cli.positive_int, default=1,
          help="train as this many micro-batches per step (config.grad_accum_steps)")
  cli.add(p, "mesh", default="", metavar="AXIS=SIZE,...",
          help="shard as train.py does over a device mesh, e.g. data=8 or data=4,fsdp=2 "
               "(default: one device, no sharding)")
  cli.add(p, "peak_tflops", type=float, default=None,
          help="peak TFLOP/s for MFU (default: the datasheet bf16 peak of a known accelerator, "
               "else a matmul in the step's dtype measured in the run)")
  cli.add(p, "suite", action="store_true",
          help="the one-shot device check (suite.py): S/M/L and Mixer-B/16, train and infer, "
               "bfloat16, memory levers, a 200-step run on real data; one markdown table")
  cli.add(p, "budget_s", type=float, default=480, metavar="SECONDS",
          help="--suite: parts that would start later than this are listed as not run")
  cli.add(p, "json", default=None, metavar="PATH", help="write every field here")
  cli.add(p, "torch_reference", default=None, metavar="DIR",
          help="a local checkout of github.com/ziyuwwang/DynaMixer to compare with")
  cli.add(p, "torch_pythonpath", default="", metavar="P1:P2",
          help="extra sys.path entries for the torch run (e.g. a timm that imports)")
  cli.add(p, "torch_compile", action="store_true", help="also time torch.compile")
  cli.add(p, "rounds", type=cli.positive_int, default=1,
          help="alternate JAX and the torch reference this many times (each round: --repeats "
               "repeats of each side); figures are medians over rounds")
  return p


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
  overrides = dict(TINY_OVERRIDES) if args.tiny else {}
  for item in args.override:
    field, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--override {item!r}: write FIELD=VALUE, e.g. image_size=32.")
    try:
      overrides[field] = json.loads(value)
    except json.JSONDecodeError:
      overrides[field] = value  # a bare string
  return overrides


def parse_mesh(text: str) -> dict[str, int]:
  try:
    return {axis: int(size) for axis, size in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise ValueError(f"--mesh {text!r}: write AXIS=SIZE pairs, e.g. data=8 or "
                     "data=4,fsdp=2.") from None


def make_config(args: argparse.Namespace, overrides: dict[str, Any]):
  config = configlib.base_config()
  config.model.name = args.model
  config.dtype = args.dtype
  config.batch_size = args.batch
  config.grad_accum_steps = args.grad_accum_steps
  if args.no_device_augment:
    config.augment.hflip, config.augment.randaugment = False, ""
    config.augment.mixup_alpha = config.augment.cutmix_alpha = config.augment.erase_prob = 0.0
  config.augment.chunk_size = min(config.augment.chunk_size, args.batch)
  num_classes = overrides.pop("num_classes", 1000)
  with config.unlocked():
    for field, value in overrides.items():
      config.model[field] = value
  return config, num_classes


def peak_memory_bytes(device) -> Optional[int]:
  stats = device.memory_stats()  # None on the CPU backend
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))


def xla_memory(compiled) -> tuple[Optional[int], Optional[int]]:
  """XLA's memory plan of a compiled step, on every backend (so the memory levers can be compared
  on a CPU too): (scratch bytes: activations, workspace; step bytes: inputs, outputs and scratch,
  donated inputs that outputs reuse counted once). Unlike the device's peak counter, which only
  grows within a process, these are the figures of this one program."""
  try:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes), int(m.argument_size_in_bytes + m.output_size_in_bytes
                                          + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    return None, None


def _page_faults() -> Optional[int]:
  """Page faults of this process so far (minor ones: memory mapped in by the kernel)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top  (Unix only)
  except ImportError:
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(run, n_steps: int, repeats: int, batch: int) -> tuple[list[float], list[float]]:
  """``run()`` returns a pytree to block on; returns (images/s, seconds/step) per repeat."""
  rates, times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for _ in range(n_steps):
      out = run()
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    rates.append(batch * n_steps / elapsed)
    times.append(elapsed / n_steps)
  return rates, times


@dataclasses.dataclass
class _Setup:
  """A model, its train state and one synthetic batch, placed as train.py would place them."""
  config: Any
  num_classes: int
  model: Any
  tx: Any
  schedule: Any
  state: Any
  batch: dict[str, jax.Array]
  state_sharding: Any = None
  mesh: Any = None


def host_filled_state(model, tx, image_size: int, use_ema: bool, seed: int = 0) -> steps.TrainState:
  """A train state of the model's shapes with values drawn on the host: weights ~ N(0, 0.02),
  LayerNorm scales 1, biases 0. Step times do not depend on the values, and compiling the model's
  own initialisers (``steps.create_train_state``, one program of ~500 random draws) took 29 s of
  a DynaMixer-S row on a 2-core CPU; this takes about a second."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, model.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key) if path else ""
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)

  values = jax.tree_util.tree_map_with_path(fill, shapes)
  params = jax.tree.map(jnp.asarray, values)
  # The EMA gets memory of its own (on a CPU a device array may share the numpy array's memory,
  # and the step donates the whole state).
  ema = jax.tree.map(lambda v: jnp.asarray(v.copy()), values) if use_ema else None
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=jax.jit(tx.init)(params), ema_params=ema)


def _setup(args: argparse.Namespace) -> _Setup:
  config, num_classes = make_config(args, model_overrides(args))
  model = steps.build_model(config, num_classes)
  size = model.image_size
  rng = np.random.default_rng(0)
  batch = _synthetic_batch(config, args, size, num_classes, rng)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=1000)
  state = host_filled_state(model, tx, size, use_ema=config.ema_decay > 0, seed=config.seed)
  setup = _Setup(config, num_classes, model, tx, schedule, state, batch)
  if args.mesh:
    mesh = setup.mesh = sharding.create_mesh(parse_mesh(args.mesh))
    setup.state_sharding = sharding.state_shardings(state, mesh, config.partition_rules,
                                                    config.fsdp_min_size)
    setup.state = jax.device_put(state, setup.state_sharding)
    setup.batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  return setup


def _synthetic_batch(config, args: argparse.Namespace, size: int, num_classes: int,
                     rng: np.random.Generator) -> dict[str, jax.Array]:
  """What the host pipeline ships: uint8 images and labels; with the device augmentation, train
  crops on the config's canvas (``data.device_resize_canvas``, scaled to the model's image
  size: 512 at 224 px) with their sizes, so that the step includes their resize."""
  canvas = round(preprocessing.train_canvas(config.data) * size / config.data.image_size)
  labels = jnp.asarray(rng.integers(0, num_classes, (args.batch,), np.int32))
  if args.mode == "infer" or args.no_device_augment or not canvas:
    return {"image": jnp.asarray(rng.integers(0, 256, (args.batch, size, size, 3), np.uint8)),
            "label": labels}
  config.data.image_size = size  # the resize's output size
  return {"image": jnp.asarray(rng.integers(0, 256, (args.batch, canvas, canvas, 3), np.uint8)),
          "crop_size": jnp.asarray(rng.integers(size // 2, canvas + 1, (args.batch, 2), np.int32)),
          "bicubic": jnp.asarray(rng.random(args.batch) < 0.5), "label": labels}


def _compile(args: argparse.Namespace, setup: _Setup) -> tuple[Callable[[], Any], Any, float]:
  """``(run one step, the compiled executable, compile seconds)`` for the chosen mode."""
  start = time.perf_counter()
  if args.mode == "train":
    placement = dict(out_shardings=(setup.state_sharding, None)) if args.mesh else {}
    fn = jax.jit(steps.make_train_step(setup.model, setup.tx, setup.schedule, setup.config,
                                       setup.num_classes, setup.mesh),
                 donate_argnums=0, **placement)
    compiled = fn.lower(setup.state, setup.batch).compile()
    holder = [setup.state]

    def run():
      holder[0], metrics = compiled(holder[0], setup.batch)
      return metrics
  elif args.mode == "augment":
    key, config = jax.random.PRNGKey(0), setup.config
    compiled = jax.jit(lambda k, b: device.augment_batch(
        k, device.train_size_images(b, config.data.image_size), b["label"], setup.num_classes,
        config, setup.mesh)).lower(key, setup.batch).compile()
    run = lambda: compiled(key, setup.batch)
  else:
    def forward(params, images):
      images = steps.normalize(images, setup.config.mean, setup.config.std)
      return setup.model.apply({"params": params}, images, train=False)
    compiled = jax.jit(forward).lower(setup.state.params, setup.batch["image"]).compile()
    run = lambda: compiled(setup.state.params, setup.batch["image"])
  return run, compiled, time.perf_counter() - start


def flop_rate(mode: str, forward_flops: Optional[float], images_per_s: float,
              peak_tflops: Optional[float]) -> tuple[Optional[float], Optional[float]]:
  """(TFLOP/s, MFU) of a side running at ``images_per_s``; None where a figure is missing (no
  FLOP count, no peak, or the augmentation, which has no model FLOPs)."""
  flops_per_s = FORWARDS_PER_STEP.get(mode, 0) * (forward_flops or 0) * images_per_s
  if not flops_per_s:
    return None, None
  return flops_per_s / 1e12, (flops_per_s / (peak_tflops * 1e12) if peak_tflops else None)


def benchmark_jax(args: argparse.Namespace,
                  between_rounds: Optional[Callable[[], None]] = None,
                  measure_peak: bool = True) -> dict[str, Any]:
  """Every figure of one JAX measurement (see ``report`` for what they mean), timed in
  ``args.rounds`` rounds; ``between_rounds()`` runs after each one (the other side of an
  alternating comparison). images/s is the median of the rounds' medians. Without a given or
  datasheet peak, ``measure_peak`` times a matmul after each round and keeps the best."""
  start = time.perf_counter()
  setup = _setup(args)
  jax.block_until_ready(setup.state)
  setup_s = time.perf_counter() - start
  run, compiled, compile_s = _compile(args, setup)
  device = jax.devices()[0]
  peak, peak_source = args.peak_tflops, "--peak_tflops"
  if peak is None:
    peak = hardware.datasheet_peak_tflops(device.device_kind)
    peak_source = f"datasheet bf16 peak of {device.device_kind}"
  matmul_rates = []
  round_rates, rates, times, warmup_s, faults = [], [], [], None, []
  for _ in range(args.rounds):
    # Every round starts warm, as each torch round does in its own process: after the other
    # side has run, the first step pays to fault its memory back in (on the CI VM, a
    # DynaMixer-S train step took 2.6 s instead of 1.3 s after 3 s of another process).
    start = time.perf_counter()
    for _ in range(args.warmup):
      jax.block_until_ready(run())
    warmup_s = warmup_s if warmup_s is not None else time.perf_counter() - start
    faults_before = _page_faults()
    r, t = time_steps(run, args.steps, args.repeats, args.batch)
    if faults_before is not None:
      faults.append((_page_faults() - faults_before) / (args.steps * args.repeats))
    round_rates.append(statistics.median(r))
    rates += r
    times += t
    if peak is None and measure_peak:
      matmul_rates.append(hardware.measure_matmul_tflops(jnp.dtype(args.dtype), repeats=10))
    if between_rounds:
      between_rounds()
  if matmul_rates:
    peak = max(matmul_rates)
    side = hardware.matmul_size(device.platform)
    peak_source = (f"best {args.dtype} {side}x{side} matmul of {len(matmul_rates)} round(s), "
                   "measured in this run")
  temp_bytes, step_bytes = xla_memory(compiled)
  try:
    fwd_flops = flops.forward_flops(setup.model)
  except RuntimeError as e:  # the timing stands without it: MFU is n/a
    print(f"No FLOP count, so no MFU: {e}", file=sys.stderr)
    fwd_flops = None
  images_per_s = statistics.median(round_rates)
  achieved_tflops, mfu = flop_rate(args.mode, fwd_flops, images_per_s, peak)
  return dict(
      framework="jax", model=args.model, overrides=model_overrides(args), mode=args.mode,
      dtype=args.dtype, batch=args.batch, image_size=setup.model.image_size,
      num_classes=setup.num_classes,
      params=int(sum(x.size for x in jax.tree.leaves(setup.state.params))),
      steps=args.steps, repeats=args.repeats, warmup=args.warmup,
      images_per_s=images_per_s, images_per_s_min=min(rates), images_per_s_max=max(rates),
      images_per_s_all=rates, images_per_s_rounds=round_rates,
      step_time_s=statistics.median(times), compile_time_s=compile_s,
      page_faults_per_step=statistics.median(faults) if faults else None,
      huge_pages=hugepages.status(os.environ, sys.platform, hugepages.thp_mode(),
                                  hugepages.glibc_version())[1],
      setup_time_s=setup_s, warmup_time_s=warmup_s,
      peak_memory_bytes=peak_memory_bytes(device), xla_temp_bytes=temp_bytes,
      xla_step_bytes=step_bytes,
      grad_accum_steps=args.grad_accum_steps, mesh=args.mesh or None,
      device_augment=not args.no_device_augment,
      forward_flops_per_image=fwd_flops, achieved_tflops=achieved_tflops,
      peak_tflops=peak, peak_source=peak_source if peak else None,
      cpu=hardware.cpu_description(), mfu=mfu,
      backend=jax.default_backend(), device=str(device.device_kind),
      device_count=jax.device_count(), cpu_count=os.cpu_count(), jax_version=jax.__version__,
      flax_version=flax.__version__, optax_version=optax.__version__,
      python_version=platform.python_version())


def run_torch_reference(args: argparse.Namespace, compile_: bool,
                        timeout: float = 1800) -> dict[str, Any]:
  """The official model in a subprocess (same interpreter), parsed from its last stdout line."""
  cmd = [sys.executable, "-m", "dynamixer_jax.benchmark.torch_reference",
         "--dir", os.path.abspath(args.torch_reference), "--pythonpath", args.torch_pythonpath,
         "--model", args.model, "--batch", str(args.batch), "--mode", args.mode,
         "--dtype", args.dtype, "--steps", str(args.steps), "--repeats", str(args.repeats),
         "--warmup", str(args.warmup)] + (["--compile"] if compile_ else [])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
  except subprocess.TimeoutExpired:
    raise RuntimeError(f"The torch reference took over {timeout:.0f} s: {' '.join(cmd)}") from None
  if proc.returncode:
    raise RuntimeError(f"The torch reference failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value, spec: str, unit: str = "") -> str:
  return "n/a" if value is None else f"{value:{spec}}{unit}"


def report(result: dict[str, Any]) -> str:
  gib = lambda b: b and b / 2**30
  flops_per_image = result["forward_flops_per_image"]
  n_rounds = len(result["images_per_s_rounds"])
  rounds = f"{n_rounds} rounds of " if n_rounds > 1 else ""
  lines = [
      f"{result['model']} {result['mode']} {result['dtype']} batch {result['batch']} "
      f"{result['image_size']}px"
      + ("" if result["device_augment"] else " (no device augmentation)")
      + f" on {result['backend']} ({result['device']}, "
      f"{result['cpu']}), jax {result['jax_version']}"
      + (f", mesh {result['mesh']} of {result['device_count']} devices" if result["mesh"] else ""),
      f"  images/s        {result['images_per_s']:.2f} (median of {rounds}{result['repeats']}; "
      f"min {result['images_per_s_min']:.2f}, max {result['images_per_s_max']:.2f})",
      f"  step time       {result['step_time_s'] * 1e3:.1f} ms",
      f"  compile time    {result['compile_time_s']:.1f} s (before it: "
      f"{result['setup_time_s']:.1f} s to build the state and batch; warm-up steps after it: "
      f"{result['warmup_time_s']:.1f} s)",
      f"  peak memory     {_fmt(gib(result['peak_memory_bytes']), '.2f', ' GiB')}",
      f"  XLA temp memory {_fmt(gib(result['xla_temp_bytes']), '.2f', ' GiB')}",
      f"  host memory     {_fmt(result.get('page_faults_per_step'), ',.0f')} page faults per "
      f"step; huge pages {result.get('huge_pages', 'n/a')}",
      f"  forward FLOPs   {_fmt(flops_per_image and flops_per_image / 1e9, '.3f', ' GFLOP/image')}",
      f"  achieved        "
      f"{_fmt(result['achieved_tflops'] and result['achieved_tflops'] * 1e3, '.1f', ' GFLOP/s')}",
      f"  MFU             {_fmt(result['mfu'] and result['mfu'] * 100, '.2f', ' %')}"
      + (f" of {result['peak_tflops']:.4g} TFLOP/s ({result['peak_source']})"
         if result["peak_tflops"] else " (no peak: pass --peak_tflops)"),
  ]
  for key in ("torch_eager", "torch_compile"):
    ref = result.get(key)
    if ref:
      lines.append(f"  {key:<15} {ref['images_per_s']:.2f} images/s (torch {ref['torch_version']},"
                   f" {ref['threads']} threads); JAX/torch = {result['ratio_' + key]:.2f}x")
      if ref.get("mfu"):
        lines.append(f"  {'':<15} {ref['achieved_tflops'] * 1e3:.1f} GFLOP/s = MFU "
                     f"{ref['mfu'] * 100:.1f} %: at the peak, JAX/torch would be "
                     f"{1 / ref['mfu']:.2f}x")
      per_round = result.get("ratio_" + key + "_rounds", [])
      if len(per_round) > 1:
        lines.append(f"  {'':<15} alternated in {len(per_round)} rounds; JAX/torch per round: "
                     + ", ".join(f"{r:.2f}x" for r in per_round))
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
  """One measurement (the ``--suite`` runs in ``suite.py``, dispatched by ``__main__``)."""
  if args.torch_reference and (args.tiny or args.override):
    raise ValueError("--torch_reference runs the official model as registered; drop --tiny and "
                     "--override.")
  if args.mode == "augment" and (args.torch_reference or args.no_device_augment):
    raise ValueError("--mode augment times our device augmentation alone: drop "
                     "--torch_reference and --no_device_augment.")
  result = measure(args)
  print(report(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
  """JAX, and the torch reference if asked, alternating round by round (``--rounds``)."""
  modes = [] if not args.torch_reference else (
      [("torch_eager", False)] + ([("torch_compile", True)] if args.torch_compile else []))
  torch_rounds = {key: [] for key, _ in modes}

  def torch_side():
    for key, compile_ in modes:
      torch_rounds[key].append(run_torch_reference(args, compile_))

  result = benchmark_jax(args, between_rounds=torch_side if modes else None)
  for key, refs in torch_rounds.items():
    ref = dict(refs[-1])  # versions and settings; the rate is the median over the rounds
    rates = [r["images_per_s"] for r in refs]
    ref["images_per_s"] = statistics.median(rates)
    ref["images_per_s_rounds"] = rates
    result[key] = ref
    result["ratio_" + key] = result["images_per_s"] / ref["images_per_s"]
    result["ratio_" + key + "_rounds"] = [
        j / t for j, t in zip(result["images_per_s_rounds"], rates)]
    ref["achieved_tflops"], ref["mfu"] = flop_rate(
        args.mode, result["forward_flops_per_image"], ref["images_per_s"], result["peak_tflops"])
  return result
