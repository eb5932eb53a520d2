"""Where the config files are: the checkout's ``configs/``, or the copy installed with the package.

``train.py --config=configs/NAME.py`` is the documented path in a checkout; a notebook or a script
elsewhere (an installed package, a kernel started in ``colabs/``) asks ``path('NAME')``.
"""

import importlib.resources
import importlib.util
import os
from typing import Optional

import ml_collections



def path(name: str) -> str:
  """The file of recipe ``name`` (e.g. 'cifar_finetune'), checkout first, then installed."""
  filename = name if name.endswith(".py") else f"{name}.py"
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  candidates = [os.path.join(checkout, filename)]
  try:
    candidates.append(str(importlib.resources.files("dynamixer_jax.configs") / filename))
  except ModuleNotFoundError:
    pass
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  available = sorted(f[:-3] for f in os.listdir(checkout) if f.endswith(".py")
                     and not f.startswith("_")) if os.path.isdir(checkout) else []
  raise FileNotFoundError(f"No recipe {name!r} (looked in {', '.join(candidates)}); the "
                          f"recipes are: {', '.join(available) or 'none found'}.")


def load(name: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of recipe ``name`` (a name or a file path), as ``train.py
  --config=FILE:ARG`` would build it."""
  file = name if os.path.isfile(name) else path(name)
  spec = importlib.util.spec_from_file_location(f"recipe_{os.path.basename(file)[:-3]}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
