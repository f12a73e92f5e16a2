"""The training loop: train, log, evaluate and checkpoint; resume from the latest checkpoint.

`train_and_evaluate(config, workdir)` is all `train.py` calls. Outputs in `workdir`:
`config.json`, `metrics.jsonl` (one JSON object per log step, evaluations as `eval/...`),
`checkpoints/<step>/` (orbax: train state and data-iterator position).
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from segjax.data.iteration import next_batch
from segjax.errors import Terminated
from segjax.models import build_model
from segjax.train import checkpoint, host_memory, init_from, parallel, run_config, tasks
from segjax.train.state import initial_state, learning_rate_schedule
from segjax.train.steps import train_step
from segjax.train.writer import MetricWriter


class _StopRequest:
  """Turns SIGTERM into a flag that the loop checks, so it can checkpoint before stopping."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint, then stopping.")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


_ADVICE = "lower the learning rate or inspect with --jax_debug_nans"


def _check_finite(step: int, values: dict) -> None:
  bad = {k: v for k, v in values.items() if not np.all(np.isfinite(v))}
  if bad:
    raise FloatingPointError(
      f"Non-finite training metrics at step {step}: {bad}. Every "
      f"checkpoint kept holds finite values; {_ADVICE}."
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _check_finite_state(step: int, state) -> None:
  """Refuses to checkpoint a diverged state, which would rotate the good checkpoints out."""
  if not parallel.fetch(_all_finite({"params": state.params, "batch_stats": state.batch_stats})):
    raise FloatingPointError(
      f"Non-finite parameters at step {step}: not saved. Every "
      f"checkpoint kept holds finite values; {_ADVICE}."
    )


class StepRunner:
  """The train step compiled for `config.parallelism` (`parallel.runner`), with that runner's
  conversions of batches, state and outputs."""

  def __init__(self, config, loss_fn, mesh):
    runner = parallel.runner(config, mesh)
    step = runner.train_step(functools.partial(train_step, loss_fn=loss_fn))
    self.step = host_memory.CompileFirst(step)  # Compiled, its freed memory released, run.
    self.batch = runner.batch
    self.to_run_state = runner.to_run_state
    self.to_global_state = runner.to_global_state  # What checkpoints hold.
    self.fetch = runner.fetch


def _all_processes_agree(flag: bool) -> bool:
  """True if any process says so: every process must stop at the same step."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def _close_checkpoints(manager, *, failed: bool) -> None:
  """Waits for the checkpoint being written, then closes. While another error propagates, a
  failed save is logged rather than raised, so that the first error is the one reported."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    if not failed:
      raise
    logging.error("Saving the last checkpoint failed too: %s", e)
  finally:
    manager.close()


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict:
  """Trains to `config.num_train_steps`, resuming if `workdir` has a checkpoint.

  Resuming with a config that differs from `workdir/config.json` other than in run length
  and logging is refused unless `allow_config_change` (segjax/train/run_config.py).
  Returns the last evaluation metrics (empty if no evaluation ran).
  """
  run_config.check(config)
  is_main = jax.process_index() == 0
  # Everything that validates the config and the data comes before anything is written.
  mesh = parallel.make_mesh()
  model = build_model(config)
  task = tasks.get_task(config)
  batch_size = parallel.local_batch_size(config.batch_size)
  train_ds = task.train_dataset(
    config,
    local_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  init, abstract_state = initial_state(config, model, mesh)
  evaluator = task.evaluator(config, model=model, mesh=mesh)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=config.checkpoint_every_steps)
  train_iter = iter(train_ds)
  stop, failed = None, True
  try:
    run_config.record(
      config, workdir, resume_step=manager.latest_step(), allow_change=allow_config_change
    )
    if manager.latest_step() is not None:
      state, start_step = checkpoint.restore_latest_good(manager, abstract_state, train_iter)
      print(f"Resuming from checkpoint at step {start_step}.", flush=True)
    else:
      # A backbone part that never trains needs init_from: checked before anything compiles.
      init_from.check_frozen_backbone(config, model, abstract_state)
      state, start_step = init_from.maybe_load_pretrained(config, init()), 0
    runner = StepRunner(config, task.bind_loss(config, model), mesh)
    state = runner.to_run_state(state)
    writer = MetricWriter(workdir, enabled=is_main, num_train_steps=config.num_train_steps)
    writer.drop_after(start_step)  # Steps past the checkpoint are trained and logged again.
    schedule = learning_rate_schedule(config)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    eval_metrics: dict = {}
    pending: list = []
    timer_step, timer_start = start_step, time.perf_counter()
    stop = _StopRequest()  # Before this, SIGTERM ends the run at once (segjax.cli.run).
    if is_main:
      print(f"Training from step {start_step}; the first step compiles.", flush=True)
    for step in range(start_step + 1, config.num_train_steps + 1):
      batch = runner.batch(next_batch(train_iter, "training data"))
      state, metrics = runner.step(state, batch, rng)
      pending.append(metrics)
      is_last = step == config.num_train_steps
      is_log_step = step % config.log_every_steps == 0 or is_last
      if is_log_step:
        summary = {k: float(np.mean([runner.fetch(m[k]) for m in pending])) for k in pending[0]}
        _check_finite(step, summary)
        elapsed = time.perf_counter() - timer_start
        summary["learning_rate"] = float(schedule(step - 1))
        summary["images_per_sec"] = (step - timer_step) * config.batch_size / elapsed
        writer.write(step, summary)
        pending, timer_step, timer_start = [], step, time.perf_counter()
      if config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last):
        eval_metrics = evaluator.run({"params": state.params, "batch_stats": state.batch_stats})
        writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        timer_step, timer_start = step, time.perf_counter()
      # Multi-process runs agree on stopping at log steps only: a collective every step costs.
      stopping = (
        stop.requested
        if jax.process_count() == 1
        else is_log_step and _all_processes_agree(stop.requested)
      )
      manager.check_for_errors()  # A failed async save stops the run at the next step.
      if stopping or is_last or manager.should_save(step):
        _check_finite_state(step, state)
        checkpoint.save(
          manager, step, runner.to_global_state(state), train_iter, force=is_last or stopping
        )
      if stopping:
        manager.wait_until_finished()
        raise Terminated(f"SIGTERM: stopped at step {step}; checkpoint saved.")
    if jax.process_count() > 1:
      multihost_utils.assert_equal(
        runner.fetch(state.params), "Parameters differ between processes after training."
      )
    failed = False
  finally:
    if stop is not None:
      stop.restore()
    _close_checkpoints(manager, failed=failed)
    del train_iter  # Freed now, while the interpreter runs: see segjax/data/iteration.py.
    if failed and jax.process_count() == 1:
      checkpoint.remove_unfinished(manager.directory)
    if failed:
      gc.collect()
  return eval_metrics
