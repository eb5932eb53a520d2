"""``python -m dynamixer_jax.benchmark --suite``: the one-shot device check, one markdown table.

On one GPU or TPU chip, within ``--budget_s`` (8 minutes) of device time with its compiles: the
bf16 matmul peak measured now and the datasheet peak of the device; DynaMixer-S/M/L and
MLP-Mixer-B/16, train and inference, bfloat16, at a realistic batch per device (img/s, step
time, compile time, XLA memory, MFU against both peaks); the official PyTorch model eager beside
each DynaMixer row when ``--torch_reference`` is given; a 200-step bf16 training run of the
quickstart model on real data (scikit-learn's digits), its loss curve and held-out top-1; the
memory of DynaMixer-L with and without ``model.remat`` and with ``grad_accum_steps``; the device
augmentation of a DynaMixer-S batch alone; and, last, the official model under ``torch.compile``
while the budget lasts. The train rows time forward, backward, AdamW and EMA without the device
augmentation, like the official step beside them (it also shortens their compile). With
``--tiny`` (the CI smoke test on a CPU) every part runs on a tiny model for a few steps.

Device time is short where accelerators are lent, so the parts run in order of what they tell,
each part that fails is reported in its row instead of ending the check, a part that would start
past the budget is listed as not run, and every finished line is printed (stderr) and saved
(``--json``) at once: a run killed at its time limit keeps what it measured. Nothing here
imports TensorFlow.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dynamixer_jax.benchmark import digits_run, hardware, timing

MODELS = (("dynamixer_s", 256), ("dynamixer_m", 128), ("dynamixer_l", 128), ("mixer_b16", 256))
OFFICIAL = ("dynamixer_s", "dynamixer_m", "dynamixer_l")  # what the official checkout defines
# --tiny times every step at one batch.
TINY_BATCH = 4
SPEED_HEADER = ("| model | mode | batch | img/s | step ms | setup / compile s | XLA temp GiB "
                "| XLA step GiB | MFU (measured peak) | MFU (datasheet) | torch eager img/s "
                "| torch.compile img/s | JAX / best torch |")
MEMORY_HEADER = "| memory | lever | XLA temp GiB | XLA step GiB | step ms |"


def _args(base: argparse.Namespace, **changes: Any) -> argparse.Namespace:
  values = dict(vars(base), suite=False, json=None)
  values.update(changes)
  return argparse.Namespace(**values)


def _gib(value: Optional[int]) -> str:
  return "n/a" if not value else f"{value / 2**30:.2f}"


def _pct(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{100 * value:.1f} %"


class _Check:
  """The table so far: each finished line goes to stderr and into the JSON at once."""

  def __init__(self, args: argparse.Namespace):
    self.args, self.start = args, time.monotonic()
    self.deadline = self.start + args.budget_s
    self.header: list[str] = []
    self.speed: list[dict[str, Any]] = []  # one per row: the JAX result, torch beside it
    self.memory: list[str] = []
    self.training: list[str] = []
    self.skipped: list[str] = []

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def log(self, text: str) -> None:
    print(f"[{time.monotonic() - self.start:5.0f} s] {text}", file=sys.stderr, flush=True)
    self.save()

  def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with the reason in the table: past the budget, or failed."""
    if self.left() <= 0:
      self.skipped.append(f"not run (past the {self.args.budget_s:.0f} s budget): {what}")
      self.log(self.skipped[-1])
      return None
    self.log(f"start: {what}")
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      self.skipped.append(f"failed: {what}: {message}")
      self.log(self.skipped[-1])
      return None

  def table(self) -> str:
    tiny = " (tiny)" if self.args.tiny else ""
    lines = self.header + ["", SPEED_HEADER, "|" + "---|" * SPEED_HEADER.count(" | ") + "---|"]
    lines += [_speed_line(row, tiny) for row in self.speed]
    lines += ["", MEMORY_HEADER, "|---|---|---|---|---|"]
    lines += self.memory + [""] + self.training
    return "\n".join(lines + ([""] + self.skipped if self.skipped else []))

  def save(self) -> None:
    if self.args.json:
      summary = dict(table=self.table(), results=self.speed, seconds=time.monotonic() - self.start)
      with open(self.args.json, "w") as f:
        json.dump(summary, f, indent=2, default=str)


