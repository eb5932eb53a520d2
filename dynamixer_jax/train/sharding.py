"""The device mesh from the config, shardings of the train state, and global batches.

The mesh is built with ``jax.sharding.Mesh``, whose axes are Auto: we only pin the shardings of
the state and the batch, and the compiler propagates the rest (inserting the FSDP all-gathers
and reduce-scatters). This works unchanged on jax 0.10 to 0.12; Explicit axes (the default of
``jax.make_mesh`` on 0.12) would need ``jax.set_mesh`` and are not used. Batches are split along
every mesh axis; parameters and optimizer state are sharded along ``fsdp`` by the config's
partition rules, or replicated.
"""

import dataclasses
import functools
import math
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PARTITION_RULES = ("fsdp", "replicate")  # the rule of a config.partition_rules entry
DISTRIBUTED_MODES = ("auto", "on", "off")  # config.distributed.mode


def initialize_distributed(dist: ml_collections.ConfigDict) -> None:
  """Join the other processes of a multi-host job through JAX's own distributed runtime.

  ``dist.mode``: 'off'; 'on' (explicit coordinator_address / num_processes / process_id, or
  whatever JAX auto-detects: TPU pods, SLURM, ...); 'auto' = 'on' when a coordinator is given or
  SLURM runs more than one task, else 'off'. A missing peer fails after ``dist.timeout_s``.
  """
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
  if dist.mode == "off" or (dist.mode == "auto" and not dist.coordinator_address
                            and slurm_tasks <= 1):
    return
  if dist.mode not in DISTRIBUTED_MODES:
    raise ValueError(f"config.distributed.mode={dist.mode!r}: use one of {DISTRIBUTED_MODES}.")
  if dist.cpu_collectives:  # e.g. 'gloo', for several CPU processes on one machine
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  explicit = dict(coordinator_address=dist.coordinator_address or None,
                  num_processes=dist.num_processes if dist.num_processes > 0 else None,
                  process_id=dist.process_id if dist.process_id >= 0 else None)
  jax.distributed.initialize(**explicit, initialization_timeout=dist.timeout_s)
  if dist.cpu_collectives == "gloo" and _is_loopback(dist.coordinator_address):
    _bind_gloo_to_loopback()


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _is_loopback(address: str) -> bool:
  return address.rpartition(":")[0] in LOOPBACK_HOSTS


def _bind_gloo_to_loopback() -> None:
  """All processes on this machine: gloo's TCP pairs listen on 127.0.0.1.

  By default gloo binds the address this machine's hostname resolves to, which on some hosts is
  not an interface the processes can reach each other on (seen in CI: the first collective
  failed with "Gloo context initialization failed: Connect timeout"). JAX has no public setting
  for it, so the CPU backend is registered again with gloo collectives bound to loopback; this
  must happen before the first ``jax.devices()``.
  """
  try:  # private pieces of jax 0.10 (checked up to 0.10.2); without them, gloo's default bind
    from jax._src import distributed as jax_distributed, xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=jax_distributed.global_state.client, hostname="127.0.0.1")
    registration = xla_bridge._backend_factories["cpu"]  # pylint: disable=protected-access
  except (ImportError, AttributeError, KeyError, TypeError) as e:
    logging.warning("Could not bind gloo to 127.0.0.1 (%s); it binds what the hostname resolves "
                    "to.", e)
    return
  xla_bridge._backend_factories["cpu"] = dataclasses.replace(  # pylint: disable=protected-access
      registration, factory=functools.partial(xla_bridge.make_cpu_client, collectives=collectives))


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


def per_process_batch(global_batch: int, mesh: Mesh) -> int:
  """This process's share of a global batch (``configlib.check_devices`` checked it divides)."""
  if global_batch % mesh.devices.size:
    raise ValueError(f"A global batch of {global_batch} does not split over the "
                     f"{mesh.devices.size} devices of the mesh.")
  return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy arrays -> global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def leaf_spec(shape: Sequence[int], mesh: Mesh, rule: str, min_size: int) -> P:
  """``'fsdp'``: split the largest dimension that the ``fsdp`` axis divides; else replicate."""
  fsdp = dict(mesh.shape).get("fsdp", 1)
  if rule == "replicate" or fsdp == 1 or math.prod(shape) < min_size:
    return P()
  if rule not in PARTITION_RULES:
    raise ValueError(f"Unknown partition rule {rule!r}: use one of {PARTITION_RULES}.")
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = ((".*", "fsdp"),),
                    min_size: int = 2 ** 14) -> Any:
  """A ``NamedSharding`` for every leaf of the state, from the first rule whose regex matches
  its path (e.g. ``opt_state/0/mu/network_0_0/mlp/fc1/kernel``). Adam's moments have their
  parameters' shapes, so they are split the same way."""
  def sharding_of(path, leaf):
    name = "/".join(_key_name(k) for k in path)
    rule = next((r for pattern, r in rules if re.search(pattern, name)), "replicate")
    return NamedSharding(mesh, leaf_spec(leaf.shape, mesh, rule, min_size))

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_state)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
  return create_mesh(dict(config.mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
