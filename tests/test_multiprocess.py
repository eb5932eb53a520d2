"""Two real processes joined by jax.distributed (CPU collectives over gloo) train like one."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from dynamixer_jax import recipes
from dynamixer_jax.train import checkpointing, optim, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_mock_config.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(workdir, steps, devices, distributed=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, "train.py", f"--config={CONFIG}", f"--workdir={workdir}",
       f"--config.num_train_steps={steps}", *distributed],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=300):
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return logs


def _two_processes(workdir, steps):
  port = _free_port()
  procs = [_train(workdir, steps, 4, [
      "--config.distributed.mode=on", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
      "--config.distributed.cpu_collectives=gloo", "--config.distributed.timeout_s=60"])
           for i in range(2)]
  return _wait(procs)


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


def test_two_processes_checkpoint_restart_and_match_one(tmp_path):
  logs = _two_processes(tmp_path / "multi", 3)
  assert "8 devices" in logs[0]
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "3")
  logs = _two_processes(tmp_path / "multi", 6)  # a restart: resumes from step 3
  assert "Resumed from step 3" in logs[0]
  _wait([_train(tmp_path / "single", 6, 8)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               _params(tmp_path / "multi", 6), _params(tmp_path / "single", 6))


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption service tells every process; all save the same step and stop."""
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "train.py", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}",
           "--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
           "--config.eval_every_epochs=1000", "--config.distributed.mode=on",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
           "--config.distributed.cpu_collectives=gloo", "--config.distributed.timeout_s=60"],
          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    deadline = time.monotonic() + 300
    while "step 3/400" not in logs[1].read_text():  # synchronise on the log, not on time
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          logs[1].read_text()[-3000:]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only one host is told
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  texts = [log.read_text() for log in logs]
  assert codes == [128 + signal.SIGTERM] * 2, [t[-2000:] for t in texts]
  saved = sorted(int(n) for n in os.listdir(tmp_path / "run" / "checkpoints") if n.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 400, saved
  for text in texts:
    assert f"Stopped by SIGTERM after step {saved[0]}" in text
