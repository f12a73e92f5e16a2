"""Fine-tuning: a fresh train state takes its variables from another run's latest checkpoint.

`--config.init_from=DIR` names a workdir (one that `train.py` or `python -m
segjax.weights.torchvision` wrote). Only its "params" and "batch_stats" are read, never its
optimizer state, step or data position. Leaf by leaf, by path:
  * same path and shape: loaded (cast to the fresh leaf's dtype, placed with its sharding);
  * same path, other shape (class-dependent predictors for another number of classes):
    re-initialised, i.e. the fresh initialisation is kept;
  * only in the checkpoint: skipped; only in the model: keeps its fresh initialisation.
A batch norm's scale and bias load across the two layouts of `segjax.models.resnet`: in
"batch_stats" (`FrozenBatchNorm`, norm="frozen_bn", as the torchvision import writes them)
and in "params" (trainable BatchNorm, norm="bn"), where both hold running statistics
("batch_stats/.../mean") at that path; so an imported ImageNet ResNet fills either encoder.
A summary of the four groups is printed. The loop calls `maybe_load_pretrained` only when
starting from scratch: a workdir's own checkpoint wins on resume.

Variables that never train must come from `init_from`: with a ResNet backbone of
`norm="frozen_bn"` (fixed batch-norm vectors, the detection default) or `freeze_at` k > 0 (the
stem and res2..res_k fixed), a fresh run without `init_from`, or whose `init_from` leaves any of
those variables at their initialisation, stops with a `ConfigError` naming
`model.backbone.norm`, `model.backbone.freeze_at` and `init_from` (`check_frozen_backbone`,
from the checkpoint's shapes, before the state is built).
"""

from __future__ import annotations

import os
from collections import Counter

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from segjax.errors import ConfigError
from segjax.train.state import frozen_params

COLLECTIONS = ("params", "batch_stats")


def _latest(directory: str) -> tuple[str, int, dict]:
  """(path, step, metadata tree) of the state of workdir `directory`'s latest checkpoint."""
  root = os.path.join(os.path.abspath(directory), "checkpoints")
  options = ocp.CheckpointManagerOptions(read_only=True)  # Never touches the other run.
  with ocp.CheckpointManager(root, options=options) as manager:
    step = manager.latest_step() if os.path.isdir(root) else None
  if step is None:
    raise FileNotFoundError(
      f"config.init_from={directory!r} holds no checkpoint "
      f"(no {os.path.join(directory, 'checkpoints', '<step>')})."
    )
  path = os.path.join(root, str(step), "state")
  tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata
  return path, step, getattr(tree, "tree", tree)


def read_variables(directory: str) -> tuple[dict, int]:
  """({(collection, *path): np.ndarray}, step) of the latest checkpoint in workdir `directory`,
  restored as host NumPy arrays whatever shapes or shardings they were saved with."""
  path, step, tree = _latest(directory)
  item = {c: tree[c] for c in COLLECTIONS if tree.get(c)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = ocp.PyTreeCheckpointer().restore(
    path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  )
  return traverse_util.flatten_dict(dict(restored)), step


def read_shapes(directory: str) -> tuple[dict, int]:
  """`read_variables` without reading any array: ({(collection, *path): shape}, step)."""
  _, step, tree = _latest(directory)
  item = {c: tree[c] for c in COLLECTIONS if tree.get(c)}
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(item).items()}, step


def _put(value: np.ndarray, like: jax.Array) -> jax.Array:
  value = np.asarray(value, like.dtype)
  return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def plan(saved: dict, fresh: dict) -> tuple[dict, dict]:
  """(summary lists, sources): how `load_pretrained` fills a fresh state, from shapes alone.

  saved: {(collection, *path): array or shape} of the checkpoint; fresh: {collection: {path:
  leaf with a shape}} of the state. The summary lists are `load_pretrained`'s; sources maps
  (collection, path) of each loaded leaf to its checkpoint key.
  """
  shape = lambda v: tuple(getattr(v, "shape", v))
  summary = {"loaded": [], "reinitialized": [], "only_in_checkpoint": [], "only_in_model": []}
  sources, used = {}, set()
  for collection, leaves in fresh.items():
    for path, leaf in leaves.items():
      key, name = (collection, *path), "/".join((collection, *path))
      if key not in saved:
        key = _other_norm_layout(key, saved, fresh)
      if key not in saved:
        summary["only_in_model"].append(name)
      elif shape(saved[key]) != shape(leaf):
        summary["reinitialized"].append(f"{name} {shape(saved[key])} -> {shape(leaf)}")
      else:
        sources[(collection, path)] = key
        summary["loaded"].append(name)
      used.add(key)
  summary["only_in_checkpoint"] = ["/".join(k) for k in saved if k not in used]
  return summary, sources


def load_pretrained(directory: str, state) -> tuple[object, dict]:
  """(state with the checkpoint's matching variables, summary).

  `state` is a fresh train state (its optimizer state, zeros, stays). summary: "step" and
  lists of "/"-joined names: "loaded", "reinitialized" (with both shapes), "only_in_checkpoint",
  "only_in_model".
  """
  saved, step = read_variables(directory)
  fresh = {c: traverse_util.flatten_dict(getattr(state, c) or {}) for c in COLLECTIONS}
  lists, sources = plan(saved, fresh)
  for (collection, path), key in sources.items():
    fresh[collection][path] = _put(saved[key], fresh[collection][path])
  state = state.replace(
    **{
      c: traverse_util.unflatten_dict(leaves) if leaves else getattr(state, c)
      for c, leaves in fresh.items()
    }
  )
  return state, {"directory": directory, "step": step, **lists}


