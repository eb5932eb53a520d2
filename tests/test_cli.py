"""Every command speaks in one line: a user's mistake ends with what was wrong, the value and
what to do, exit status 1 and no traceback; nothing wrong is silently accepted.

Each command is run once as a real child process; the other mistakes go through the same
``cli.run`` wrapper in this process (the same code path, without paying a Python start each).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_COMPILE, load_fixture
from dynamixer_jax import cli, convert, evaluate, predict, weights
from dynamixer_jax.weights import metadata as metadata_lib
from dynamixer_jax.weights import official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_mock_config.py")


def _child(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_line_error(result, *expected):
  assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
  assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
  for text in expected:
    assert text in result.stderr, result.stderr
  lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
  assert len(lines) <= 3, result.stderr  # the message and the DYNAMIXER_TRACEBACK hint
  return result.stderr


def _in_process(main, prog, argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, prog, [str(a) for a in argv])
  captured = capsys.readouterr()
  return subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model, variables = official.load_torch_dynamixer(load_fixture("dynamixer_tiny.npz")["params"])
  out = tmp_path_factory.mktemp("weights") / "tiny"
  weights.save(str(out), variables, metadata_lib.for_official(model, "tiny"))
  return out


# --------------------------------------------------------------------------------- train.py


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["--config=configs/nonexistent.py"], ["no such config file 'configs/nonexistent.py'"]),
    ([f"--config={TINY}", "--config.optim.lrr=1"], ["lrr", "did you mean \"lr\""]),
    (["--config=configs/quickstart.py:foo"],
     ["configs/quickstart.py takes no arguments after the colon; got 'foo'"]),
    (["--config=configs/cifar_finetune.py:datset=cifar10"],
     ["Bad config argument 'datset=cifar10'", "dataset, init, model"]),
    ([f"--config={TINY}", "--workdir=README.md"], ["--workdir=README.md is a file"]),
], ids=["missing_config", "mistyped_field", "quickstart_arg", "finetune_arg", "workdir_file"])
def test_train_py_mistakes_are_one_line(args, expected):
  _one_line_error(_child("train.py", *args), *expected)


@pytest.mark.slow
def test_print_config_lists_every_field_and_exits():
  result = _child("train.py", "--config=configs/quickstart.py", "--print_config")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "data_dir" in result.stdout and "eval_crop" in result.stdout
  help_text = _child("train.py", "--helpfull").stdout
  assert "--print_config" in help_text and "--config.<field>=<value>" in help_text


# --------------------------------------------------------------------------------- commands


@pytest.mark.slow
def test_each_command_reports_a_missing_checkpoint_in_one_line(tmp_path):
  image = tmp_path / "x.png"
  Image.new("RGB", (8, 8)).save(image)
  missing = tmp_path / "nothing"
  for args in (["-m", "dynamixer_jax.predict", "--checkpoint", missing, image],
               ["-m", "dynamixer_jax.evaluate", "--checkpoint", missing, "--dataset", "digits"],
               ["-m", "dynamixer_jax.convert", "--to_torch", missing, tmp_path / "o.pth"]):
    _one_line_error(_child(*args), f"No checkpoint at {str(missing)!r}")


def test_predict_mistakes(saved, tmp_path, capsys):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  image = tmp_path / "ok.png"
  Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
  run = lambda *argv: _in_process(predict.main, predict.PROG, argv, capsys)
  _one_line_error(run("--checkpoint", saved, text), f"Cannot read {str(text)!r} as an image")
  _one_line_error(run("--checkpoint", saved, tmp_path / "no.jpg"), "No such image file(s)")
  _one_line_error(run("--checkpoint", saved, image, "--top_k", "11"),
                  "--top_k 11: the model has 10 classes; use 1 to 10")
  _one_line_error(run("--checkpoint", saved, image, "--output", tmp_path / "r.txt"),
                  "give a .json or a .csv file name")
  with pytest.raises(SystemExit) as bad_k:  # argparse: a non-positive count is refused
    predict.main(["--checkpoint", str(saved), str(image), "--top_k", "-1"])
  assert bad_k.value.code == 2 and "-1 is not a positive integer" in capsys.readouterr().err


def test_convert_mistakes(saved, tmp_path, capsys):
  run = lambda *argv: _in_process(convert.main, convert.PROG, argv, capsys)
  not_dynamixer = tmp_path / "other.npz"
  np.savez(not_dynamixer, **{"conv1/kernel": np.zeros((3, 3), np.float32)})
  _one_line_error(run(not_dynamixer, tmp_path / "out"), "not an official MLP-Mixer checkpoint")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "file").write_text("x")
  mixer = tmp_path / "mixer.npz"
  np.savez(mixer, **load_fixture("mixer_tiny.npz")["params"])
  _one_line_error(run(mixer, tmp_path / "taken"), "exists and is not empty")
  names = tmp_path / "names.txt"
  names.write_text("a\nb\n")
  _one_line_error(run(mixer, tmp_path / "new", "--class_names", names),
                  "has 2 names but the model has 10 classes")


def test_evaluate_honours_the_split_or_refuses_it(saved, capsys):
  run = lambda *argv: _in_process(evaluate.main, evaluate.PROG, argv, capsys)
  _one_line_error(run("--checkpoint", saved, "--dataset", "digits", "--split", "holdout"),
                  "config.data.eval_split='holdout': data.name='digits' has the splits "
                  "'train', 'test', 'validation'")
  from dynamixer_jax.data import sources  # pylint: disable=g-import-not-at-top
  data = evaluate.data_config(weights.load(str(saved))[2], "digits", split="train").data
  assert sources.dataset_info(data).num_eval_examples == 1437  # the train split, not held-out