def _speed_line(row: dict[str, Any], tiny: str) -> str:
  torch = [row.get(k, {}).get("images_per_s") for k in ("torch_eager", "torch_compile")]
  best = max((t for t in torch if t), default=None)
  cells = [f"{row['model']}{tiny}", row["mode"], str(row["batch"]),
           f"{row['images_per_s']:.1f}", f"{row['step_time_s'] * 1e3:.1f}",
           f"{row['setup_time_s']:.0f} / {row['compile_time_s']:.0f}",
           _gib(row["xla_temp_bytes"]), _gib(row["xla_step_bytes"]),
           _pct(row["mfu_measured_peak"]), _pct(row["mfu"])]
  cells += [f"{t:.1f}" if t else row.get(k + "_note", "n/a")
            for t, k in zip(torch, ("torch_eager", "torch_compile"))]
  cells.append(f"{row['images_per_s'] / best:.2f}x" if best else "n/a")
  return "| " + " | ".join(cells) + " |"


def _case(args: argparse.Namespace, name: str, batch: int, mode: str) -> argparse.Namespace:
  return _args(args, model=name, mode=mode, dtype="bfloat16",
               batch=TINY_BATCH if args.tiny else batch, steps=1 if args.tiny else 5,
               repeats=1 if args.tiny else 2, warmup=1, override=[], grad_accum_steps=1,
               mesh="", no_device_augment=mode == "train", rounds=1)


def _torch(check: _Check, case: argparse.Namespace, row: dict[str, Any], compile_: bool) -> None:
  key = "torch_compile" if compile_ else "torch_eager"
  result = check.attempt(f"{case.model} {case.mode} {key}", lambda: timing.run_torch_reference(
      case, compile_, timeout=max(check.left(), 0) + 60))
  if result:
    row[key] = result
    check.log(f"{case.model} {case.mode} {key}: {result['images_per_s']:.1f} img/s")
  else:
    row[key + "_note"] = "failed" if check.left() > 0 else "not run"


def _speed_rows(check: _Check, measured_peak: float) -> list[tuple[argparse.Namespace, dict]]:
  """JAX rows, each with the official model eager beside it (one process each, in turn)."""
  args, done = check.args, []
  for name, batch in (MODELS[:1] if args.tiny else MODELS):
    for mode in ("train", "infer"):
      case = _case(args, name, batch, mode)
      row = _jax_row(check, case, measured_peak)
      if row is not None and args.torch_reference and name in OFFICIAL:
        _torch(check, case, row, compile_=False)
        done.append((case, row))
  return done


def _jax_row(check: _Check, case: argparse.Namespace,
             measured_peak: float) -> Optional[dict[str, Any]]:
  """One row of the speed table (None when it failed or was past the budget)."""
  # The suite measured its own peak once; each row is put against it below.
  row = check.attempt(f"{case.model} {case.mode} (JAX)",
                      lambda: timing.benchmark_jax(case, measure_peak=False))
  if row is not None:
    # None without model FLOPs (the augmentation row).
    row["mfu_measured_peak"] = row["achieved_tflops"] and row["achieved_tflops"] / measured_peak
    check.speed.append(row)
    check.log(_speed_line(row, ""))
  return row


def _augment_row(check: _Check, measured_peak: float) -> None:
  """The device augmentation of a DynaMixer-S batch alone: the train rows leave it out."""
  _jax_row(check, _case(check.args, "dynamixer_s", 256, "augment"), measured_peak)


def _memory_line(name: str, label: str, result: dict[str, Any]) -> str:
  return (f"| {name} train b{result['batch']} | {label} | {_gib(result['xla_temp_bytes'])} | "
          f"{_gib(result['xla_step_bytes'])} | {result['step_time_s'] * 1e3:.1f} |")


