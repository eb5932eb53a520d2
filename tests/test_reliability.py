"""Failures and recovery: signals, kills mid-save, corrupt and foreign checkpoints, workdirs of
another run, non-finite losses and full disks. Real signals go to real ``train.py`` children,
synchronised on log lines and files (the fault hooks of ``faults.py``), never on sleeps."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dynamixer_jax.train import checkpointing, loop, preemption
from test_train import ROOT, tiny_config

TINY = os.path.join(ROOT, "tests", "tiny_mock_config.py")
CHILD_TIMEOUT_S = 240


def _child_env(**extra):
  # One CPU device in the children: faster to start than the 8 fake devices of the tests.
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **extra)


def _start(workdir, *overrides, **env):
  log = open(os.path.join(str(workdir) + ".log"), "w")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, "train.py", f"--config={TINY}", f"--workdir={workdir}", *overrides],
      cwd=ROOT, env=_child_env(**env), stdout=log, stderr=subprocess.STDOUT)
  return proc, log.name


def _wait_for(condition, proc, what):
  """Poll ``condition()`` until it holds; fail if the child exits first or time runs out."""
  deadline = time.monotonic() + CHILD_TIMEOUT_S
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited ({proc.returncode}) before {what}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _read(path):
  with open(path) as f:
    return f.read()


def _finish(proc, log):
  try:
    proc.wait(timeout=CHILD_TIMEOUT_S)
  finally:
    proc.kill()
  return proc.returncode, _read(log)


def _run_child(workdir, *overrides, **env):
  proc, log = _start(workdir, *overrides, **env)
  return _finish(proc, log)


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


# ------------------------------------------------------------------------------- preemption


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_next_start_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc, log = _start(workdir, "--config.num_train_steps=200", "--config.checkpoint_every_steps=1000",
                     "--config.eval_every_epochs=100")
  _wait_for(lambda: "step 3/200" in _read(log), proc, "step 3")
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc, log)
  assert code == 128 + signal.SIGTERM, out[-3000:]
  saved = _steps(workdir)
  assert len(saved) == 1 and 3 <= saved[0] < 200, saved  # the step it was at, not a periodic one
  assert f"Stopped by SIGTERM after step {saved[0]}" in out
  code, out = _run_child(workdir, f"--config.num_train_steps={saved[0] + 2}")
  assert code == 0, out[-3000:]
  assert f"Resumed from step {saved[0]}" in out
  assert _steps(workdir)[-1] == saved[0] + 2


def test_sigint_stops_at_a_step_boundary_and_twice_interrupts():
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.should_stop(2) and watcher.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
  assert preemption.Preempted(signal.SIGINT, 5, "d").exit_code == 130


@pytest.mark.slow
def test_ctrl_c_stops_at_the_next_step_and_twice_exits_at_once_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  proc, log = _start(workdir, "--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
                     "--config.eval_every_epochs=100")
  _wait_for(lambda: "step 3/400" in _read(log), proc, "step 3")
  at_signal = max(int(n) for n in re.findall(r"step (\d+)/400", _read(log)))
  proc.send_signal(signal.SIGINT)
  code, out = _finish(proc, log)
  assert code == 130, out[-3000:]
  stopped = int(re.search(r"Stopping: saving step (\d+)\.", out).group(1))
  assert at_signal <= stopped <= at_signal + 3, (at_signal, stopped)  # the next step, not later
  assert f"Stopped by SIGINT after step {stopped}: saved, exiting" in out
  assert _steps(workdir) == [stopped] and "Traceback" not in out

  # A second Ctrl-C while the save is under way (held there by the fault hook) exits at once.
  workdir = tmp_path / "again"
  proc, log = _start(workdir, "--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
                     "--config.eval_every_epochs=100", DYNAMIXER_FAULTS="save_pause@1+")
  _wait_for(lambda: "step 3/400" in _read(log), proc, "step 3")
  proc.send_signal(signal.SIGINT)
  _wait_for(lambda: glob.glob(str(workdir / "fault_paused_at_*")), proc, "the stop's save")
  proc.send_signal(signal.SIGINT)
  code, out = _finish(proc, log)
  assert code == 130, out[-3000:]
  assert "Interrupted again: exiting now" in out and "Traceback" not in out, out[-3000:]
  assert _steps(workdir) == []  # nothing half-written is a checkpoint


@pytest.mark.slow
def test_the_signal_handlers_are_restored_when_the_loop_returns(tmp_path):
  """train_and_evaluate in a process of its own (never in pytest's): the SIGTERM and SIGINT
  handlers after it are the ones before it."""
  code = ("import signal, sys\n"
          "from dynamixer_jax import recipes\n"
          "from dynamixer_jax.train import loop\n"
          "before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]\n"
          "config = recipes.load(sys.argv[1])\n"
          "config.num_train_steps = 2\n"
          "loop.train_and_evaluate(config, sys.argv[2])\n"
          "after = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]\n"
          "print('restored' if after == before else f'changed: {before} -> {after}')\n")
  result = subprocess.run([sys.executable, "-c", code, TINY, str(tmp_path / "run")], cwd=ROOT,
                          env=_child_env(), capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
  assert result.returncode == 0 and result.stdout.strip().endswith("restored"), (
      result.stdout + result.stderr[-3000:])


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  proc, log = _start(workdir, "--config.num_train_steps=10", "--config.eval_every_epochs=100",
                     DYNAMIXER_FAULTS="save_pause@4")
  marker = tmp_path / "run" / "fault_paused_at_4"
  _wait_for(marker.exists, proc, "the save of step 4 to pause")
  assert glob.glob(str(workdir / "checkpoints" / "4.orbax-checkpoint-tmp*"))  # half written
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=CHILD_TIMEOUT_S)
  assert _steps(workdir) == [2]
  code, out = _run_child(workdir, "--config.num_train_steps=6")
  assert code == 0, out[-3000:]
  assert "Resumed from step 2" in out and _steps(workdir) == [2, 4, 6]


# --------------------------------------------------------------- corrupt and foreign checkpoints


def _train(config, workdir, steps):
  with config.unlocked():
    config.num_train_steps = steps
  return loop.train_and_evaluate(config, str(workdir), handle_signals=False)


def test_a_corrupt_latest_checkpoint_is_skipped_for_the_newest_good_one(tmp_path, caplog):
  _train(tiny_config(), tmp_path, 4)  # checkpoints 2 and 4
  for path in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:  # truncate every file of the newest step
        f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.INFO):
    state = _train(tiny_config(), tmp_path, 6)
  assert int(state.step) == 6
  assert "Checkpoint step 4" in caplog.text and "cannot be read" in caplog.text
  assert "Resumed from step 2" in caplog.text
  assert glob.glob(str(tmp_path / "checkpoints.corrupt" / "4-*"))
  assert _steps(tmp_path) == [2, 4, 6]  # step 4 written again


def test_a_checkpoint_of_another_model_is_refused_with_keys_and_shapes(tmp_path):
  _train(tiny_config(), tmp_path, 2)
  other = tiny_config()
  other.model.entries = ((1, 16, 2, 2, 2.0, True), (1, 48, 4, 2, 2.0, False))
  with pytest.raises(ValueError, match=r"another configuration:\n  config.model.entries"):
    _train(other, tmp_path, 4)
  other.force_resume = True  # the user insists: the weights still cannot fit
  with pytest.raises(ValueError, match=r"does not fit the model:\n  26 shapes differ .*: "
                                       r"head/kernel \(32, 10\) vs \(48, 10\)"):
    _train(other, tmp_path, 4)


def test_a_workdir_of_another_run_is_refused_unless_forced(tmp_path, caplog):
  _train(tiny_config(), tmp_path, 2)
  for field, value in (("seed", 7), ("batch_size", 8), ("data.name", "cifar100")):
    config = tiny_config()
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ValueError, match=f"config.{field}: .* in the saved run, .* now"):
      _train(config, tmp_path, 4)
  config = tiny_config()
  config.optim.lr = 1e-3
  config.force_resume = True
  with caplog.at_level(logging.WARNING):
    assert int(_train(config, tmp_path, 3).step) == 3
  assert "force_resume: resuming despite config.optim.lr" in caplog.text
  config = tiny_config()  # what may change freely: mesh, length, cadence
  config.optim.lr = 1e-3  # the run's own value since the forced resume
  config.mesh = {"data": 2, "fsdp": 4}
  config.log_every_steps = config.eval_every_epochs = 1
  assert int(_train(config, tmp_path, 4).step) == 4


# --------------------------------------------------------------------------- numerical faults


def test_a_non_finite_loss_stops_with_the_step_and_the_last_finite_metrics(tmp_path):
  config = tiny_config()
  config.optim.lr = 1e12
  config.schedule.warmup_epochs = 0
  config.log_every_steps = 100  # found at the checkpoint step, before anything is saved
  with pytest.raises(FloatingPointError) as info:
    _train(config, tmp_path, 12)
  message = str(info.value)
  bad_step = int(message.split("Non-finite training metrics at step ")[1].split(":")[0])
  assert "Last finite metrics: step" in message and "loss" in message
  saved = _steps(tmp_path)
  assert f"the newest good checkpoint is step {saved[-1] if saved else None}" in message
  assert all(s < bad_step for s in saved)
  for step in saved:  # nothing non-finite was ever written
    state, _ = checkpointing.Checkpointer(str(tmp_path / "checkpoints")).restore(None, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------------------------------- disk


def test_a_failed_save_is_logged_and_retried_at_the_next_interval(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("DYNAMIXER_FAULTS", "save_enospc@4")
  with caplog.at_level(logging.ERROR):
    state = _train(tiny_config(), tmp_path, 8)
  assert int(state.step) == 8
  assert "CHECKPOINT NOT SAVED: writing step 4" in caplog.text and "No space left" in caplog.text
  assert _steps(tmp_path) == [2, 6, 8]
  checkpointing.Checkpointer(str(tmp_path / "checkpoints")).close()  # the next start cleans up
  deadline = time.monotonic() + 60  # orbax removes the partial step in the background
  while glob.glob(str(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp*")):
    assert time.monotonic() < deadline, "the partial step 4 was not removed"
    time.sleep(0.05)


@pytest.mark.slow
def test_failed_saves_in_a_row_stop_the_run_with_the_previous_checkpoint_intact(tmp_path):
  code, out = _run_child(tmp_path / "run", "--config.num_train_steps=20",
                         "--config.max_checkpoint_failures=2", "--config.eval_every_epochs=100",
                         DYNAMIXER_FAULTS="save_enospc@4+")
  assert code == 1, out[-3000:]
  assert "2 checkpoint writes in a row failed" in out and "newest good checkpoint is step 2" in out
  # One message, no traceback through our code (orbax's own writer threads of the failed step may
  # still log their shutdown after it: that is theirs, not a crash of the run).
  stopped = out.split("train.py stopped:")[-1]
  assert "dynamixer_jax" not in stopped and "train.py\", line" not in stopped
  assert _steps(tmp_path / "run") == [2]
  meta = json.loads(checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"))
                    .metadata(2)["config"])
  assert meta["max_checkpoint_failures"] == 2
