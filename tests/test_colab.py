"""The fine-tuning notebook runs top to bottom (smoke settings) with papermill."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cifar_finetune_notebook_runs(tmp_path):
  papermill = pytest.importorskip("papermill")
  # A kernelspec that resolves to this interpreter, inside the temp dir: no manual setup in CI.
  subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(tmp_path / "k"),
                  "--name", "python3"], check=True, capture_output=True, timeout=120)
  env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "k" / "share" / "jupyter"),
             PYTHONPATH=ROOT, XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-m", "papermill", "colabs/cifar_finetune.ipynb",
                           str(tmp_path / "out.ipynb"), "-p", "smoke", "True", "-k", "python3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "final top-1" in open(tmp_path / "out.ipynb").read()
  del papermill
