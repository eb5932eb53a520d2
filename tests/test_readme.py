"""The README cannot document a command that does not parse: every ``python train.py ...`` and
``python -m dynamixer_jax.<tool> ...`` in it (code blocks and inline code) is extracted, its
placeholders replaced by tiny real paths, and its flags and config parsed (a dry run that stops
before anything trains or loads)."""

import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = re.compile(r"python3? (train\.py|-m dynamixer_jax\.[\w.]+)(.*)")


def readme_commands() -> list[tuple[str, list[str]]]:
  """(program, argv) of every command the README shows, placeholders substituted."""
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
  lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
  found = []
  for line in lines:
    for match in START.finditer(line):
      program, rest = match.group(1), re.split(r'"|&&|;|\|', match.group(2))[0]
      rest = (rest.replace("[", " ").replace("]", " ").replace("$RANK", "0")
              .replace("$BUCKET", "bucket").replace("~/", "/tmp/"))
      found.append((program.removeprefix("-m "), shlex.split(rest)))
  return found


COMMANDS = readme_commands()


def test_the_readme_documents_every_command():
  programs = {program for program, _ in COMMANDS}
  assert {"train.py", "dynamixer_jax.convert", "dynamixer_jax.evaluate", "dynamixer_jax.predict",
          "dynamixer_jax.benchmark", "dynamixer_jax.input_tools"} <= programs, programs
  assert any("--config.data.data_dir=/path/to/tensorflow_datasets" in argv
             for program, argv in COMMANDS if program == "train.py")


@pytest.mark.parametrize("program,argv", [c for c in COMMANDS if c[0].startswith("dynamixer_jax.")
                                          and c[0] != "dynamixer_jax.input_tools"],
                         ids=lambda c: " ".join(c) if isinstance(c, list) else c)
def test_each_tool_command_parses(program, argv):
  module = importlib.import_module(program.replace(".benchmark", ".benchmark.timing")
                                   if program == "dynamixer_jax.benchmark" else program)
  module.build_parser().parse_args(argv)


_PARSE_ONE = """
import sys, json
from absl import flags
argv = json.loads(sys.argv[1])
sys.argv = ["{module}"] + argv  # ml_collections reads the --config.<field> overrides from here
import {module} as program  # defines the flags
flags.FLAGS([program.__file__] + argv)
flags.FLAGS.config  # the config file is loaded and every override applied
print("parsed", flags.FLAGS["config"].config_filename)
"""


@pytest.mark.slow
def test_each_absl_command_parses_its_flags_and_config():
  """train.py and input_tools, each command in its own process (as a user runs it), all at once."""
  import json  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
  modules = {"train.py": "train", "dynamixer_jax.input_tools": "dynamixer_jax.input_tools"}
  commands = [(p, argv) for p, argv in COMMANDS if p in modules]
  assert len({p for p, _ in commands}) == 2
  procs = [subprocess.Popen([sys.executable, "-c", _PARSE_ONE.format(module=modules[p]),
                             json.dumps(argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for p, argv in commands]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for (program, argv), proc, (out, err) in zip(commands, procs, outputs):
    assert proc.returncode == 0 and "parsed" in out, (program, argv, err[-2000:])
