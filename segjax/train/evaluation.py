"""Evaluation of a trained checkpoint: what `evaluate.py` runs.

Writes `workdir/eval_metrics.json`, the evaluated `split` (and a semantic model's evaluation
`mode`) among the metrics; for another split than training evaluated,
`eval_metrics_<split>.json` (`metrics_filename`). For instance models also
`workdir/detections.json` (the COCO results format); on request, PNG panels to
`workdir/visualizations/` (`visualizations.py`), also as TensorBoard images in
`workdir/tensorboard/`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from segjax.data.images import read_image
from segjax.models import build_model
from segjax.train import checkpoint, parallel, run_config, tasks
from segjax.train.state import initial_state
from segjax.train.writer import MetricWriter, to_json_value


def restore_variables(config: ml_collections.ConfigDict, workdir: str, model, mesh):
  """(variables, step) of the latest checkpoint in `workdir`."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # The manager would create it.
    raise FileNotFoundError(f"No checkpoint in {workdir}: {workdir}/checkpoints does not exist.")
  _, abstract_state = initial_state(config, model, mesh)
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=config.checkpoint_every_steps)
  abstract = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
  with manager:
    return checkpoint.restore_variables(manager, abstract)


# tfds slicing characters, spelled out so that different slices keep different names.
_SPLIT_CHARS = {"[": "_", "]": "", ":": "-", "%": "pct", "+": "+", ".": ".", "-": "-", "_": "_"}


def split_filename(split: str) -> str:
  """`split` as a file name part: `validation[:50%]` -> `validation_-50pct`; other characters
  than letters, digits and tfds slicing's become `_`."""
  return "".join(c if c.isascii() and c.isalnum() else _SPLIT_CHARS.get(c, "_") for c in split)


def metrics_filename(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`eval_metrics.json` for the split training evaluated (`workdir/config.json`'s
  `dataset.eval_split`; any split when there is none), else `eval_metrics_<split>.json`, so
  that evaluating another split never overwrites the default one's metrics."""
  split = config.dataset.eval_split
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      trained = json.load(f).get("dataset", {}).get("eval_split", split)
  except (OSError, ValueError):
    trained = split
  return "eval_metrics.json" if split == trained else f"eval_metrics_{split_filename(split)}.json"


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, num_visualizations: int = 0, report=None
) -> dict:
  """Metrics of the latest checkpoint, written to `workdir` (module docstring); `report(metrics)`
  runs on process 0 before anything is written, so a write error loses nothing."""
  run_config.check(config)
  mesh = parallel.make_mesh()
  model = build_model(config)
  variables, step = restore_variables(config, workdir, model, mesh)
  evaluator = tasks.get_task(config).evaluator(config, model=model, mesh=mesh)
  run_variables = parallel.runner(config, mesh).to_run_state(variables)
  mode = getattr(getattr(evaluator, "settings", None), "mode", None)  # Semantic only.
  metrics = {
    "step": step,
    "split": config.dataset.eval_split,
    **({"mode": mode} if mode else {}),
    **evaluator.run(run_variables),
  }
  name = metrics_filename(config, workdir)
  if jax.process_index() == 0:
    if report is not None:
      report(metrics)
    try:
      with open(os.path.join(workdir, name), "w") as f:
        json.dump({k: to_json_value(v) for k, v in metrics.items()}, f, indent=2)
    except OSError as e:  # The metrics took a whole evaluation: keep them in the message.
      values = json.dumps({k: to_json_value(v) for k, v in metrics.items()})
      raise OSError(f"Cannot write {workdir}/{name} ({e}); the metrics: {values}") from e
    results = getattr(evaluator, "results", None)  # Instance evaluators keep COCO results.
    if results is not None:
      with open(os.path.join(workdir, "detections.json"), "w") as f:
        json.dump(results, f)
    if num_visualizations:
      paths = tasks.get_task(config).visualize(
        config,
        evaluator,
        model,
        variables,
        os.path.join(workdir, "visualizations"),
        num_visualizations,
      )
      MetricWriter(workdir).write_images(
        step,
        {
          f"visualizations/{os.path.splitext(os.path.basename(p))[0]}": read_image(p) for p in paths
        },
      )
  return metrics
