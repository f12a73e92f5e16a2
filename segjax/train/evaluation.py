"""Evaluation of a trained checkpoint: what `evaluate.py` runs.

Writes `workdir/eval_metrics.json`; for instance models also `workdir/detections.json` (the
COCO results format); on request, PNG panels to `workdir/visualizations/`
(`visualizations.py`).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from segjax.train import checkpoint, parallel, run_config, tasks
from segjax.train.loop import build_model, initial_state
from segjax.train.writer import to_json_value


def restore_variables(config: ml_collections.ConfigDict, workdir: str, model, mesh):
  """(variables, step) of the latest checkpoint in `workdir`."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # The manager would create it.
    raise FileNotFoundError(f"No checkpoint in {workdir}: {workdir}/checkpoints does not exist.")
  _, abstract_state = initial_state(config, model, mesh)
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=config.checkpoint_every_steps)
  abstract = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
  with manager:
    return checkpoint.restore_variables(manager, abstract)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        num_visualizations: int = 0) -> dict:
  run_config.check(config)
  mesh = parallel.make_mesh()
  model = build_model(config)
  variables, step = restore_variables(config, workdir, model, mesh)
  evaluator = tasks.get_task(config).evaluator(config, model=model, mesh=mesh)
  run_variables = parallel.to_pmap_state(variables) if evaluator.parallelism == "pmap" else (
    variables)
  metrics = {"step": step, **evaluator.run(run_variables)}
  if jax.process_index() == 0:
    try:
      with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
        json.dump({k: to_json_value(v) for k, v in metrics.items()}, f, indent=2)
    except OSError as e:  # The metrics took a whole evaluation: keep them in the message.
      values = json.dumps({k: to_json_value(v) for k, v in metrics.items()})
      raise OSError(f"Cannot write {workdir}/eval_metrics.json ({e}); the metrics: "
                    f"{values}") from e
    results = getattr(evaluator, "results", None)  # Instance evaluators keep COCO results.
    if results is not None:
      with open(os.path.join(workdir, "detections.json"), "w") as f:
        json.dump(results, f)
    if num_visualizations:
      tasks.get_task(config).visualize(config, evaluator, model, variables,
                                       os.path.join(workdir, "visualizations"),
                                       num_visualizations)
  return metrics
