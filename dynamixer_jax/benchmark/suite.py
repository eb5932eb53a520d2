"""``python -m dynamixer_jax.benchmark --suite``: the one-shot device check, one markdown table.

On one GPU or TPU chip, planned for at most about 8 minutes of device time with its compiles:
the bf16 matmul peak measured now and the datasheet peak of the device; DynaMixer-S/M/L and
MLP-Mixer-B/16, train and inference, bfloat16, at a realistic batch per device (img/s, step time,
XLA memory, MFU against both peaks); the official PyTorch model (eager and ``torch.compile``)
beside them when ``--torch_reference`` and a CUDA torch are given; the memory of DynaMixer-L with
and without ``model.remat`` and with ``grad_accum_steps``; and a 200-step bf16 training run of the
quickstart model on real data (scikit-learn's digits), its loss curve printed. With ``--tiny`` (the
CI smoke test on a CPU) every part runs on a tiny model and a few steps, the train row without
the device augmentation.

The training run is a ``train.py`` child process (started first, it runs beside the timings), so
this module imports no TensorFlow.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp

from dynamixer_jax.benchmark import hardware, timing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = (("dynamixer_s", 256), ("dynamixer_m", 128), ("dynamixer_l", 128), ("mixer_b16", 256))
# --tiny times every step at one batch: the train row and the first memory row are one program.
TINY_BATCH = 4


def _args(base: argparse.Namespace, **changes: Any) -> argparse.Namespace:
  values = dict(vars(base), suite=False, json=None, torch_reference=None)
  values.update(changes)
  return argparse.Namespace(**values)


def _gib(value: Optional[int]) -> str:
  return "n/a" if not value else f"{value / 2**30:.2f}"


def _pct(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{100 * value:.1f} %"


def _speed_rows(args, measured_peak: float) -> tuple[list[str], list[dict]]:
  rows, results = [], []
  tiny = args.tiny
  for name, batch in (MODELS[:1] if tiny else MODELS):
    for mode in ("train", "infer"):
      # --tiny: no device augmentation (its compile was 20 s of this 70 s smoke run on 2 cores;
      # `--mode augment` times it in its own test) and the memory rows' batch, so that this step
      # is the program of their first row, compiled once where a compilation cache is on.
      case = _args(args, model=name, mode=mode, dtype="bfloat16",
                   batch=TINY_BATCH if tiny else batch,
                   steps=1 if tiny else 5, repeats=1 if tiny else 2, warmup=1,
                   override=[], grad_accum_steps=1, mesh="", no_device_augment=tiny,
                   torch_reference=None if tiny else args.torch_reference, torch_compile=True)
      result = timing.measure(case)  # with the official model beside it, if a checkout is given
      result["mfu_measured_peak"] = result["achieved_tflops"] / measured_peak
      results.append(result)
      torch_cols = " | ".join(
          f"{result[k]['images_per_s']:.1f}" if k in result else "n/a"
          for k in ("torch_eager", "torch_compile"))
      rows.append(f"| {result['model']}{' (tiny)' if tiny else ''} | {mode} | {result['batch']} | "
                  f"{result['images_per_s']:.1f} | {result['step_time_s'] * 1e3:.1f} | "
                  f"{_gib(result['xla_temp_bytes'])} | {_gib(result['peak_memory_bytes'])} | "
                  f"{_pct(result['mfu_measured_peak'])} | {_pct(result['mfu'])} | {torch_cols} |")
  return rows, results


def _memory_rows(args) -> list[str]:
  name, batch = ("dynamixer_s", TINY_BATCH) if args.tiny else ("dynamixer_l", 128)
  rows = []
  for label, changes in (("none", {}), ("model.remat=True", dict(override=["remat=true"])),
                         ("grad_accum_steps=4", dict(grad_accum_steps=4))):
    # Without the device augmentation: the levers act on the model's activations.
    base = dict(model=name, mode="train", dtype="bfloat16", batch=batch,
                steps=1, repeats=1, warmup=0, override=[], grad_accum_steps=1, mesh="",
                no_device_augment=True)
    base.update(changes)
    result = timing.benchmark_jax(_args(args, **base))
    rows.append(f"| {name} train b{result['batch']} | {label} | {_gib(result['xla_temp_bytes'])} "
                f"| {result['step_time_s'] * 1e3:.1f} |")
  return rows


def _start_training_run(args, workdir: str) -> tuple[subprocess.Popen, int]:
  """The quickstart model on the digits in bfloat16, 200 steps (20 with --tiny), in a child."""
  steps = 20 if args.tiny else 200
  cmd = [sys.executable, "train.py", "--config=configs/quickstart.py",
         "--config.dtype=bfloat16", f"--config.num_train_steps={steps}",
         f"--config.log_every_steps={max(1, steps // 10)}", "--config.eval_every_epochs=1000",
         f"--workdir={workdir}"]
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # leave the device to the rest
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True), steps


def _training_lines(proc: subprocess.Popen, steps: int) -> list[str]:
  try:
    out = proc.communicate(timeout=900)[0]
  finally:
    proc.kill()
  if proc.returncode:
    return [f"training run failed ({proc.returncode}): {out[-1500:]}"]
  curve = re.findall(r"step (\d+)/\d+  loss ([0-9.]+)", out)
  top1 = re.search(r"final top-1: raw weights ([0-9.]+) %", out)
  return ["loss by step: " + ", ".join(f"{s}: {l}" for s, l in curve),
          f"held-out top-1 after {steps} steps: {top1.group(1) if top1 else 'n/a'} %"]


def main(args: argparse.Namespace) -> dict[str, Any]:
  device = jax.devices()[0]
  measured = hardware.measure_matmul_tflops(jnp.bfloat16, size=512 if args.tiny else None)
  datasheet = hardware.datasheet_peak_tflops(device.device_kind)
  lines = [f"# Device check: {device.device_kind} ({jax.default_backend()}), jax "
           f"{jax.__version__}; host {hardware.cpu_description()}",
           f"bf16 matmul peak measured now: {measured:.1f} TFLOP/s; datasheet: "
           + (f"{datasheet:g} TFLOP/s" if datasheet else "unknown device, none"), "",
           "| model | mode | batch | img/s | step ms | XLA temp GiB | peak GiB | MFU (measured "
           "peak) | MFU (datasheet) | torch eager img/s | torch.compile img/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  with tempfile.TemporaryDirectory() as workdir:
    # The CI smoke test (--tiny) overlaps the training run with the timings; a real device check
    # runs it after them, so that no timing shares the device.
    training = _start_training_run(args, workdir) if args.tiny else None
    rows, results = _speed_rows(args, measured)
    lines += rows
    lines += ["", "| memory | lever | XLA temp GiB | step ms |", "|---|---|---|---|"]
    lines += _memory_rows(args)
    lines += [""] + _training_lines(*(training or _start_training_run(args, workdir)))
  print("\n".join(lines))
  summary = dict(device=device.device_kind, measured_peak_tflops=measured,
                 datasheet_peak_tflops=datasheet, results=results, table="\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2, default=str)
  return summary
