"""Data parallelism: a device mesh with jit shardings (the default), or pmap (the legacy path).

`jit` mode: one mesh axis, "data"; the batch is split over every device of every process and
the train state is replicated. Each process feeds its local slice of the global batch.
`pmap` mode: the state is stacked over local devices, each process feeds
(local_devices, per_device_batch, ...) arrays, and steps average over `PMAP_AXIS`.
Both compute batch-norm statistics over the global batch.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from segjax.errors import ConfigError

DATA_AXIS = "data"
PMAP_AXIS = "batch"
PARALLELISMS = ("jit", "pmap")


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins a multi-process run; a no-op for a plain single-process run.

  With no arguments, `jax.distributed.initialize()` finds the cluster itself on Cloud TPU,
  Slurm and Kubernetes; elsewhere give all three (coordinator "host:port").
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
        "Multi-process runs need --coordinator_address, --num_processes and "
        f"--process_id together; got {explicit}."
      )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _on_managed_cluster():
    jax.distributed.initialize()


# Environment variables that mean "this is one process of several", and when they do.
_CLUSTER_ENV = {
  "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),
  "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # A multi-host Cloud TPU slice.
  "SLURM_NTASKS": lambda v: int(v) > 1,
  "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
}


def _on_managed_cluster() -> bool:
  return any(k in os.environ and is_multi(os.environ[k]) for k, is_multi in _CLUSTER_ENV.items())


def check_parallelism(name: str) -> str:
  if name not in PARALLELISMS:
    raise ConfigError(f"Unknown config.parallelism {name!r}; known: {PARALLELISMS}.")
  return name


def make_mesh() -> Mesh:
  return jax.make_mesh(
    (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, name: str = "batch_size") -> int:
  """This process's share of a global batch; the global batch must split over all devices."""
  if global_batch_size % jax.device_count():
    raise ConfigError(
      f"config.{name}={global_batch_size} is the global batch and must be "
      f"divisible by the number of devices, {jax.device_count()}."
    )
  return global_batch_size // jax.process_count()


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays, sharded along the batch, from each process's local numpy batch."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def to_pmap_batch(local_batch: dict) -> dict:
  """(B_local, ...) -> (local_devices, B_local / local_devices, ...) for pmap."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *np.shape(x)[1:]), local_batch)


def _pmap_sharding() -> NamedSharding:
  """The layout of pmap's stacked outputs: this process's devices along `PMAP_AXIS`."""
  return NamedSharding(Mesh(np.array(jax.local_devices()), (PMAP_AXIS,)), P(PMAP_AXIS))


def to_pmap_state(tree):
  """A replicated global pytree -> stacked over local devices, as pmap takes and returns it.

  Laid out as pmap's outputs are: an input of another sharding (`flax.jax_utils.replicate`'s)
  misses pmap's cache, so the second step would compile the whole train step again.
  """
  sharding, n = _pmap_sharding(), jax.local_device_count()

  def stack(x):
    local = np.asarray(x.addressable_shards[0].data)
    return jax.device_put(np.broadcast_to(local, (n, *local.shape)), sharding)

  return jax.tree.map(stack, tree)


def from_pmap_state(tree, mesh: Mesh):
  """A pytree stacked over local devices by pmap -> replicated global arrays on `mesh`.

  Copies one local replica to each device, with no cross-device gather (the replicas of a
  pmap state are identical), through the host: indexing on device compiles per shape.
  """
  sharding = replicated(mesh)

  def convert(x):
    first = np.asarray(x.addressable_shards[0].data)[0]
    copies = [jax.device_put(first, d) for d in mesh.local_devices]
    return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, copies)

  return jax.tree.map(convert, tree)


def first_replica(tree):
  """Host copy of a pmap output that is the same on every device (e.g. after psum)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def fetch(tree):
  """Host numpy copy of replicated global arrays; works when other processes hold devices too."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def local_rows(tree):
  """Host numpy copy of this process's rows of arrays sharded along the batch (`to_global`'s
  inverse): with several processes, a batch-sharded output is global and only partly here."""

  def rows(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])

  return jax.tree.map(rows, tree)


def max_over_processes(value: int) -> int:
  """The largest `value` of all processes (e.g. a batch count all of them must run)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def allgather_json(value) -> list:
  """Every process's JSON-serializable `value`, in process order, on every process.

  Sent as UTF-8 bytes padded to the longest: `process_allgather` needs equal shapes.
  """
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: len(data)] = data
  buffers = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(b[:n])) for b, n in zip(buffers, lengths, strict=True)]
