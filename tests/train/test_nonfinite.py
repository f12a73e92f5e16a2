"""A non-finite training loss stops the run at that step's log with an error naming the step and
the metrics, keeping the finite checkpoints written before it (segjax/train/loop.py
`_check_finite`; tests/train/test_checkpoint.py covers the diverged state that a checkpoint
step, rather than a log step, sees first)."""

import json
import os

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.models import build_model
from segjax.train import checkpoint, loop, parallel
from segjax.train.state import initial_state

POISONED_STEP = 5


def _config():
  config = unet_shapes.get_config("tiny")
  config.num_train_steps = 8
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 1000
  config.log_every_steps = 1
  return config


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def test_nan_loss_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, monkeypatch):
  config, workdir = _config(), str(tmp_path)
  next_batch, calls = loop.next_batch, []

  def poisoned(iterator, what):
    batch = next_batch(iterator, what)
    calls.append(1)
    if len(calls) == POISONED_STEP:  # NaN pixels: a NaN loss, then NaN parameters.
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # The initializer compiles much faster.
  try:
    with monkeypatch.context() as m:
      m.setattr(loop, "next_batch", poisoned)
      with pytest.raises(FloatingPointError) as error:
        loop.train_and_evaluate(config, workdir)
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  message = str(error.value)
  assert f"Non-finite training metrics at step {POISONED_STEP}: {{" in message
  assert "'loss': nan" in message and "Every checkpoint kept holds finite values" in message
  assert _logged_steps(workdir) == [1, 2, 3, 4]  # Nothing logged for the NaN step.
  _, abstract = initial_state(config, build_model(config), parallel.make_mesh(1))
  with checkpoint.checkpoint_manager(workdir, save_every_steps=1) as manager:
    assert manager.all_steps() == [2, 4]
    state, _ = checkpoint.restore(manager, abstract)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.batch_stats)))
