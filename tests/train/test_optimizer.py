"""Tests for segjax/train/state.py: the cosine and constant schedules and `make_optimizer`
against numpy formulas written here, and weight decay never touching frozen parameters."""

import functools
import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import unet_resnet_shapes
from segjax.errors import ConfigError
from segjax.models import create_model
from segjax.train import steps, tasks
from segjax.train.state import create_train_state, learning_rate_schedule, make_optimizer
from tests.markers import long_test

LR, WARMUP, TOTAL = 0.1, 10, 110
STEPS = [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 150]


def _config(**overrides):
  config = dict(
    optimizer="adamw",
    learning_rate=LR,
    weight_decay=0.0,
    schedule="cosine",
    warmup_steps=WARMUP,
    num_train_steps=TOTAL,
  )
  return ml_collections.ConfigDict({**config, **overrides})


def _warmup(step, warmup):
  return LR * step / warmup


def cosine(step, warmup=WARMUP):
  """Linear warmup from 0, then half a cosine from LR to 0 over the remaining steps; 0 after."""
  if step < warmup:
    return _warmup(step, warmup)
  progress = min(step - warmup, TOTAL - warmup) / (TOTAL - warmup)
  return LR * 0.5 * (1 + math.cos(math.pi * progress))


def constant(step, warmup=WARMUP):
  return _warmup(step, warmup) if step < warmup else LR


@pytest.mark.parametrize("warmup", [WARMUP, 0])
@pytest.mark.parametrize("name, formula", [("cosine", cosine), ("constant", constant)])
def test_schedule_follows_its_formula(name, formula, warmup):
  schedule = learning_rate_schedule(_config(schedule=name, warmup_steps=warmup))
  np.testing.assert_allclose(
    [float(schedule(s)) for s in STEPS], [formula(s, warmup) for s in STEPS], rtol=1e-5, atol=1e-8
  )


def test_unknown_schedule_and_optimizer_are_named():
  with pytest.raises(ConfigError, match="Unknown config.schedule 'linear'; known: cosine"):
    learning_rate_schedule(_config(schedule="linear"))
  with pytest.raises(ConfigError, match="Unknown config.optimizer 'adam'; known: adamw, sgd"):
    make_optimizer(_config(optimizer="adam"))


# Three steps' gradients of two leaves: global norms 13, 0.5 and 26.5, so that clipping at
# 2 scales the first and last (by one factor for both leaves) and leaves the second alone.
PARAMS = {"a": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([[0.3, -0.7]], np.float32)}
GRADS = [
  {"a": np.array([3.0, 4.0, 0.0]), "b": np.array([[12.0, 0.0]])},
  {"a": np.array([0.3, 0.0, -0.4]), "b": np.array([[0.0, 0.0]])},
  {"a": np.array([-1.5, 2.0, 0.0]), "b": np.array([[0.0, 26.4]])},
]


def _reference(optimizer, clip, weight_decay, lrs):
  """Parameters after the updates of `GRADS` at learning rates `lrs`: numpy, float64."""
  params = {k: v.astype(np.float64) for k, v in PARAMS.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t, (grads, lr) in enumerate(zip(GRADS, lrs), start=1):
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))
    scale = clip / norm if clip and norm > clip else 1.0  # One factor for all leaves.
    for k in params:
      g = grads[k] * scale
      if optimizer == "adamw":  # Adam, then decoupled weight decay, times the rate.
        m[k] = 0.9 * m[k] + 0.1 * g
        v[k] = 0.999 * v[k] + 0.001 * g**2
        m_hat, v_hat = m[k] / (1 - 0.9**t), v[k] / (1 - 0.999**t)
        params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + weight_decay * params[k])
      else:  # SGD: L2 decay added to the gradient, heavy-ball momentum 0.9.
        m[k] = (g + weight_decay * params[k]) + 0.9 * m[k]
        params[k] = params[k] - lr * m[k]
  return params


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("clip", [2.0, None])
def test_optimizer_matches_its_numpy_reference(optimizer, clip):
  config = _config(
    optimizer=optimizer, weight_decay=0.05, warmup_steps=1, num_train_steps=4, grad_clip_norm=clip
  )
  schedule = learning_rate_schedule(config)
  lrs = [float(schedule(t)) for t in range(len(GRADS))]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(LR)  # The first update is warmup's zero.
  tx = make_optimizer(config)
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  for grads in GRADS:
    grads = {k: g.astype(np.float32) for k, g in grads.items()}
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  expected = _reference(optimizer, clip, 0.05, lrs)
  for k in PARAMS:
    np.testing.assert_allclose(params[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The reference is sensitive to what is tested: clipping and the optimizer both show.
  other = _reference(optimizer, None if clip else 2.0, 0.05, lrs)
  assert not np.allclose(expected["a"], other["a"], rtol=1e-3)
  swapped = _reference("sgd" if optimizer == "adamw" else "adamw", clip, 0.05, lrs)
  assert not np.allclose(expected["a"], swapped["a"], rtol=1e-3)


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@long_test  # In CI, frozen parameters: tests/weights/test_init_from.py's weight-decay test.
def test_frozen_parameters_stay_bit_identical_under_weight_decay():
  """A U-Net whose ResNet encoder freezes the stem and res2 (`freeze_at=2`, trainable BatchNorm
  elsewhere), trained 3 AdamW steps with a weight decay large enough to show: the frozen
  parameters and their BatchNorm statistics are bit-identical, the others all move."""
  config = unet_resnet_shapes.get_config("tiny")
  config.model.backbone.freeze_at = 2
  config.weight_decay = 0.5
  config.warmup_steps = 0
  config.image_size = (32, 32)
  model = create_model(config.model)
  sample = np.zeros((1, *config.image_size, 3), np.float32)
  # Jitted, and with the rbg generator: seconds less to compile than eager threefry.
  init = jax.jit(functools.partial(create_train_state, model, config, sample_input=sample))
  state = init(jax.random.key(0, impl="rbg"))
  start = _flat({"params": state.params, "batch_stats": state.batch_stats})
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(2, *config.image_size, 3)).astype(np.float32),
    "mask": rng.integers(0, config.model.num_classes, size=(2, *config.image_size)),
  }
  step = jax.jit(
    lambda state, batch, key: steps.train_step(
      state, batch, key, loss_fn=tasks.get_task(config).bind_loss(config, model)
    )
  )
  for _ in range(3):
    state, _ = step(state, batch, jax.random.key(1))
  end = _flat({"params": state.params, "batch_stats": state.batch_stats})
  frozen_prefixes = ("params/backbone/stem", "params/backbone/res2_", "batch_stats/backbone/stem")
  frozen_prefixes += ("batch_stats/backbone/res2_",)
  frozen = [k for k in start if k.startswith(frozen_prefixes)]
  assert len(frozen) > 10
  for name in frozen:
    np.testing.assert_array_equal(end[name], start[name], err_msg=name)
  moved = [k for k in start if k not in frozen and not np.array_equal(end[k], start[k])]
  assert moved == [k for k in start if k not in frozen]
