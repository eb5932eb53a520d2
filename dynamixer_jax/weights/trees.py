"""Parameter trees: the shapes a model expects, the one comparison of two trees, and assembling
a model's variables from flat weights (with a fresh head when the class count changes).

Every place that asks "do these weights fit this model?" (our checkpoints, official files,
``init_from``) asks ``compare``, so they all answer, and explain, alike.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamixer_jax import models
from dynamixer_jax.models.layers import torch_linear_kernel_init

Path = tuple[str, ...]
Shapes = Mapping[Path, tuple[int, ...]]
Variables = dict[str, Any]


def unfreeze(variables: Any) -> dict[str, Any]:
  return flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else variables


def shapes(tree: Any) -> dict[Path, tuple[int, ...]]:
  """``{path: shape}`` of a nested mapping of arrays (or of orbax's array metadata)."""
  def plain(node):
    return {str(k): plain(node[k]) for k in node.keys()} if hasattr(node, "keys") else node
  flat = flax.traverse_util.flatten_dict(plain(tree))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def expected_param_shapes(model: nn.Module) -> dict[Path, tuple[int, ...]]:
  """Every parameter path of ``model`` and its shape, without computing anything."""
  size = model.image_size or 224
  images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
  return shapes(params)


@dataclasses.dataclass(frozen=True)
class Difference:
  """How a source tree differs from a target tree: paths only in the target (missing), only in
  the source (unexpected), and in both with other shapes (mismatched, as (source, target))."""
  missing: dict[Path, tuple[int, ...]]
  unexpected: dict[Path, tuple[int, ...]]
  mismatched: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]]

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.mismatched)

  def lines(self, source: str = "checkpoint", target: str = "model", limit: int = 10) -> list[str]:
    """One line per kind of difference, naming up to ``limit`` paths with their shapes."""
    name = "/".join
    groups = (
        (f"in the {target}, not in the {source}", self.missing,
         lambda p: f"{name(p)} {self.missing[p]}"),
        (f"in the {source}, not in the {target}", self.unexpected,
         lambda p: f"{name(p)} {self.unexpected[p]}"),
        (f"shapes differ ({source} vs {target})", self.mismatched,
         lambda p: f"{name(p)} {self.mismatched[p][0]} vs {self.mismatched[p][1]}"))
    out = []
    for title, paths, show in groups:
      if paths:
        keys = sorted(paths)
        out.append(f"{len(keys)} {title}: " + ", ".join(show(p) for p in keys[:limit])
                   + (", ..." if len(keys) > limit else ""))
    return out


def compare(source: Shapes, target: Shapes) -> Difference:
  """The one comparison of two ``{path: shape}`` trees."""
  return Difference(
      missing={p: s for p, s in target.items() if p not in source},
      unexpected={p: s for p, s in source.items() if p not in target},
      mismatched={p: (tuple(source[p]), tuple(s)) for p, s in target.items()
                  if p in source and tuple(source[p]) != tuple(s)})


def require_fit(source: Shapes, target: Shapes, what: str, hint: str = "") -> None:
  """Raise ``ValueError`` listing every difference, when ``source`` does not fit ``target``."""
  difference = compare(source, target)
  if difference:
    raise ValueError("\n  ".join([f"{what} does not fit the model:", *difference.lines()])
                     + (f"\n{hint}" if hint else ""))


def fresh_head(model: nn.Module, expected: Shapes, seed: int) -> dict[Path, np.ndarray]:
  """A newly initialised classifier, as the model's own init would make it."""
  kernel_shape = expected[("head", "kernel")]
  if isinstance(model, models.MlpMixer):
    kernel = jnp.zeros(kernel_shape)  # the official Mixer head starts at zero
  else:
    kernel = torch_linear_kernel_init()(jax.random.PRNGKey(seed), kernel_shape)
  return {("head", "kernel"): np.asarray(kernel),
          ("head", "bias"): np.zeros(expected[("head", "bias")], np.float32)}


def assemble(model: nn.Module, params: Mapping[Path, np.ndarray], source: str,
             num_classes: Optional[int] = None, seed: int = 0) -> tuple[nn.Module, Variables]:
  """``(model, variables)`` from flat weights, every path and shape checked against the model.

  With a ``num_classes`` other than the model's, the head is replaced by a fresh one (seeded by
  ``seed``) and the model is cloned with that class count.
  """
  params = dict(params)
  if num_classes is not None and num_classes != model.num_classes:
    params = {p: v for p, v in params.items() if p[0] != "head"}
    model = model.clone(num_classes=num_classes)
    expected = expected_param_shapes(model)
    if num_classes > 0:
      params.update(fresh_head(model, expected, seed))
  else:
    expected = expected_param_shapes(model)
  require_fit({p: tuple(v.shape) for p, v in params.items()}, expected, source)
  tree = flax.traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in params.items()})
  return model, {"params": tree}


def reset_head(model: nn.Module, variables: Variables, num_classes: int,
               seed: int = 0) -> tuple[nn.Module, Variables]:
  """A new ``num_classes`` head, as the model's own init makes it; every other weight kept."""
  flat = {p: np.asarray(v) for p, v in
          flax.traverse_util.flatten_dict(unfreeze(variables)["params"]).items()}
  return assemble(model, flat, "The weights", num_classes, seed)
