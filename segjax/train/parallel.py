"""Device mesh and shardings for data-parallel steps (jit with NamedSharding).

One mesh axis, "data": the batch is split over every device of every process and the train
state is replicated. Each process feeds its local slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, name: str = "batch_size") -> int:
  """This process's share of a global batch; the global batch must split over all devices."""
  if global_batch_size % jax.device_count():
    raise ValueError(f"config.{name}={global_batch_size} is the global batch and must be "
                     f"divisible by the number of devices, {jax.device_count()}.")
  return global_batch_size // jax.process_count()


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays, sharded along the batch, from each process's local numpy batch."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
