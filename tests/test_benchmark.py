"""The benchmark harness runs end to end on a tiny DynaMixer and imports no TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST_COMPILE
from dynamixer_jax import hugepages
from dynamixer_jax.benchmark import timing as benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIELDS = {
    "framework", "model", "overrides", "mode", "dtype", "batch", "image_size", "num_classes",
    "params", "steps", "repeats", "warmup", "images_per_s", "images_per_s_min",
    "images_per_s_max", "images_per_s_all", "step_time_s", "compile_time_s",
    "peak_memory_bytes", "xla_temp_bytes", "grad_accum_steps", "device_augment", "forward_flops_per_image", "achieved_tflops", "peak_tflops",
    "peak_source", "mfu", "backend", "device", "device_count", "cpu_count", "cpu", "jax_version",
    "flax_version", "optax_version", "python_version"}


def test_light_modules_import_no_tensorflow():
  code = ("import sys\n"
          "import dynamixer_jax.benchmark.timing, dynamixer_jax.train.steps\n"
          "import dynamixer_jax.train.optim, dynamixer_jax.train.configlib\n"
          "import dynamixer_jax.train.sharding, dynamixer_jax.models, dynamixer_jax.weights\n"
          "bad = sorted(m for m in sys.modules\n"
          "             if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'))\n"
          "print(bad)\n"
          "assert not bad, bad\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # 15-35 s of compiles from a cold cache on 2 cores
def test_tiny_train_run_writes_every_field(tmp_path, capsys):
  path = tmp_path / "bench.json"
  benchmark.main(["--tiny", "--batch", "2", "--mode", "train", "--steps", "2", "--repeats", "1",
                  "--warmup", "1", "--grad_accum_steps", "2", "--no_device_augment", "--override", "remat=true",
                  "--json", str(path)])
  result = json.loads(path.read_text())
  assert FIELDS <= set(result), FIELDS - set(result)
  assert result["grad_accum_steps"] == 2 and result["overrides"]["remat"] is True
  assert result["device_augment"] is False
  assert result["xla_temp_bytes"] > 0  # XLA's memory plan is reported on the CPU too
  assert result["image_size"] == 32 and result["num_classes"] == 10
  assert result["images_per_s"] > 0 and result["forward_flops_per_image"] > 0
  # A CPU has no datasheet peak: a matmul measured after each round stands in for it.
  assert "measured in this run" in result["peak_source"] and result["peak_tflops"] > 0
  assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"])
  assert "cores" in result["cpu"]
  out = capsys.readouterr().out
  assert "MFU             " in out and "measured in this run" in out and "images/s" in out


def test_the_device_augmentation_alone_is_timed_from_canvases(tmp_path):
  """--mode augment: the crops' resize from the canvas (512 px at 224, scaled: 73 at 32) and the
  rest of the device augmentation, without the model (no model FLOPs, no MFU)."""
  path = tmp_path / "augment.json"
  benchmark.main(["--tiny", "--batch", "4", "--mode", "augment", "--steps", "1", "--repeats", "1",
                  "--warmup", "0", "--json", str(path)])
  result = json.loads(path.read_text())
  assert result["mode"] == "augment" and result["images_per_s"] > 0
  assert result["achieved_tflops"] is None and result["mfu"] is None
  args = benchmark.build_parser().parse_args(["--tiny", "--batch", "4", "--mode", "augment"])
  config, num_classes = benchmark.make_config(args, benchmark.model_overrides(args))
  batch = benchmark._synthetic_batch(config, args, 32, num_classes, np.random.default_rng(0))  # pylint: disable=protected-access
  assert batch["image"].shape == (4, 73, 73, 3) and batch["crop_size"].max() <= 73
  with pytest.raises(ValueError, match="--mode augment"):
    benchmark.main(["--tiny", "--mode", "augment", "--no_device_augment"])


def test_tiny_infer_with_peak_and_overrides(tmp_path):
  path = tmp_path / "bench.json"
  benchmark.main(["--tiny", "--override", "num_classes=5", "--batch", "2", "--mode", "infer",
                  "--mesh", "data=2",
                  "--steps", "2", "--repeats", "2", "--warmup", "0", "--peak_tflops", "0.1",
                  "--json", str(path)])
  result = json.loads(path.read_text())
  assert FIELDS <= set(result), FIELDS - set(result)
  assert result["num_classes"] == 5 and len(result["images_per_s_all"]) == 2
  assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.1)
  assert result["peak_source"] == "--peak_tflops"
  assert result["mesh"] == "data=2" and result["device_count"] == 8  # conftest's fake devices


def test_rounds_alternate_jax_and_the_torch_reference(monkeypatch):
  """``--rounds 3``: JAX, eager, compile, three times over; medians and per-round ratios."""
  order, torch_rates = [], iter([2.0, 1.0, 4.0, 1.0, 3.0, 1.0])
  real_time_steps = benchmark.time_steps

  def timed_jax(*args):
    order.append("jax")
    return real_time_steps(*args)

  def fake_torch(args, compile_):
    order.append("compile" if compile_ else "eager")
    return dict(images_per_s=next(torch_rates), torch_version="test", threads=2)

  monkeypatch.setattr(benchmark, "time_steps", timed_jax)
  monkeypatch.setattr(benchmark, "run_torch_reference", fake_torch)
  args = benchmark.build_parser().parse_args([
      "--tiny", "--batch", "2", "--mode", "infer", "--steps", "1", "--repeats", "1", "--warmup",
      "0", "--rounds", "3", "--torch_reference", "unused", "--torch_compile"])
  result = benchmark.measure(args)
  assert order == ["jax", "eager", "compile"] * 3
  assert result["torch_eager"]["images_per_s_rounds"] == [2.0, 4.0, 3.0]
  assert result["torch_eager"]["images_per_s"] == 3.0
  assert result["torch_compile"]["images_per_s"] == 1.0
  jax_rounds = result["images_per_s_rounds"]
  assert len(jax_rounds) == 3 and result["images_per_s"] == sorted(jax_rounds)[1]
  assert result["ratio_torch_eager_rounds"] == pytest.approx(
      [j / t for j, t in zip(jax_rounds, [2.0, 4.0, 3.0])])
  # The official side's FLOP rate against the same (measured) peak, and what that leaves.
  eager = result["torch_eager"]
  assert eager["achieved_tflops"] == pytest.approx(result["forward_flops_per_image"] * 3.0 / 1e12)
  assert eager["mfu"] == pytest.approx(eager["achieved_tflops"] / result["peak_tflops"])
  report = benchmark.report(result)
  assert "alternated in 3 rounds" in report
  assert f"at the peak, JAX/torch would be {1 / eager['mfu']:.2f}x" in report


def test_bad_override_is_explained():
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    benchmark.main(["--tiny", "--override", "image_size"])


def test_datasheet_peaks_name_only_known_devices():
  from dynamixer_jax.benchmark import hardware  # pylint: disable=g-import-not-at-top
  assert hardware.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert hardware.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert hardware.datasheet_peak_tflops("NVIDIA H200") == 989.4
  assert hardware.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert hardware.datasheet_peak_tflops("NVIDIA B200") == 2250.0
  assert hardware.datasheet_peak_tflops("NVIDIA GB200") == 2500.0  # not the B200 entry
  assert hardware.datasheet_peak_tflops("NVIDIA L40") == 181.0  # not the L4 entry
  assert hardware.datasheet_peak_tflops("TPU v5 lite") == 197.0
  assert hardware.datasheet_peak_tflops("TPU v5p") == 459.0
  assert hardware.datasheet_peak_tflops("cpu") is None
  assert hardware.datasheet_peak_tflops("NVIDIA RTX 9999 Mystery") is None  # never "an H100"


def test_cpu_model_names_the_microarchitecture_behind_a_generic_name():
  from dynamixer_jax.benchmark import hardware  # pylint: disable=g-import-not-at-top
  amd = {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC"}
  assert hardware.cpu_model({**amd, "cpu family": "23", "model": "1"}) == (
      "AMD EPYC (family 23 model 1: Zen 1)")
  assert hardware.cpu_model({**amd, "cpu family": "25", "model": "17"}).endswith(": Zen 4)")
  assert hardware.cpu_model({**amd, "cpu family": "26", "model": "2"}).endswith(": Zen 5)")
  xeon = {"vendor_id": "GenuineIntel", "model name": "Intel(R) Xeon(R) Processor",
          "cpu family": "6", "model": "143"}
  assert hardware.cpu_model(xeon).endswith("(family 6 model 143: Sapphire Rapids)")
  # An unknown model keeps its numbers and gets no name; without the fields, just the name.
  assert hardware.cpu_model({**amd, "cpu family": "99", "model": "3"}) == (
      "AMD EPYC (family 99 model 3)")
  assert hardware.cpu_model({"model name": "Some CPU"}) == "Some CPU"


def _fake_row(case) -> dict:
  return dict(model=case.model, mode=case.mode, batch=case.batch, images_per_s=100.0,
              step_time_s=0.01, setup_time_s=1.0, compile_time_s=2.0, xla_temp_bytes=2**30,
              xla_step_bytes=2**31, achieved_tflops=1.0, mfu=None)


def test_the_device_check_goes_on_past_a_failure_and_stops_at_its_budget(tmp_path, monkeypatch,
                                                                         capsys):
  """Device time is short: a part that fails is reported in the table and the rest still runs;
  the official model runs eager beside each DynaMixer row and under torch.compile last; a part
  that would start past the budget is listed as not run; the JSON holds the table so far."""
  from dynamixer_jax.benchmark import suite  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_jax(case, measure_peak=True):
    calls.append(f"jax {case.model} {case.mode}")
    assert not measure_peak  # the suite measured its peak once, up front
    # Like the official step beside them, the train rows leave out the device augmentation.
    assert case.no_device_augment == (case.mode == "train")
    if case.model == "dynamixer_m" and case.mode == "infer":
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return _fake_row(case)

  def fake_torch(case, compile_, timeout):
    assert timeout > 0
    calls.append(f"torch {case.model} {case.mode} {'compile' if compile_ else 'eager'}")
    return dict(images_per_s=50.0 if compile_ else 25.0)

  monkeypatch.setattr(suite.timing, "benchmark_jax", fake_jax)
  monkeypatch.setattr(suite.timing, "run_torch_reference", fake_torch)
  monkeypatch.setattr(suite.hardware, "measure_matmul_tflops", lambda dtype, size: 100.0)
  monkeypatch.setattr(suite.digits_run, "run", lambda steps, dtype, log_every, model: dict(
      seconds=1.0, loss_curve=[(steps, 0.5)], top1=99.0, ema_top1=98.5))
  path = tmp_path / "suite.json"
  args = benchmark.build_parser().parse_args(["--suite", "--torch_reference", "unused",
                                              "--json", str(path)])
  table = suite.main(args)["table"]
  assert calls[:3] == ["jax dynamixer_s train", "torch dynamixer_s train eager",
                       "jax dynamixer_s infer"]
  assert "torch mixer_b16 train eager" not in calls  # no official Mixer in that checkout
  compiled = [f"torch dynamixer_{m} {mode} compile" for m in "sml"
              for mode in ("train", "infer") if (m, mode) != ("m", "infer")]
  # the last memory row, the augmentation alone, then torch.compile for each DynaMixer row
  assert calls[-len(compiled) - 2:] == ["jax dynamixer_l train",
                                        "jax dynamixer_s augment"] + compiled
  assert "| dynamixer_s | augment | 256 |" in table
  assert "failed: dynamixer_m infer (JAX): RuntimeError: RESOURCE_EXHAUSTED" in table
  assert "| dynamixer_l | train | 128 | 100.0 | 10.0 | 1 / 2 | 1.00 | 2.00 | 1.0 % |" in table
  assert "| 25.0 | 50.0 | 2.00x |" in table  # JAX over the best official mode
  assert "| mixer_b16 | infer | 256 |" in table and "| n/a | n/a | n/a |" in table
  assert "| dynamixer_l train b128 | model.remat=True | 1.00 | 2.00 | 10.0 |" in table
  # The memory row without a lever is the L train row: its figures, not a second compile.
  assert "| dynamixer_l train b128 | none (the train row above) | 1.00 | 2.00 | 10.0 |" in table
  assert calls.count("jax dynamixer_l train") == 3  # the speed row, remat, accumulation
  assert "held-out top-1 after 200 steps: 99.00 % (raw), 98.50 % (EMA)" in table
  assert json.loads(path.read_text())["table"] == table
  assert "start: mixer_b16 infer (JAX)" in capsys.readouterr().err

  calls.clear()
  args.budget_s = 0
  table = suite.main(args)["table"]
  assert calls == []
  assert "not run (past the 0 s budget): dynamixer_s train (JAX)" in table
  assert "not run (past the 0 s budget): 200-step digits run" in table


@pytest.mark.slow
def test_the_device_check_suite_runs_with_tiny_settings(tmp_path):
  """``.ci/device_check OUT --tiny``: the machine's description (the doctor's report), then every
  part of the device check (``--suite --tiny``) on the CPU, its log, table and JSON in OUT."""
  # Started without the huge-pages tunable: the doctor (and the benchmark) restart themselves
  # with it where it helps. FAST_COMPILE: a smoke test of the table, not a timing.
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  result = subprocess.run(["bash", os.path.join(ROOT, ".ci", "device_check"), str(tmp_path),
                           "--tiny"], capture_output=True, text=True, timeout=600,
                          env=dict(env, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu",
                                   PYTHON=sys.executable))
  assert result.returncode == 0, result.stdout[-3000:]
  machine = (tmp_path / "machine.txt").read_text()
  for field in ("python ", "cpu ", "jax ", "bfloat16 ", "stack ", "input ", "tf.data ",
                "huge pages "):
    assert f"\n{field}" in machine, machine
  helps, why_not = hugepages.status(env, sys.platform, hugepages.thp_mode(),
                                    hugepages.glibc_version())
  expected = "huge pages  on (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)" if helps else why_not
  assert expected in machine and "MISSING" not in machine.split("optional")[0], machine
  table = json.loads((tmp_path / "suite.json").read_text())["table"]
  assert "bf16 matmul peak measured now" in table and "| dynamixer_s (tiny) | train |" in table
  assert f"XLA_FLAGS={FAST_COMPILE}" in table  # flags change what is measured: the table says so
  assert "| dynamixer_s train b4 | model.remat=True |" in table
  assert "| dynamixer_s train b4 | none (the train row above) |" in table
  assert "| dynamixer_s (tiny) | augment | 4 |" in table
  assert "loss by step: 2: " in table and "held-out top-1 after 20 steps" in table
  assert table in result.stdout and table in (tmp_path / "suite.log").read_text()
