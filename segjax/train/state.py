"""Train state (params, batch-norm statistics, optimizer state) and the optimizer from config."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from zero, then over `num_train_steps`: "cosine" decay to zero, "constant",
  or "piecewise" (detectron2's multi-step): times `config.lr_decay_factor` (default 0.1) at
  each step of `config.lr_boundaries`."""
  if not 0 <= config.warmup_steps < config.num_train_steps:
    raise ValueError(f"config.warmup_steps={config.warmup_steps} must be in "
                     f"[0, config.num_train_steps={config.num_train_steps}).")
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.num_train_steps)
  if config.schedule == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
       optax.constant_schedule(config.learning_rate)], [config.warmup_steps])
  if config.schedule == "piecewise":
    factor = config.get("lr_decay_factor", 0.1)
    boundaries = [int(b) for b in config.lr_boundaries]
    if not all(config.warmup_steps < b < config.num_train_steps for b in boundaries):
      raise ValueError(f"config.lr_boundaries={boundaries} must lie between warmup_steps and "
                       "num_train_steps.")
    return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
       optax.piecewise_constant_schedule(
         config.learning_rate, {b - config.warmup_steps: factor for b in boundaries})],
      [config.warmup_steps])
  raise ValueError(f"Unknown config.schedule {config.schedule!r}; "
                   "known: cosine, constant, piecewise.")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config)
  if config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  elif config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=0.9))
  else:
    raise ValueError(f"Unknown config.optimizer {config.optimizer!r}; known: adamw, sgd.")
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def create_train_state(model, config: ml_collections.ConfigDict, rng: jax.Array,
                       sample_input: jax.ShapeDtypeStruct | jax.Array) -> TrainState:
  """A fresh state; jit it with `out_shardings` to build it directly where it lives."""
  # A model's `initialize`, where it has one, creates the same variables as `__call__`, cheaper.
  variables = model.init({"params": rng, "dropout": rng}, sample_input, train=False,
                         method=getattr(type(model), "initialize", None))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           tx=make_optimizer(config))
