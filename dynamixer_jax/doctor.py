"""``python -m dynamixer_jax.doctor``: what this machine offers, the first thing to run on a new one.

Platform, CPU and its vector extensions, JAX's backend and devices, whether bfloat16 is native,
the datasheet peak of the accelerator, the versions of the stack, and whether the input stack
(TensorFlow, tfds, Pillow, scikit-learn) imports, with TensorFlow kept off the accelerator.
"""

import importlib
import os
import platform
import sys
from typing import Optional

from dynamixer_jax import cli, hugepages

PROG = "python -m dynamixer_jax.doctor"
STACK = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "einops", "clu")
INPUT_STACK = ("tensorflow", "tensorflow_datasets", "PIL", "sklearn", "tensorboard")


def _version(name: str) -> str:
  try:
    module = importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    return f"MISSING ({type(e).__name__}: {str(e)[:80]})"
  return str(getattr(module, "__version__", "installed"))


def report() -> list[str]:
  """The doctor's lines; jax is imported here, TensorFlow only after it."""
  from dynamixer_jax.benchmark import hardware  # pylint: disable=g-import-not-at-top
  try:  # TensorFlow first and quietly: clu and tfds import it too
    import dynamixer_jax.data  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  lines = [f"python      {platform.python_version()} on {platform.system()} {platform.machine()}",
           f"cpu         {hardware.cpu_description()}"]
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  lines.append(f"jax         backend {jax.default_backend()}: {len(devices)} device(s) "
               f"({', '.join(kinds)}), {jax.process_count()} process(es)")
  device = devices[0]
  peak = hardware.datasheet_peak_tflops(device.device_kind)
  lines.append(f"bfloat16    native: {hardware.bf16_native(device)}; datasheet bf16 peak: "
               + (f"{peak:g} TFLOP/s per device" if peak else "unknown for this device "
                  "(benchmark MFU uses the matmul peak it measures)"))
  if jax.default_backend() == "cpu":
    lines.append("            no accelerator: training runs on the CPU in float32 (dtype 'auto'); "
                 "see the README's install section for GPU and TPU")
  lines.append("stack       " + ", ".join(f"{n} {_version(n)}" for n in STACK))
  lines.append("input       " + ", ".join(f"{n} {_version(n)}" for n in INPUT_STACK))
  lines.append("optional    torch " + _version("torch") + " (only to read official .pth files)")
  lines.append(_tensorflow_devices())
  lines.append("huge pages  " + hugepages.status(os.environ, sys.platform, hugepages.thp_mode(),
                                                 hugepages.glibc_version())[1]
               + " (XLA:CPU's step buffers; see dynamixer_jax/hugepages.py)")
  return lines


def _tensorflow_devices() -> str:
  try:
    import dynamixer_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (TF, quietly)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return f"tf.data     cannot import TensorFlow ({type(e).__name__}): pip install tensorflow-cpu"
  gpus = tf.config.list_physical_devices("GPU")
  if not gpus:
    return "tf.data     TensorFlow sees no GPU: it stays on the host, as it should"
  return (f"tf.data     TensorFlow sees {len(gpus)} GPU(s); train.py hides them from it, but a "
          "CUDA TensorFlow can still reserve GPU memory at import: install tensorflow-cpu")


def build_parser():
  return cli.parser("doctor", "Platform, devices, versions, bfloat16 and the input stack of this "
                    "machine.", [PROG])


def main(argv: Optional[list[str]] = None) -> None:
  build_parser().parse_args(argv)
  for line in report():
    print(line)
  sys.stdout.flush()


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()
  cli.run(main, PROG)
