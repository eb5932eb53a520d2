"""The house rules, read off every import in the package (function-level imports too):
no cycle, the models import nothing else of ours, the TensorFlow side imports no flax, optax or
model, and the train step, sharding, models, converters and benchmark import no TensorFlow."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dynamixer_jax"


def _modules() -> dict[str, str]:
  """Every module of the package: dotted name -> file."""
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for file in files:
      if file.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
        found[rel.removesuffix(".__init__")] = os.path.join(folder, file)
  return found


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
  """(package modules, top-level third-party names) that module ``name`` imports anywhere."""
  tree = ast.parse(open(MODULES[name]).read())
  ours, theirs = set(), set()
  base = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]

  def add(target: str) -> None:
    if target.split(".")[0] != PACKAGE:
      theirs.add(target.split(".")[0])
      return
    while target not in MODULES:  # 'from pkg.mod import function': the module is pkg.mod
      target = target.rpartition(".")[0]
    ours.add(target)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        module = ".".join(base.split(".")[:len(base.split(".")) - node.level + 1] + [module])
      for alias in node.names:
        full = f"{module}.{alias.name}"
        add(full if full in MODULES else module)
  ours.discard(name)
  return ours, theirs


GRAPH = {name: _imports(name) for name in MODULES}


def _closure(name: str) -> set[str]:
  """Every package module that importing ``name`` runs, its parent packages' __init__ included."""
  seen, todo = set(), [name]
  while todo:
    module = todo.pop()
    if module in seen:
      continue
    seen.add(module)
    parts = module.split(".")
    todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the parents run first
    todo += GRAPH[module][0]
  return seen


def _third_party(name: str) -> set[str]:
  return set().union(*(GRAPH[m][1] for m in _closure(name)))


def test_no_import_cycle_among_the_package_modules():
  state = {}

  def visit(module, path):
    state[module] = "open"
    for target in sorted(GRAPH[module][0]):
      if state.get(target) == "open":
        pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
      if target not in state:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(MODULES):
    if module not in state:
      visit(module, [module])


def test_the_models_import_nothing_else_of_the_package():
  for module in (m for m in MODULES if m.startswith(f"{PACKAGE}.models")):
    others = {m for m in _closure(module) if not m.startswith(f"{PACKAGE}.models")}
    assert others <= {PACKAGE}, (module, others)  # only the package's own (light) __init__
    assert not _third_party(module) & {"orbax", "torch", "tensorflow", "tensorflow_datasets"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(f"{PACKAGE}.data")
                                          or m == f"{PACKAGE}.preprocessing"))
def test_the_tensorflow_side_imports_no_jax_flax_optax_or_model(module):
  banned = {f"{PACKAGE}.{room}" for room in ("models", "train", "weights", "augment", "benchmark")}
  assert not {m for m in _closure(module) if m.rpartition(".")[0] in banned or m in banned}
  assert not _third_party(module) & {"jax", "flax", "optax", "orbax", "einops", "clu"}


NO_TENSORFLOW = [f"{PACKAGE}.train.steps", f"{PACKAGE}.train.sharding", f"{PACKAGE}.train.optim",
                 f"{PACKAGE}.train.configlib", f"{PACKAGE}.train.checkpointing",
                 f"{PACKAGE}.models", f"{PACKAGE}.weights", f"{PACKAGE}.weights.official",
                 f"{PACKAGE}.augment.mixing", f"{PACKAGE}.benchmark.timing",
                 f"{PACKAGE}.benchmark.__main__", f"{PACKAGE}.benchmark.flops"]


@pytest.mark.parametrize("module", NO_TENSORFLOW)
def test_the_accelerator_side_imports_no_tensorflow(module):
  assert not _third_party(module) & {"tensorflow", "tensorflow_datasets", "clu"}, module


def test_at_run_time_too():
  """What Python really loads: the accelerator side without TensorFlow, the data side without
  jax (transitive imports of the libraries themselves included)."""
  code = ("import sys, importlib\n"
          "for name in sys.argv[2:]: importlib.import_module(name)\n"
          "banned = tuple(sys.argv[1].split(','))\n"
          "print(sorted(m for m in sys.modules if m.startswith(banned)))\n")
  # (TensorFlow itself imports jax, through Keras: not ours to change.)
  data_banned = f"flax,optax,orbax,{PACKAGE}.models,{PACKAGE}.train,{PACKAGE}.weights"
  for banned, modules in (("tensorflow,tensorflow_datasets,clu", NO_TENSORFLOW),
                          (data_banned, [f"{PACKAGE}.data.pipeline"])):
    out = subprocess.run([sys.executable, "-c", code, banned, *modules], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", (
        out.stdout + out.stderr[-2000:])
