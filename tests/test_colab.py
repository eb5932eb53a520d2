"""The fine-tuning notebook runs top to bottom (smoke settings) with papermill, from its own
folder as Jupyter starts its kernel, and the executed notebook shows its progress and its plots."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cifar_finetune_notebook_runs_and_shows_its_plots(tmp_path):
  pytest.importorskip("papermill", reason="papermill is in the [dev] extra")
  # A kernelspec that resolves to this interpreter, inside the temp dir: no manual setup in CI.
  subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(tmp_path / "k"),
                  "--name", "python3"], check=True, capture_output=True, timeout=120)
  env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "k" / "share" / "jupyter"),
             PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")  # 4 smoke steps
  executed = tmp_path / "out.ipynb"
  result = subprocess.run([sys.executable, "-m", "papermill", "cifar_finetune.ipynb",
                           str(executed), "-p", "smoke", "True", "-k", "python3",
                           "--cwd", os.path.join(ROOT, "colabs")],
                          cwd=os.path.join(ROOT, "colabs"), env=env, capture_output=True,
                          text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-4000:]
  cells = json.loads(executed.read_text())["cells"]
  outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
  text = "".join("".join(o.get("text", "")) for o in outputs)
  assert "final top-1" in text
  assert "step 4/4" in text  # the training cell shows its progress
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2, "the executed notebook holds no plots"  # the curves and the grid
