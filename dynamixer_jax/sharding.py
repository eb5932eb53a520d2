"""The device mesh from the config, and global batches on it.

The mesh is built with ``jax.sharding.Mesh``, whose axes are Auto (the compiler propagates
shardings), so the same code runs on jax 0.10 to 0.12. Batches are split along every mesh axis.
"""

import math
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def create_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """Axes named as in ``config.mesh``; one size may be -1 for "all remaining devices".

  Sizes that multiply to fewer devices than there are use the first ones (``data=1``: one
  device); more than there are is an error.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  names, sizes = list(mesh_config.keys()), list(mesh_config.values())
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(mesh_config)}: sizes must be positive, with at most "
                     "one -1 (all remaining devices).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(f"config.mesh={dict(mesh_config)} does not divide the {devices.size} "
                       "devices.")
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) > devices.size:
    raise ValueError(f"config.mesh={dict(mesh_config)} needs {math.prod(sizes)} devices; "
                     f"{devices.size} are available. Use -1 for one axis to take the rest.")
  return Mesh(devices.flat[:math.prod(sizes)].reshape(sizes), tuple(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_process_batch(global_batch: int, mesh: Mesh, field: str = "batch_size") -> int:
  """This process's share of a global batch, with a clear error when it does not divide."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch % devices:
    raise ValueError(f"config.{field}={global_batch} must be divisible by the number of devices "
                     f"({devices}); pick a multiple of {devices}.")
  return global_batch // processes


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy arrays -> global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
  return create_mesh(dict(config.mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
