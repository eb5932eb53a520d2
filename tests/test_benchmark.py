"""The benchmark harness runs end to end on a tiny DynaMixer and imports no TensorFlow."""

import json
import subprocess
import sys

import pytest

from dynamixer_jax.benchmark import timing as benchmark

FIELDS = {
    "framework", "model", "overrides", "mode", "dtype", "batch", "image_size", "num_classes",
    "params", "steps", "repeats", "warmup", "images_per_s", "images_per_s_min",
    "images_per_s_max", "images_per_s_all", "step_time_s", "compile_time_s",
    "peak_memory_bytes", "xla_temp_bytes", "grad_accum_steps", "forward_flops_per_image", "achieved_tflops", "peak_tflops",
    "peak_source", "mfu", "backend", "device", "device_count", "cpu_count", "jax_version",
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
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tiny_train_run_writes_every_field(tmp_path, capsys):
  path = tmp_path / "bench.json"
  benchmark.main(["--tiny", "--batch", "2", "--mode", "train", "--steps", "2", "--repeats", "1",
                  "--warmup", "1", "--grad_accum_steps", "2", "--override", "remat=true",
                  "--json", str(path)])
  result = json.loads(path.read_text())
  assert FIELDS <= set(result), FIELDS - set(result)
  assert result["grad_accum_steps"] == 2 and result["overrides"]["remat"] is True
  assert result["xla_temp_bytes"] > 0  # XLA's memory plan is reported on the CPU too
  assert result["image_size"] == 32 and result["num_classes"] == 10
  assert result["images_per_s"] > 0 and result["forward_flops_per_image"] > 0
  assert result["mfu"] is None and result["peak_source"] is None  # CPU without --peak-tflops
  out = capsys.readouterr().out
  assert "MFU             n/a" in out and "images/s" in out


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


def test_bad_override_is_explained():
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    benchmark.main(["--tiny", "--override", "image_size"])
