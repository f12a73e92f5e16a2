"""Orbax checkpoints of the train state together with the tf.data iterator position.

Saving both in one `Composite` checkpoint makes resume exact: the run continues at the same
step with the same next batch. Orbax writes to a temporary directory and renames it once
complete, so an interrupted save never leaves a half-written checkpoint that restore would
pick up (`latest_step` only sees committed steps).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from etils import epath

# Orbax's replica-parallel saving has each replica write a slice of every replicated array,
# sliced on device with one compile per shape: seconds per first save for a few hundred small
# arrays on many devices. Keep it for arrays whose slices are large enough to be worth it.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _register_array_handler() -> None:
  handler = ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
    # As orbax's default jax.Array handler (no public accessor).
    array_metadata_store=getattr(
      ocp.type_handlers.get_type_handler(jax.Array), "_array_metadata_store", None
    ),
  )
  absl_logger = logging.getLogger("absl")  # Orbax warns of every override.
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class TFIteratorHandler(ocp.CheckpointHandler):
  """Saves a tf.data iterator, one directory per process (t5x `DatasetCheckpointHandler`)."""

  def _dir(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}"

  def save(self, directory: epath.Path, args: TFIterator) -> None:
    d = self._dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    tf.train.Checkpoint(it=args.it).write(os.fspath(d / "tfdata"))

  def restore(self, directory: epath.Path, args: TFIterator) -> tf.data.Iterator:
    path = self._dir(directory) / "tfdata"
    tf.train.Checkpoint(it=args.it).read(os.fspath(path)).assert_consumed()
    return args.it


@ocp.args.register_with_handler(TFIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class TFIterator(ocp.args.CheckpointArgs):
  it: tf.data.Iterator


def checkpoint_manager(
  workdir: str, *, save_every_steps: int, keep: int = 2
) -> ocp.CheckpointManager:
  """Saves every `save_every_steps` steps (and whenever forced), keeping the latest `keep`."""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=policies.FixedIntervalPolicy(save_every_steps),
    preservation_policy=policies.LatestN(keep),
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
  )


def save(
  manager: ocp.CheckpointManager, step: int, state, data_iterator=None, *, force: bool = False
) -> bool:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = TFIterator(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
  manager: ocp.CheckpointManager, abstract_state, data_iterator=None, *, step: int | None = None
):
  """(state, step) from `step` or the latest checkpoint; the iterator is restored in place.

  `abstract_state` gives the structure, shapes, dtypes and target shardings
  (e.g. `jax.eval_shape` of the state initializer with shardings attached).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = TFIterator(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], step


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
  """`restore` of the latest checkpoint that restores, newest first.

  A checkpoint that fails (a truncated file, a missing manifest) while an earlier one restores
  is moved aside to `checkpoints/<step>.corrupt` (kept for inspection; orbax ignores it) with
  a message naming it; single-process runs only. If none restores, nothing is moved (a changed
  config fails on every step alike) and the error names each step's failure.
  """
  failures = []
  # With several processes, each restores its own part: they could disagree on which step is
  # good, so only the latest is tried.
  steps = sorted(manager.all_steps(), reverse=True)[: 1 if jax.process_count() > 1 else None]
  for step in steps:
    try:
      restored = restore(manager, abstract_state, data_iterator, step=step)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
      continue
    for bad, error in failures:
      aside = _unused(epath.Path(manager.directory) / f"{bad}.corrupt")
      (epath.Path(manager.directory) / str(bad)).rename(aside)
      print(f"Checkpoint {bad} could not be restored ({error}); moved to {aside}.", flush=True)
    if failures:
      manager.reload()
    return restored
  details = "; ".join(f"step {step}: {error}" for step, error in failures)
  raise RuntimeError(
    f"No checkpoint in {manager.directory} could be restored ({details}). "
    "If the config changed since they were written, restore it or use a "
    "new --workdir."
  )


def remove_unfinished(directory) -> list[str]:
  """Removes the temporary directories of saves that never finished (orbax would at the next
  start): after a failed save nothing half-written is left. Single-process runs only: other
  processes may still be writing."""
  removed = []
  for path in epath.Path(directory).glob("*.orbax-checkpoint-tmp*"):
    path.rmtree()
    removed.append(os.fspath(path))
  return removed


def _unused(path: epath.Path) -> epath.Path:
  candidate, n = path, 1
  while candidate.exists():
    candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
  return candidate


def restore_variables(
  manager: ocp.CheckpointManager, abstract_variables: dict, *, step: int | None = None
):
  """({"params", "batch_stats"}, step): only the model's variables, whatever the optimizer."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
  args = ocp.args.PyTreeRestore(
    abstract_variables,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_variables),
    partial_restore=True,
  )
  restored = manager.restore(step, args=ocp.args.Composite(state=args))
  return dict(restored["state"]), step
