"""Data parallelism: a device mesh with jit shardings (the default), or pmap (the legacy path).

`jit` mode: one mesh axis, "data"; the batch is split over every device of every process and
the train state is replicated. Each process feeds its local slice of the global batch.
`pmap` mode: the state is stacked over local devices, each process feeds
(local_devices, per_device_batch, ...) arrays, and steps average over `PMAP_AXIS`.
Both compute batch-norm statistics over the global batch.

This module is the only one that knows the mode. `runner(config, mesh)` turns a per-device
step into a jitted-and-sharded or a pmapped one and converts state, batches and outputs to
and from its layout. A pmapped step is traced inside `segjax.layers.norms.cross_device_axis`
(`per_device`): its BatchNorms average their statistics over the devices, and the helpers
`fold_in_device`, `mean_over_devices` and `as_global_mean` that a step or a loss calls act
over the devices there and are the identity under jit, where arrays are global already.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from segjax.errors import ConfigError
from segjax.layers import conv, norms
from segjax.train import xla_options

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


def per_device(fn):
  """`fn` traced as one device's part of a pmapped step: inside
  `norms.cross_device_axis(PMAP_AXIS)`, so that its BatchNorms and the helpers below average
  over the devices."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with norms.cross_device_axis(PMAP_AXIS):
      return fn(*args, **kwargs)

  return traced


def fold_in_device(rng: jax.Array) -> jax.Array:
  """`rng` folded with the device index in a pmapped step (independent dropout and sampling
  per device); `rng` itself under jit."""
  axis = norms.current_axis()
  return rng if axis is None else jax.random.fold_in(rng, jax.lax.axis_index(axis))


def mean_over_devices(tree):
  """The mean over devices of a pytree in a pmapped step (`lax.pmean`); `tree` under jit."""
  axis = norms.current_axis()
  return tree if axis is None else jax.lax.pmean(tree, axis)


def as_global_mean(tree, count: jax.Array):
  """Means over this device's `count` items, rescaled in a pmapped step by its share of all
  devices' items, so that their mean over devices (`mean_over_devices`) is the mean over the
  global batch, as one device computes it, however unevenly the items fall; `tree` under
  jit."""
  axis = norms.current_axis()
  if axis is None:
    return tree
  share = count * jax.lax.psum(1, axis) / jnp.maximum(jax.lax.psum(count, axis), 1)
  return jax.tree.map(lambda x: x * share, tree)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over `DATA_AXIS` of the first `num_devices` devices (default all), its axis
  of type Auto (jax >= 0.12 makes meshes Explicit by default)."""
  n = jax.device_count() if num_devices is None else num_devices
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


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


class JitRunner:
  """Steps jitted over `mesh`: the state replicated, batches split along `DATA_AXIS` of
  every device of every process, outputs replicated; compiled with XLA `compiler_options`,
  their convolutions traced as `cpu_convolutions` says (`segjax.train.xla_options`)."""

  def __init__(
    self, mesh: Mesh, compiler_options: dict | None = None, cpu_convolutions: str = "xla"
  ):
    self.mesh = mesh
    self.compiler_options = compiler_options
    self.cpu_convolutions = cpu_convolutions

  def traced(self, fn):
    """`fn` with its convolutions as `cpu_convolutions` says when a step traces it."""
    return conv.traced_with(self.cpu_convolutions, fn)

  def train_step(self, step):
    """`step(state, batch, rng) -> (state, metrics)` compiled, donating the state."""
    r, d = replicated(self.mesh), data_sharded(self.mesh)
    return jax.jit(
      self.traced(step),
      in_shardings=(r, d, r),
      out_shardings=(r, r),
      donate_argnums=0,
      compiler_options=self.compiler_options,
    )

  def sum_step(self, step):
    """`step(variables, batch) -> sums over the batch` compiled: sums of the global batch."""
    r = replicated(self.mesh)
    return jax.jit(
      self.traced(step),
      in_shardings=(r, data_sharded(self.mesh)),
      out_shardings=r,
      compiler_options=self.compiler_options,
    )

  def batch(self, local_batch: dict) -> dict:
    """This process's numpy batch as the compiled steps take it."""
    return to_global(local_batch, self.mesh)

  def to_run_state(self, tree):
    """Replicated global arrays (what checkpoints hold) in the layout the steps take."""
    return tree

  def to_global_state(self, tree):
    """`to_run_state`'s inverse."""
    return tree

  def fetch(self, tree):
    """Host numpy copy of a step's replicated output."""
    return fetch(tree)


class PmapRunner(JitRunner):
  """Steps pmapped over this process's devices along `PMAP_AXIS` and traced `per_device`: the
  state stacked over the devices, each device a slice of the batch; a train step averages
  gradients and metrics over the devices (`segjax.train.steps`), a sum step sums its sums.
  `jax.pmap` takes no compiler options: the pmapped steps compile without `compiler_options`
  (jitted steps built beside them, as instance evaluation's, still take them)."""

  def train_step(self, step):
    return jax.pmap(
      per_device(self.traced(step)), axis_name=PMAP_AXIS, in_axes=(0, 0, None), donate_argnums=0
    )

  def sum_step(self, step):
    step = self.traced(step)
    return jax.pmap(
      per_device(lambda v, b: jax.lax.psum(step(v, b), PMAP_AXIS)),
      axis_name=PMAP_AXIS,
    )

  def batch(self, local_batch: dict) -> dict:
    return to_pmap_batch(local_batch)

  def to_run_state(self, tree):
    return to_pmap_state(tree)

  def to_global_state(self, tree):
    return from_pmap_state(tree, self.mesh)

  def fetch(self, tree):
    return first_replica(tree)


def runner(config, mesh: Mesh) -> JitRunner:
  """The runner of `config.parallelism` ("jit", the default, or "pmap") on `mesh`, with
  `config.compiler_options` for this platform and `config.cpu_convolutions`."""
  name = check_parallelism(config.get("parallelism", "jit"))
  cls = PmapRunner if name == "pmap" else JitRunner
  return cls(mesh, xla_options.compiler_options(config), xla_options.cpu_convolutions(config))
