"""Fine-tuning: a fresh train state takes its variables from another run's latest checkpoint.

`--config.init_from=DIR` names a workdir (one that `train.py` or `python -m
segjax.weights.torchvision` wrote). Only its "params" and "batch_stats" are read, never its
optimizer state, step or data position. Leaf by leaf, by path:
  * same path and shape: loaded (cast to the fresh leaf's dtype, placed with its sharding);
  * same path, other shape (class-dependent predictors for another number of classes):
    re-initialised, i.e. the fresh initialisation is kept;
  * only in the checkpoint: skipped; only in the model: keeps its fresh initialisation.
A summary of the four groups is printed. The loop calls `maybe_load_pretrained` only when
starting from scratch: a workdir's own checkpoint wins on resume.
"""

from __future__ import annotations

import os
from collections import Counter

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

COLLECTIONS = ("params", "batch_stats")


def read_variables(directory: str) -> tuple[dict, int]:
  """({(collection, *path): np.ndarray}, step) of the latest checkpoint in workdir `directory`,
  restored as host NumPy arrays whatever shapes or shardings they were saved with."""
  root = os.path.join(os.path.abspath(directory), "checkpoints")
  options = ocp.CheckpointManagerOptions(read_only=True)  # Never touches the other run.
  with ocp.CheckpointManager(root, options=options) as manager:
    step = manager.latest_step() if os.path.isdir(root) else None
  if step is None:
    raise FileNotFoundError(f"config.init_from={directory!r} holds no checkpoint "
                            f"(no {os.path.join(directory, 'checkpoints', '<step>')}).")
  path = os.path.join(root, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata
  tree = getattr(tree, "tree", tree)
  item = {c: tree[c] for c in COLLECTIONS if tree.get(c)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
    item=item, restore_args=restore_args, partial_restore=True))
  return traverse_util.flatten_dict(dict(restored)), step


def _put(value: np.ndarray, like: jax.Array) -> jax.Array:
  value = np.asarray(value, like.dtype)
  return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def load_pretrained(directory: str, state) -> tuple[object, dict]:
  """(state with the checkpoint's matching variables, summary).

  `state` is a fresh train state (its optimizer state, zeros, stays). summary: "step" and
  lists of "/"-joined names: "loaded", "reinitialized" (with both shapes), "only_in_checkpoint",
  "only_in_model".
  """
  saved, step = read_variables(directory)
  summary = {"directory": directory, "step": step, "loaded": [], "reinitialized": [],
             "only_in_checkpoint": [], "only_in_model": []}
  fresh = {c: traverse_util.flatten_dict(getattr(state, c) or {}) for c in COLLECTIONS}
  for collection, leaves in fresh.items():
    for path, leaf in leaves.items():
      key, name = (collection, *path), "/".join((collection, *path))
      if key not in saved:
        summary["only_in_model"].append(name)
      elif tuple(saved[key].shape) != tuple(leaf.shape):
        summary["reinitialized"].append(
          f"{name} {tuple(saved[key].shape)} -> {tuple(leaf.shape)}")
      else:
        leaves[path] = _put(saved[key], leaf)
        summary["loaded"].append(name)
  known = {(c, *p) for c, leaves in fresh.items() for p in leaves}
  summary["only_in_checkpoint"] = ["/".join(k) for k in saved if k not in known]
  state = state.replace(**{c: traverse_util.unflatten_dict(leaves) if leaves else getattr(
    state, c) for c, leaves in fresh.items()})
  return state, summary


def format_summary(summary: dict) -> str:
  """A few lines: counts, loaded leaves by top-level module, the other names in full."""
  by_module = Counter(name.split("/")[1] for name in summary["loaded"])
  lines = [f"Initialised from {summary['directory']} (step {summary['step']}): "
           f"{len(summary['loaded'])} loaded ({dict(sorted(by_module.items()))}), "
           f"{len(summary['reinitialized'])} re-initialised (shape changed), "
           f"{len(summary['only_in_checkpoint'])} skipped (only in the checkpoint), "
           f"{len(summary['only_in_model'])} freshly initialised (only in the model)."]
  for key, title in (("reinitialized", "re-initialised"), ("only_in_checkpoint", "skipped"),
                     ("only_in_model", "only in the model")):
    lines += [f"  {title}: {name}" for name in summary[key]]
  return "\n".join(lines)


def maybe_load_pretrained(config: ml_collections.ConfigDict, state):
  """`load_pretrained(config.init_from, state)` with its summary printed, or `state` as it is
  when `config.init_from` is unset or empty."""
  directory = config.get("init_from")
  if not directory:
    return state
  state, summary = load_pretrained(directory, state)
  if jax.process_index() == 0:
    print(format_summary(summary), flush=True)
  return state