def _other_norm_layout(key: tuple, saved: dict, fresh: dict) -> tuple:
  """The checkpoint key of a batch norm's scale or bias `key` in the other collection (see the
  module docstring), or `key` itself when there is none."""
  collection, *module, leaf = key
  other = "params" if collection == "batch_stats" else "batch_stats"
  stats = ("batch_stats", *module, "mean")
  if (
    leaf in ("scale", "bias")
    and stats in saved
    and tuple(stats[1:]) in fresh["batch_stats"]
    and (other, *module, leaf) in saved
  ):
    return (other, *module, leaf)
  return key


def format_summary(summary: dict) -> str:
  """A few lines: counts, loaded leaves by top-level module, the other names in full."""
  by_module = Counter(name.split("/")[1] for name in summary["loaded"])
  lines = [
    f"Initialised from {summary['directory']} (step {summary['step']}): "
    f"{len(summary['loaded'])} loaded ({dict(sorted(by_module.items()))}), "
    f"{len(summary['reinitialized'])} re-initialised (shape changed), "
    f"{len(summary['only_in_checkpoint'])} skipped (only in the checkpoint), "
    f"{len(summary['only_in_model'])} freshly initialised (only in the model)."
  ]
  for key, title in (
    ("reinitialized", "re-initialised"),
    ("only_in_checkpoint", "skipped"),
    ("only_in_model", "only in the model"),
  ):
    lines += [f"  {title}: {name}" for name in summary[key]]
  return "\n".join(lines)


def frozen_variables(model, variables: dict) -> list[str]:
  """The "/"-joined names (collection first) of the variables in `variables` ({"params": ...,
  "batch_stats": ...}) that `model` never trains: under a backbone with `freeze_at` k, those of
  the stem and res2..res_k (`segjax.train.state.frozen_params`), and with `norm="frozen_bn"`
  every backbone batch-norm vector. Empty for models without such a backbone."""
  backbone = getattr(model, "backbone", None)
  names = []
  for collection in COLLECTIONS:
    tree = variables.get(collection) or {}
    flags = traverse_util.flatten_dict(frozen_params(model, tree)) if tree else {}
    for path, frozen in flags.items():
      bn_vector = (
        collection == "batch_stats"
        and path[0] == "backbone"
        and getattr(backbone, "norm", None) == "frozen_bn"
      )
      if frozen or bn_vector:
        names.append("/".join((collection, *path)))
  return names


def _fixed_parts(backbone) -> str:
  """What of `backbone` never trains, naming the config keys that say so."""
  parts = []
  if backbone.norm == "frozen_bn":
    parts.append("model.backbone.norm='frozen_bn' (batch-norm vectors fixed)")
  if backbone.freeze_at > 0:
    k = backbone.freeze_at
    stages = {1: "", 2: " and res2"}.get(k, f" and res2..res{k}")
    parts.append(f"model.backbone.freeze_at={k} (the stem{stages} fixed)")
  return " and ".join(parts)


def _fix(backbone) -> str:
  depth = getattr(backbone, "depth", 50)
  return (
    f"Import torchvision's ImageNet weights (python -m segjax.weights.torchvision --arch "
    f"resnet{depth} --input FILE.pth --workdir DIR) and pass --config.init_from=DIR, or train "
    "the backbone from scratch with model.backbone.norm='gn' (or 'bn') and "
    "model.backbone.freeze_at=0 (configs/mask_rcnn_r50_fpn_coco_scratch_gn.py)."
  )


def _needs_weights(model) -> bool:
  backbone = getattr(model, "backbone", None)
  return getattr(backbone, "norm", None) == "frozen_bn" or getattr(backbone, "freeze_at", 0) > 0


def check_frozen_backbone(config: ml_collections.ConfigDict, model, abstract_state=None) -> None:
  """Raises ConfigError when `model`'s backbone has variables that never train (frozen batch
  norm, `freeze_at` > 0) and `config.init_from` is unset or, given `abstract_state` (the fresh
  state's shapes), would leave any of them at its initialisation (`plan` on the checkpoint's
  shapes: no array is read, nothing compiles)."""
  if not _needs_weights(model):
    return
  directory = config.get("init_from")
  if not directory:
    raise ConfigError(
      f"{_fixed_parts(model.backbone)}, but no init_from: those variables never "
      f"train and would stay at their initialisation. {_fix(model.backbone)}"
    )
  if abstract_state is None:
    return
  variables = {c: getattr(abstract_state, c) or {} for c in COLLECTIONS}
  lists, _ = plan(
    read_shapes(directory)[0], {c: traverse_util.flatten_dict(v) for c, v in variables.items()}
  )
  frozen, loaded = frozen_variables(model, variables), set(lists["loaded"])
  missing = [name for name in frozen if name not in loaded]
  if missing:
    raise ConfigError(
      f"{_fixed_parts(model.backbone)}, but init_from={directory!r} fills only "
      f"{len(frozen) - len(missing)} of those {len(frozen)} variables; the others (e.g. "
      f"{', '.join(missing[:3])}) never train and would stay at their initialisation. "
      f"{_fix(model.backbone)}"
    )


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
