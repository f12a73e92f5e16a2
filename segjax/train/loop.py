"""The training loop: train, log, evaluate and checkpoint; resume from the latest checkpoint.

`train_and_evaluate(config, workdir)` is all `train.py` calls. Outputs in `workdir`:
`config.json`, `metrics.jsonl` (one JSON object per log step, evaluations as `eval/...`),
`checkpoints/<step>/` (orbax: train state and data-iterator position).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from segjax.data import pipeline
from segjax.models import create_model
from segjax.train import checkpoint, parallel, semantic
from segjax.train.evaluator import Evaluator
from segjax.train.state import create_train_state, learning_rate_schedule
from segjax.train.steps import train_step
from segjax.train.writer import MetricWriter


class _StopRequest:
  """Turns SIGTERM into a flag that the loop checks, so it can checkpoint before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint, then stopping.")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def build_model(config: ml_collections.ConfigDict):
  return create_model(config.model)


def initial_state(config: ml_collections.ConfigDict, model, mesh):
  """(init_fn, abstract_state): a jitted initializer that builds the state replicated."""
  sample = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  init = jax.jit(functools.partial(create_train_state, model, config, sample_input=sample),
                 out_shardings=parallel.replicated(mesh))
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, rng)
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract)
  return functools.partial(init, rng), abstract


def _check_finite(step: int, values: dict) -> None:
  bad = {k: v for k, v in values.items() if not np.all(np.isfinite(v))}
  if bad:
    raise RuntimeError(f"Non-finite training metrics at step {step}: {bad}. "
                       "The last checkpoint is untouched; lower the learning rate or inspect "
                       "with --jax_debug_nans.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to `config.num_train_steps`, resuming if `workdir` has a checkpoint.

  Returns the last evaluation metrics (empty if no evaluation ran).
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh()
  model = build_model(config)
  batch_size = parallel.local_batch_size(config.batch_size)
  train_ds = pipeline.train_dataset(config, local_batch_size=batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  train_iter = iter(train_ds)
  init, abstract_state = initial_state(config, model, mesh)
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=config.checkpoint_every_steps)
  if manager.latest_step() is not None:
    state, start_step = checkpoint.restore(manager, abstract_state, train_iter)
    logging.info("Resumed from step %d.", start_step)
    print(f"Resuming from checkpoint at step {start_step}.", flush=True)
  else:
    state, start_step = init(), 0

  loss_fn = functools.partial(semantic.loss_fn, model=model,
                              ignore_label=config.dataset.ignore_label)
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  step_fn = jax.jit(functools.partial(train_step, loss_fn=loss_fn),
                    in_shardings=(replicated, sharded, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  evaluator = Evaluator(config, model=model, mesh=mesh)
  writer = MetricWriter(workdir, enabled=is_main, num_train_steps=config.num_train_steps)
  schedule = learning_rate_schedule(config)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  stop = _StopRequest()
  eval_metrics: dict = {}
  pending: list = []
  timer_step, timer_start = start_step, time.perf_counter()
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      batch = parallel.to_global(next(train_iter), mesh)
      state, metrics = step_fn(state, batch, rng)
      pending.append(metrics)
      is_last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or is_last:
        summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending]))
                   for k in pending[0]}
        _check_finite(step, summary)
        elapsed = time.perf_counter() - timer_start
        summary["learning_rate"] = float(schedule(step - 1))
        summary["images_per_sec"] = (step - timer_step) * config.batch_size / elapsed
        writer.write(step, summary)
        pending, timer_step, timer_start = [], step, time.perf_counter()
      if step % config.eval_every_steps == 0 or is_last:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        eval_metrics = evaluator.run(variables)
        writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        timer_step, timer_start = step, time.perf_counter()
      stopping = stop.requested
      checkpoint.save(manager, step, state, train_iter, force=is_last or stopping)
      if stopping:
        manager.wait_until_finished()
        print(f"Stopped at step {step}; checkpoint saved.", flush=True)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    stop.restore()
  return eval_metrics
