"""Silent corruption is caught: a checksum of every saved array, and a finiteness check.

``checksums(state)`` is computed on the device when a step is saved and written into that step's
metadata (committed atomically with the arrays); ``problems(state, checksums)`` recomputes it
after a restore. Each array's checksum is two sums of its bits as uint32, one of them weighted by
position: integer sums wrap around exactly in any order, so the value does not depend on the mesh,
the sharding or the backend, and any flipped bits change it (but for chance, 1 in 2^64).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

_WEIGHT = np.uint32(2654435761)  # an odd multiplier (Knuth's): positions weigh differently


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _bits(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)


@jax.jit
def _sums(tree: Any) -> Any:
  def one(x):
    bits = _bits(x)
    position = jnp.arange(bits.size, dtype=jnp.uint32) * _WEIGHT + np.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * position, dtype=jnp.uint32)])
  return jax.tree.map(one, tree)


def _on_host(tree: Any) -> bool:
  """Every leaf is numpy, or a jax array whose every shard is in this process on a CPU."""
  def here(x):
    if not isinstance(x, jax.Array):
      return True
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())
  return all(here(x) for x in jax.tree.leaves(tree))


def _host_sums(tree: Any) -> Any:
  """``_sums`` in numpy: uint32 sums wrap around as XLA's do."""
  def one(x):
    x = np.asarray(x)
    if x.dtype == np.bool_:
      bits = x.astype(np.uint32).reshape(-1)
    else:
      bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
      bits = bits.astype(np.uint32).reshape(-1)
    position = np.arange(bits.size, dtype=np.uint32) * _WEIGHT + np.uint32(1)
    return np.stack([np.sum(bits, dtype=np.uint32), np.sum(bits * position, dtype=np.uint32)])
  return jax.tree.map(one, tree)


def checksums(state: Any) -> dict[str, list[int]]:
  """``{array path: [sum, weighted sum]}`` of every array of ``state``."""
  sums = _host_sums(state) if _on_host(state) else jax.device_get(_sums(state))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {_name(path): [int(v) for v in np.asarray(value)] for path, value in flat}


@jax.jit
def _finite(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating)
                      else jnp.array(True), tree)


def problems(state: Any, expected: Optional[dict[str, list[int]]]) -> Optional[str]:
  """Why a restored ``state`` must not be trained on (checksum mismatch, NaN/Inf), or None."""
  if expected is not None:
    got = checksums(state)
    wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    if wrong:
      return (f"the checksums of {len(wrong)} array(s) do not match what was saved (silent "
              f"corruption on disk): {', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''}")
  if _on_host(state):
    finite = jax.tree.map(lambda x: bool(np.isfinite(np.asarray(x)).all())
                          if jnp.issubdtype(x.dtype, jnp.floating) else True, state)
  else:
    finite = jax.device_get(_finite(state))
  bad = [_name(path) for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not ok]
  if bad:
    return f"{len(bad)} array(s) hold NaN or Inf: {', '.join(bad[:5])}"
  return None
