"""Jitted evaluation over a whole split, summing per-batch statistics on device.

`config.evaluation.mode` (`segjax.data.pipeline.evaluation_settings`) picks the step:
"resize" scores the model's logits at `image_size`; "whole" and "slide" score
`segjax.ops.sliding.dense_probabilities` against the original masks, every batch padded to
one canvas for the split (`segjax.data.pipeline.eval_canvas`, largest over processes).

Every process runs the same number of padded batches, so the sums cover every example of
the split exactly once however it divides into batches and hosts.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from segjax.data import pipeline
from segjax.data.iteration import numpy_batches
from segjax.train import parallel, semantic


class Evaluator:
  """`Evaluator(config, model=..., mesh=...).run(variables) -> dict` of metrics."""

  def __init__(self, config: ml_collections.ConfigDict, *, model, mesh):
    self.config = config
    self.mesh = mesh
    batch_size = parallel.local_batch_size(config.eval_batch_size, "eval_batch_size")
    kwargs = dict(
      local_batch_size=batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    self.settings = pipeline.evaluation_settings(config)
    self.canvas = None
    if self.settings.mode != "resize":
      canvas = pipeline.eval_canvas(
        config,
        multiple=semantic.stride(config),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      self.canvas = kwargs["canvas"] = tuple(
        tuple(parallel.max_over_processes(c) for c in part) for part in canvas
      )
    self.dataset, num_batches = pipeline.eval_dataset(config, **kwargs)
    most = parallel.max_over_processes(num_batches)
    if most != num_batches:
      self.dataset, num_batches = pipeline.eval_dataset(config, num_batches=most, **kwargs)
    self.num_batches = num_batches
    bound = dict(
      model=model, num_classes=config.model.num_classes, ignore_label=config.dataset.ignore_label
    )
    if self.settings.mode == "resize":
      step = functools.partial(semantic.eval_step, **bound)
    else:
      step = functools.partial(
        semantic.native_eval_step, infer=semantic.bind_inference(config), **bound
      )
    self.runner = parallel.runner(config, mesh)
    self.step = self.runner.sum_step(step)
    self.put = self.runner.batch

  def run(self, variables: dict) -> dict:
    """Metrics of `variables`, in the layout of `config.parallelism`'s steps
    (`parallel.runner`).

    Each batch's counts (int32 on device) are added on the host in int64: a split's pixel
    count passes int32's 2.1e9 at Cityscapes scale (500 images of 2048x1024 hold 1.05e9).
    """
    fetch = self.runner.fetch
    sums, previous = None, None
    for batch in numpy_batches(self.dataset, "evaluation data"):
      out = self.step(variables, self.put(batch))
      if previous is not None:  # Fetched one batch late, so the device keeps working.
        sums = add_counts(sums, fetch(previous))
      previous = out
    if previous is not None:
      sums = add_counts(sums, fetch(previous))
    return semantic.summarize(sums, class_names=self.config.dataset.get("class_names"))


def add_counts(total: dict | None, counts: dict) -> dict:
  """`total + counts`, as int64 numpy arrays."""
  counts = jax.tree.map(lambda x: np.asarray(x, np.int64), counts)
  return counts if total is None else jax.tree.map(np.add, total, counts)