def _memory_rows(check: _Check) -> None:
  name, batch = ("dynamixer_s", TINY_BATCH) if check.args.tiny else ("dynamixer_l", 128)
  # Without a lever the program is the speed table's train row of that model and batch: its
  # figures are reused rather than paying for the same compile twice (minutes on a GPU).
  same = [row for row in check.speed
          if (row["model"], row["mode"], row["batch"]) == (name, "train", batch)]
  levers = [("model.remat=True", dict(override=["remat=true"])),
            ("grad_accum_steps=4", dict(grad_accum_steps=4))]
  if same:
    check.memory.append(_memory_line(name, "none (the train row above)", same[0]))
    check.log(check.memory[-1])
  else:
    levers.insert(0, ("none", {}))
  for label, changes in levers:
    # Without the device augmentation: the levers act on the model's activations.
    base = dict(model=name, mode="train", dtype="bfloat16", batch=batch, steps=1, repeats=1,
                warmup=0, override=[], grad_accum_steps=1, mesh="", no_device_augment=True,
                rounds=1)
    base.update(changes)
    result = check.attempt(f"memory of {name} with {label}",
                           lambda base=base: timing.benchmark_jax(_args(check.args, **base),
                                                                 measure_peak=False))
    if result:
      check.memory.append(_memory_line(name, label, result))
      check.log(check.memory[-1])


def _training_run(check: _Check) -> None:
  steps = 20 if check.args.tiny else 200
  # --tiny: the tiny model (its step compiles in seconds; the quickstart model's took 20 s at -O0).
  model = {k: v for k, v in timing.TINY_OVERRIDES.items() if k != "num_classes"}
  result = check.attempt(f"{steps}-step digits run", lambda: digits_run.run(
      steps, "bfloat16", max(1, steps // 10), model if check.args.tiny else None))
  if result:
    ema = "n/a" if result["ema_top1"] is None else f"{result['ema_top1']:.2f}"
    check.training = [
        f"bfloat16 training run: the {'tiny' if check.args.tiny else 'quickstart'} model on "
        f"the digits, {steps} steps in {result['seconds']:.1f} s (compile included)",
        "loss by step: " + ", ".join(f"{s}: {l:.3f}" for s, l in result["loss_curve"]),
        f"held-out top-1 after {steps} steps: {result['top1']:.2f} % (raw), {ema} % (EMA)"]
    check.log(" / ".join(check.training))


def main(args: argparse.Namespace) -> dict[str, Any]:
  # The official model runs in child processes beside this one: JAX takes device memory as it
  # needs it instead of 75 % up front (set before the backend starts).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  check = _Check(args)
  device = jax.devices()[0]
  measured = hardware.measure_matmul_tflops(jnp.bfloat16, size=512 if args.tiny else None)
  datasheet = hardware.datasheet_peak_tflops(device.device_kind)
  check.header = [
      f"# Device check: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
      f"host {hardware.cpu_description()}",
      f"bf16 matmul peak measured now: {measured:.1f} TFLOP/s; datasheet: "
      + (f"{datasheet:g} TFLOP/s" if datasheet else "unknown device, none")]
  if os.environ.get("XLA_FLAGS"):  # they change what is measured (e.g. cuBLAS instead of Triton)
    check.header.append(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
  check.log(" / ".join(check.header))
  with_torch = _speed_rows(check, measured)
  _training_run(check)
  _memory_rows(check)
  _augment_row(check, measured)
  for case, row in with_torch:  # torch.compile last: its compiles are the longest part
    _torch(check, case, row, compile_=True)
  peak = timing.peak_memory_bytes(device)
  if peak:
    check.memory.append(f"| (the whole check) | largest device memory in use | | "
                        f"{_gib(peak)} | |")
  check.save()
  table = check.table()
  print(table, flush=True)
  return dict(device=device.device_kind, measured_peak_tflops=measured,
              datasheet_peak_tflops=datasheet, results=check.speed, table=table)
