"""Train state (params, batch-norm statistics, optimizer state) and the optimizer from config."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from segjax.errors import ConfigError
from segjax.models import ensemble
from segjax.train import parallel


class TrainState(train_state.TrainState):
  batch_stats: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from zero, then over `num_train_steps`: "cosine" decay to zero, "constant",
  or "piecewise" (detectron2's multi-step): times `config.lr_decay_factor` (default 0.1) at
  each step of `config.lr_boundaries`."""
  if not 0 <= config.warmup_steps < config.num_train_steps:
    raise ConfigError(
      f"config.warmup_steps={config.warmup_steps} must be in "
      f"[0, config.num_train_steps={config.num_train_steps})."
    )
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.num_train_steps
    )
  if config.schedule == "constant":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
        optax.constant_schedule(config.learning_rate),
      ],
      [config.warmup_steps],
    )
  if config.schedule == "piecewise":
    factor = config.get("lr_decay_factor", 0.1)
    boundaries = [int(b) for b in config.lr_boundaries]
    if not all(config.warmup_steps < b < config.num_train_steps for b in boundaries):
      raise ConfigError(
        f"config.lr_boundaries={boundaries} must lie between warmup_steps and num_train_steps."
      )
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
        optax.piecewise_constant_schedule(
          config.learning_rate, {b - config.warmup_steps: factor for b in boundaries}
        ),
      ],
      [config.warmup_steps],
    )
  raise ConfigError(
    f"Unknown config.schedule {config.schedule!r}; known: cosine, constant, piecewise."
  )


def frozen_params(model, params) -> Any:
  """A tree like `params`, True for parameters the model never trains: under a `backbone`
  with `freeze_at` k (segjax's ResNet), the stem (k >= 1) and stages res2..res_k. They get zero
  gradients; `make_optimizer`'s `decay_mask` keeps weight decay from shrinking them."""
  freeze_at = getattr(getattr(model, "backbone", None), "freeze_at", 0)

  def frozen(path, _):
    names = [getattr(p, "key", "") for p in path]
    if len(names) < 2 or names[0] != "backbone":
      return False
    if names[1].startswith("stem"):
      return freeze_at >= 1
    m = re.fullmatch(r"res(\d+)_\d+", names[1])
    return bool(m) and int(m[1]) <= freeze_at

  return jax.tree_util.tree_map_with_path(frozen, params)


def _add_decayed_weights(weight_decay: float, decay_mask: Any) -> optax.GradientTransformation:
  """`optax.add_decayed_weights` where `decay_mask(params)` (a tree of Python bools) is True.

  Not `optax.masked`: that wraps the optimizer state in a `MaskedState`, so checkpoints written
  without a mask would no longer restore. This one keeps the unmasked state (empty)."""
  if decay_mask is None:
    return optax.add_decayed_weights(weight_decay)

  def update(updates, state, params):
    decay = decay_mask(params) if callable(decay_mask) else decay_mask
    return jax.tree.map(
      lambda g, p, d: g + weight_decay * p if d else g, updates, params, decay
    ), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
  config: ml_collections.ConfigDict, decay_mask: Any = None
) -> optax.GradientTransformation:
  """The optimizer of `config`; `decay_mask` (a tree of bools or a function of the params
  returning one, True where weight decay applies) leaves the other parameters undecayed. The
  optimizer state has the same structure with or without a mask."""
  schedule = learning_rate_schedule(config)
  decay = _add_decayed_weights(config.weight_decay, decay_mask)
  if config.optimizer == "adamw":
    # optax.adamw's own chain (its defaults), with the decay above.
    tx = optax.chain(optax.scale_by_adam(), decay, optax.scale_by_learning_rate(schedule))
  elif config.optimizer == "sgd":
    tx = optax.chain(decay, optax.sgd(schedule, momentum=0.9))
  else:
    raise ConfigError(f"Unknown config.optimizer {config.optimizer!r}; known: adamw, sgd.")
  if config.get("grad_clip_norm"):
    # An ensemble's members are clipped each on its own gradient norm, as if trained alone.
    ensembled = config.get("ensemble_size", 1) > 1
    clip = ensemble.clip_by_member_norm if ensembled else optax.clip_by_global_norm
    tx = optax.chain(clip(config.grad_clip_norm), tx)
  return tx


def create_train_state(
  model,
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  sample_input: jax.ShapeDtypeStruct | jax.Array,
) -> TrainState:
  """A fresh state; jit it with `out_shardings` to build it directly where it lives."""
  # A model's `initialize`, where it has one, creates the same variables as `__call__`, cheaper.
  variables = model.init(
    {"params": rng, "dropout": rng},
    sample_input,
    train=False,
    method=getattr(type(model), "initialize", None),
  )
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    tx=make_optimizer(config, decay_mask=_decay_mask(model)),
  )


def initial_state(config: ml_collections.ConfigDict, model, mesh):
  """(init_fn, abstract_state): a jitted initializer that builds the state replicated on
  `mesh`, and the state's shapes and shardings (for restoring a checkpoint) without it."""
  sample = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  replicated = parallel.replicated(mesh)
  init = jax.jit(
    functools.partial(create_train_state, model, config, sample_input=sample),
    out_shardings=replicated,
  )
  rng = jax.random.key(config.seed)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    jax.eval_shape(init, rng),
  )
  return functools.partial(init, rng), abstract


def _decay_mask(model):
  """`optax.masked` mask excluding frozen parameters from weight decay; None when none is."""
  if not getattr(getattr(model, "backbone", None), "freeze_at", 0):
    return None
  return lambda params: jax.tree.map(lambda f: not f, frozen_params(model, params))
