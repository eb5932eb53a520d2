"""Two real processes joined by jax.distributed (CPU collectives over gloo) train like one, and a
SIGTERM to one of them stops both at the same saved step."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from conftest import FAST_COMPILE
from dynamixer_jax import recipes
from dynamixer_jax.train import checkpointing, loop, optim, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_mock_config.py")
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(workdir, steps, logs, *extra):
  """Two train.py processes of 2 CPU devices each, one job of 4 devices."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "train.py", f"--config={CONFIG}", f"--workdir={workdir}",
           f"--config.num_train_steps={steps}", "--config.distributed.mode=on",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
           "--config.distributed.cpu_collectives=gloo", "--config.distributed.timeout_s=60",
           *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs):
  try:
    return [p.wait(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      p.kill()


def _params(workdir, step):
  """The saved parameters, restored onto this process's first device."""
  config = recipes.load(CONFIG)
  model = steps.build_model(config, num_classes=10)
  tx, _ = optim.create_optimizer(config, steps_per_epoch=4)
  shapes = jax.eval_shape(lambda k: steps.create_train_state(model, tx, 32, k, True),
                          jax.random.PRNGKey(0))
  one_device = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one_device),
                        shapes)
  state, _ = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).restore(target, step)
  return jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_sigterm_to_one_stops_both(tmp_path):
  """JAX's preemption service tells every process: both save the same step and stop (143), and
  what they saved equals one process of 4 devices trained to that step."""
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = _start_two(tmp_path / "multi", 400, logs, "--config.checkpoint_every_steps=1000",
                     "--config.eval_every_epochs=1000")
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while "step 3/400" not in logs[1].read_text():  # synchronise on the log, not on time
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          logs[1].read_text()[-3000:]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only one host is told
  finally:
    codes = _wait(procs)
  texts = [log.read_text() for log in logs]
  assert codes == [128 + signal.SIGTERM] * 2, [t[-2000:] for t in texts]
  assert "4 devices" in texts[0]
  saved = sorted(int(n) for n in os.listdir(tmp_path / "multi" / "checkpoints") if n.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 400, saved
  for text in texts:
    assert f"Stopped by SIGTERM after step {saved[0]}" in text

  # The same global batch on one process of 4 devices (4 of this one's 8 fake devices) gives the
  # parameters the two processes saved together. (Restoring a checkpoint onto another mesh is
  # tested in test_sharding.py, resuming in test_train.py.)
  config = recipes.load(CONFIG)
  config.num_train_steps = saved[0]
  config.mesh = {"data": 4}
  config.checkpoint_every_steps = config.eval_every_epochs = 1000  # as the two: only the last save
  loop.train_and_evaluate(config, str(tmp_path / "single"), handle_signals=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               _params(tmp_path / "multi", saved[0]), _params(tmp_path / "single", saved[0]))
