"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os
import pathlib

# LLVM at -O0: the suite's many tiny programs compile in about half the time, and it checks logic
# and numbers, not speed (`pytest -m "not slow"` from a cold cache: 618 s at XLA's default -O3,
# 394 s at -O0 on a 2-core Xeon). The short children (train.py, the CLIs, the two processes, the
# device-check smoke, the notebook's smoke run, input_tools) run at -O0 too; the quickstart
# children, which train hundreds of steps, and doctor run at the default level.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Training tests build the same small steps again and again, in this process and in the train.py
# children (which inherit the environment): reuse compiled executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "dynamixer_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> dict:
  """A reference fixture made with the official code: params, input (NHWC), logits, config."""
  with np.load(FIXTURES / name, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
  images = data["input"]
  if images.shape[1] == 3 and images.shape[-1] != 3:  # torch fixtures are NCHW
    images = images.transpose(0, 2, 3, 1)
  return dict(params=params, images=images, logits=data["logits"],
              logits_f64=data["logits_f64"], raw=data)


@pytest.fixture
def dynamixer_tiny() -> dict:
  return load_fixture("dynamixer_tiny.npz")


@pytest.fixture
def mixer_tiny() -> dict:
  return load_fixture("mixer_tiny.npz")


# The longest tests of the suite (children, or several runs of one workdir, of one to three
# minutes each on 2 cores), in the order they start: one of them started late runs alone at the
# end while the other worker idles (the bfloat16 quickstart held the last 150 s of an 18 min run
# that way).
LONGEST_FIRST = ("test_quickstart_trains", "test_the_quickstart_in_bfloat16",
                 "test_two_processes_train", "test_the_device_check_suite",
                 "test_stop_and_resume", "test_cifar_finetune_notebook")


def pytest_collection_modifyitems(config, items):
  """The longest tests first, then the other slow ones (children, several processes), then the
  quick ones: with two workers the long ones then overlap the many quick ones."""
  del config

  def order(item) -> tuple[bool, int]:
    rank = next((i for i, prefix in enumerate(LONGEST_FIRST) if item.name.startswith(prefix)),
                len(LONGEST_FIRST))
    return item.get_closest_marker("slow") is None, rank

  items.sort(key=order)
