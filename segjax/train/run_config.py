"""A run's config: checked before anything is written, recorded in the workdir, compared on
resume.

`check(config)` normalises and validates the keys every task shares and raises `ConfigError`
naming the key. `record(config, workdir, ...)` writes `workdir/config.json`; when a run
resumes from a checkpoint, a config that differs from the recorded one in anything but how
long the run is, how often it logs, evaluates and saves, how it evaluates and how XLA
compiles its steps (`compiler_options`, `cpu_convolutions`) is refused, listing the
differences, unless the change is allowed: then the new config is also kept as
`config.<step>.json`, the config in force from that step on.
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections

from segjax.errors import ConfigError

# Keys that may change between a checkpoint and its resumption: how long the run is, how
# often it logs, evaluates and saves, how it evaluates and how XLA compiles its steps (the
# last two sections, by their prefix).
RUN_LENGTH_KEYS = (
  "num_train_steps",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "eval_batch_size",
  "init_from",
  "evaluation.",
  "compiler_options.",
  "cpu_convolutions",
)


def _semantic_model(config: ml_collections.ConfigDict):
  """The module of a semantic model's config (for its `stride`), else None."""
  from segjax import models

  name = config.get("model", {}).get("name")
  if name not in models.MODELS or models.model_class(name).task != "semantic":
    return None
  return models.create_model(config.model)


def class_count(config: ml_collections.ConfigDict) -> tuple[str, int] | None:
  """(key, count) of the model's classes, background included (the length `dataset.
  class_names` must have): `model.num_classes` for semantic models, `model.roi_heads.
  num_classes` + 1 for Mask R-CNN, whose key counts the foreground classes only."""
  model = config.get("model", {})
  if model.get("roi_heads") is not None and model.roi_heads.get("num_classes") is not None:
    return "model.roi_heads.num_classes (foreground) + 1", model.roi_heads.num_classes + 1
  if model.get("num_classes") is not None:
    return "model.num_classes", model.num_classes
  return None


def check_class_count(config: ml_collections.ConfigDict) -> None:
  """`dataset.class_names`, when given, names every class the model outputs (index 0 first,
  the background where there is one): a count that differs is a `ConfigError` naming both."""
  names = config.get("dataset", {}).get("class_names")
  counted = class_count(config)
  if names and counted and len(names) != counted[1]:
    raise ConfigError(
      f"dataset.class_names has {len(names)} names but {counted[0]} = "
      f"{counted[1]} classes: name every class the model outputs, index 0 "
      "first (Mask R-CNN: the background too)."
    )


def check(config: ml_collections.ConfigDict) -> None:
  """Normalises `image_size` (an int or `(s,)` means a square) and `eval_batch_size` (rounded
  up to the device count: evaluation pads); raises `ConfigError` for values that cannot work."""
  size = config.get("image_size")
  if size is not None:
    size = (size,) if isinstance(size, int) else tuple(size)
    if len(size) == 1:
      size = size * 2
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
      raise ConfigError(
        f"image_size={config.image_size!r}: give (height, width) or one int for a square."
      )
    config.image_size = size
    model = _semantic_model(config)
    if model is not None and any(s % model.stride for s in size):
      raise ConfigError(
        f"image_size={size} must be divisible by the model's stride "
        f"{model.stride}" + (" (2**model.depth)." if "depth" in config.model else ".")
      )
  check_class_count(config)
  for key in (
    "batch_size",
    "eval_batch_size",
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
  ):
    value = config.get(key)
    if key == "eval_every_steps" and value == 0:  # Never evaluates while training.
      continue
    if value is not None and (not isinstance(value, int) or value <= 0):
      raise ConfigError(f"{key}={value!r} must be a positive integer.")
  if config.get("eval_batch_size"):
    devices = jax.device_count()
    rounded = math.ceil(config.eval_batch_size / devices) * devices
    if rounded != config.eval_batch_size:
      print(
        f"eval_batch_size={config.eval_batch_size} rounded up to {rounded}, a multiple of "
        f"the {devices} devices (padding rows are not counted).",
        flush=True,
      )
      config.eval_batch_size = rounded


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(old: dict, new: dict, *, ignore=RUN_LENGTH_KEYS) -> list[str]:
  """`key: old -> new` for each key whose value differs, outside `ignore` (keys, or sections
  ending in ".", the section's own key included)."""
  old, new = _flat(old), _flat(new)
  missing = object()
  return [
    f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}".replace(
      repr(missing), "(absent)"
    )
    for key in sorted(set(old) | set(new))
    if not any(key in (k, k.rstrip(".")) or (k.endswith(".") and key.startswith(k)) for k in ignore)
    and old.get(key, missing) != new.get(key, missing)
  ]


def as_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json holds it (tuples as lists)."""
  return json.loads(config.to_json_best_effort())


def record(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  resume_step: int | None,
  allow_change: bool = False,
) -> None:
  """Writes `workdir/config.json`, refusing a changed config on resume (module docstring)."""
  path = os.path.join(workdir, "config.json")
  new = as_dict(config)
  if resume_step is not None and os.path.exists(path):
    with open(path) as f:
      changed = differences(json.load(f), new)
    if changed and not allow_change:
      raise ConfigError(
        f"the config differs from {path}, which its checkpoints were trained with: "
        f"{'; '.join(changed)}. Use the recorded values, a new --workdir, or "
        "--allow_config_change to resume with the new ones."
      )
    if changed and jax.process_index() == 0:
      _write(os.path.join(workdir, f"config.{resume_step}.json"), config)
  if jax.process_index() == 0:
    _write(path, config)


def _write(path: str, config: ml_collections.ConfigDict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)


def _tuples(value):
  """JSON lists back to the tuples the config held (`to_json_best_effort` writes lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config that training wrote to `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist: pass the config the model was trained "
      "with, or a workdir written by train.py."
    )
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
